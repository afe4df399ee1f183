//! Logging: to journald with structured fields (PHASE, RUNNER, SYSTEM_ID) when systemd connected
//! our stderr to the journal (JOURNAL_STREAM) and its socket exists; otherwise plain lines on
//! stderr without timestamps, so a person running the agent by hand sees them.

use tracing_subscriber::prelude::*;

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
            .with(layer.with_filter(filter))
            .init(),
        None => tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .without_time()
                    .with_target(false)
                    .with_ansi(false)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .init(),
    }
}

/// The structured fields every agent log entry carries; updated as the lifecycle advances.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub phase: &'static str,
    pub runner: String,
    pub system_id: String,
}

static CONTEXT: std::sync::Mutex<Context> = std::sync::Mutex::new(Context {
    phase: "waiting-for-config",
    runner: String::new(),
    system_id: String::new(),
});

pub fn context() -> Context {
    CONTEXT.lock().map(|c| c.clone()).unwrap_or_default()
}

pub fn update_context(update: impl FnOnce(&mut Context)) {
    if let Ok(mut c) = CONTEXT.lock() {
        update(&mut c);
    }
}

/// `log!(info, "...")`: a tracing event with the PHASE, RUNNER and SYSTEM_ID fields.
#[macro_export]
macro_rules! log {
    ($level:ident, $($arg:tt)+) => {{
        let c = $crate::logging::context();
        tracing::$level!(phase = c.phase, runner = %c.runner, system_id = %c.system_id, $($arg)+)
    }};
}
