//! Logging: to journald with structured fields when systemd connected our stderr to the journal
//! (JOURNAL_STREAM) and its socket exists; otherwise plain lines on stderr without timestamps,
//! so a person running the agent by hand sees them. PHASE, RUNNER and SYSTEM_ID come from the
//! span that the agent enters for each phase (`agent::Agent::span`); journald stores a span's
//! fields with every entry logged inside it.
//!
//! Either way every message and field first goes through `secret::scrub` (the `Scrubbed`
//! layer), so no token-shaped string and no URL's `user:password@` reaches the log, wherever it
//! came from: a config field, an error body, gitlab-runner's output.

use std::borrow::Cow;
use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber, span};
use tracing_subscriber::layer::{self, Layer};
use tracing_subscriber::prelude::*;

use crate::secret;

pub fn init() {
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let journald = if under_journal && std::path::Path::new("/run/systemd/journal/socket").exists()
    {
        tracing_journald::layer().ok().map(|layer| {
            layer
                .with_field_prefix(None)
                .with_syslog_identifier("gitlab-runner-vm".into())
        })
    } else {
        None
    };
    let level = match std::env::var("GITLAB_RUNNER_VM_LOG").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("warn") => tracing::Level::WARN,
        _ => tracing::Level::INFO,
    };
    let filter = tracing_subscriber::filter::LevelFilter::from_level(level);
    match journald {
        Some(layer) => tracing_subscriber::registry()
            .with(Scrubbed(layer).with_filter(filter))
            .init(),
        None => tracing_subscriber::registry()
            .with(Scrubbed(stderr_layer(std::io::stderr)).with_filter(filter))
            .init(),
    }
}

fn stderr_layer<S, W>(writer: W) -> impl Layer<S>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + 'static,
{
    tracing_subscriber::fmt::layer()
        .without_time()
        .with_target(false)
        .with_ansi(false)
        .with_writer(Inert(writer))
}

/// The stderr log, which a person reads on a terminal when the agent runs by hand: each
/// record is one line with every character `console::hides` made a space, newlines in a
/// message included (a message must not pass for a second record). tracing-subscriber
/// escapes ESC and C1 itself, not a carriage return that overwrites the line nor a bidi
/// override. The formatter writes each record whole, its newline last.
struct Inert<M>(M);

impl<'w, M: tracing_subscriber::fmt::MakeWriter<'w>> tracing_subscriber::fmt::MakeWriter<'w>
    for Inert<M>
{
    type Writer = Inert<M::Writer>;

    fn make_writer(&'w self) -> Self::Writer {
        Inert(self.0.make_writer())
    }
}

impl<W: std::io::Write> std::io::Write for Inert<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (record, end) = match text.strip_suffix('\n') {
            Some(record) => (record, "\n"),
            None => (text.as_ref(), ""),
        };
        let mut line: String = record
            .chars()
            .map(|c| if crate::console::hides(c) { ' ' } else { c })
            .collect();
        line.push_str(end);
        self.0.write_all(line.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Wraps the layer that writes the log: an event with anything to scrub in its message or
/// fields reaches it as a copy with those values scrubbed; other events pass as they are.
struct Scrubbed<L>(L);

/// An event's field values as text, the way they were recorded.
#[derive(Default)]
struct Values {
    texts: Vec<Option<Value>>,
    scrubbed: bool,
}

enum Value {
    /// `record_str`: re-emitted as a string, which formatters may quote.
    Str(String),
    /// Anything else, as its Debug text: re-emitted with that text as Display.
    Text(String),
}

impl Values {
    fn set(&mut self, field: &Field, text: String, as_str: bool) {
        let text = match secret::scrub_cow(&text) {
            Cow::Borrowed(_) => text,
            Cow::Owned(scrubbed) => {
                self.scrubbed = true;
                scrubbed
            }
        };
        if let Some(slot) = self.texts.get_mut(field.index()) {
            *slot = Some(if as_str {
                Value::Str(text)
            } else {
                Value::Text(text)
            });
        }
    }
}

impl Visit for Values {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field, value.to_owned(), true);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.set(field, format!("{value:?}"), false);
    }
}

impl<S: Subscriber, L: Layer<S>> Layer<S> for Scrubbed<L> {
    fn on_event(&self, event: &Event<'_>, ctx: layer::Context<'_, S>) {
        let metadata = event.metadata();
        let mut values = Values {
            texts: metadata.fields().iter().map(|_| None).collect(),
            scrubbed: false,
        };
        event.record(&mut values);
        if !values.scrubbed {
            return self.0.on_event(event, ctx);
        }
        let displays: Vec<Option<tracing::field::DisplayValue<&str>>> = values
            .texts
            .iter()
            .map(|v| match v {
                Some(Value::Text(t)) => Some(tracing::field::display(t.as_str())),
                _ => None,
            })
            .collect();
        let refs: Vec<Option<&dyn tracing::Value>> = values
            .texts
            .iter()
            .zip(&displays)
            .map(|(v, d)| match (v, d) {
                (Some(Value::Str(s)), _) => Some(s as &dyn tracing::Value),
                (_, Some(d)) => Some(d as &dyn tracing::Value),
                _ => None,
            })
            .collect();
        let fields = metadata.fields().value_set_all(&refs);
        let copy = if event.is_contextual() {
            Event::new(metadata, &fields)
        } else {
            Event::new_child_of(event.parent().cloned(), metadata, &fields)
        };
        self.0.on_event(&copy, ctx);
    }

    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber);
    }

    fn register_callsite(
        &self,
        metadata: &'static Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        self.0.register_callsite(metadata)
    }

    fn enabled(&self, metadata: &Metadata<'_>, ctx: layer::Context<'_, S>) -> bool {
        self.0.enabled(metadata, ctx)
    }

    fn event_enabled(&self, event: &Event<'_>, ctx: layer::Context<'_, S>) -> bool {
        self.0.event_enabled(event, ctx)
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: layer::Context<'_, S>) {
        self.0.on_new_span(attrs, id, ctx);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: layer::Context<'_, S>) {
        self.0.on_record(id, values, ctx);
    }

    fn on_follows_from(&self, id: &span::Id, follows: &span::Id, ctx: layer::Context<'_, S>) {
        self.0.on_follows_from(id, follows, ctx);
    }

    fn on_enter(&self, id: &span::Id, ctx: layer::Context<'_, S>) {
        self.0.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &span::Id, ctx: layer::Context<'_, S>) {
        self.0.on_exit(id, ctx);
    }

    fn on_close(&self, id: span::Id, ctx: layer::Context<'_, S>) {
        self.0.on_close(id, ctx);
    }

    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: layer::Context<'_, S>) {
        self.0.on_id_change(old, new, ctx);
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.0.max_level_hint()
    }

    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            Some(self as *const Self as *const ())
        } else {
            // SAFETY: forwarded to the wrapped layer, which upholds the same contract.
            unsafe { self.0.downcast_raw(id) }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    fn logged(emit: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let subscriber =
            tracing_subscriber::registry().with(Scrubbed(stderr_layer(buffer.clone())));
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn every_message_and_field_is_scrubbed() {
        let log = logged(|| {
            tracing::warn!(
                runner = "vm-glpat-fake.xxxxxxxxxxxxxxxx",
                "GitLab said: {}",
                "bad token glrt-fake.xxxx.xxxx.xxxx1234 at https://user:pw@gitlab.example.com/x"
            );
            tracing::info!(
                stream = "stdout",
                "job printed GR1348941xxxxxxxxxxxxxxxxxxxx"
            );
        });
        for secret in [
            "fake.xxxx",
            "fake.xxxxxxxx",
            "xxxxxxxxxxxxxxxxxxxx",
            "user:pw",
        ] {
            assert!(!log.contains(secret), "{secret} leaked:\n{log}");
        }
        assert!(
            log.contains("bad token glrt-…1234 at https://…@gitlab.example.com/x"),
            "{log}"
        );
        assert!(log.contains("runner=\"vm-glpat-…xxxx\""), "{log}");
        assert!(log.contains("job printed GR1348941…xxxx"), "{log}");
        // A field recorded as a string keeps its form.
        assert!(log.contains("stream=\"stdout\""), "{log}");
    }

    #[test]
    fn a_record_on_stderr_is_one_inert_line() {
        let text = logged(|| {
            tracing::warn!(
                "GitLab said \u{1b}]0;title\u{7}\r\u{9b}2J\u{202e}evil\nWARN forged, detail = {}",
                "x\u{1b}[2J"
            )
        });
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(text.ends_with('\n'), "{text:?}");
        assert!(
            !text.trim_end().chars().any(crate::console::hides),
            "{text:?}"
        );
        assert!(text.contains("GitLab said"), "{text:?}");
    }

    #[test]
    fn events_without_secrets_pass_unchanged() {
        let plain = |buffer: Buffer| {
            let subscriber = tracing_subscriber::registry().with(stderr_layer(buffer));
            tracing::subscriber::with_default(subscriber, || {
                tracing::info!(n = 3, name = "x", "plain {}", 42)
            });
        };
        let reference = Buffer::default();
        plain(reference.clone());
        let log = logged(|| tracing::info!(n = 3, name = "x", "plain {}", 42));
        assert_eq!(log.as_bytes(), reference.0.lock().unwrap().as_slice());
    }
}
