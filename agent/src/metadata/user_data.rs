//! runner.json as a platform's user-data: where each platform serves it, how an operator sets
//! it, and what fetched bytes are when they are not runner.json. Pure, apart from the one
//! fetch.
//!
//! What user-data is judged on here is only its shape (JSON object, or what else it looks
//! like); the keys are validated afterwards exactly as a file's are. Gzip-compressed user-data
//! (EC2 passes user-data through as it is given, and cloud-init decompresses gzip) is
//! decompressed first, to at most `MAX_DECOMPRESSED`. A description never quotes
//! the content: user-data holds the runner token.

use std::io::Read;

use tokio::time::Instant;

use super::{MetadataClient, MetadataError, Platform};

impl Platform {
    /// Where the platform's metadata service serves the instance's user-data.
    pub fn user_data_path(self) -> &'static str {
        self.provider().user_data_path
    }

    /// How to give an instance runner.json as its user-data.
    pub fn how_to_set_user_data(self) -> &'static str {
        self.provider().how_to_set_user_data
    }
}

/// Decompressed user-data is read up to this size, the cap of every metadata answer: a few
/// hundred bytes of gzip can expand to gigabytes (a decompression bomb).
pub const MAX_DECOMPRESSED: usize = super::client::MAX_BODY;

/// Why fetched user-data is not runner.json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRunnerJson {
    /// No user-data at all (404), or only white space.
    Missing,
    /// Something else, described without quoting it.
    Other(String),
}

/// The instance's user-data as runner.json text, fetched within `deadline`.
pub async fn fetch_runner_json(
    client: &MetadataClient,
    deadline: Instant,
) -> Result<Result<String, NotRunnerJson>, MetadataError> {
    let body = client
        .fetch(client.platform().user_data_path(), deadline)
        .await?;
    Ok(runner_json(body.as_deref()))
}

/// The user-data's text if it is a JSON object (its keys are validated later, as a file's);
/// otherwise what it looks like.
pub fn runner_json(body: Option<&[u8]>) -> Result<String, NotRunnerJson> {
    let Some(body) = body.filter(|b| !b.iter().all(u8::is_ascii_whitespace)) else {
        return Err(NotRunnerJson::Missing);
    };
    if is_gzip(body) {
        let plain = gunzip(body)?;
        if is_gzip(&plain) {
            return Err(NotRunnerJson::Other(
                "gzip-compressed data, compressed twice (compress runner.json once: gzip -c runner.json)"
                    .into(),
            ));
        }
        return runner_json(Some(&plain));
    }
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(e) => {
            return Err(NotRunnerJson::Other(format!(
                "{} bytes that are not UTF-8 text (an invalid byte at offset {})",
                body.len(),
                e.valid_up_to()
            )));
        }
    };
    let start = text.trim_start_matches('\u{feff}').trim_start();
    let first_line = start.lines().next().unwrap_or("").trim_end();
    let lower = first_line.to_ascii_lowercase();
    let looks_like = if lower.starts_with("#cloud-config") {
        Some("a cloud-init #cloud-config document".to_string())
    } else if lower.starts_with("#!") {
        Some("a script (it starts with #!)".to_string())
    } else if lower.starts_with("content-type:") || lower.starts_with("mime-version:") {
        Some("a MIME multi-part archive (cloud-init's)".to_string())
    } else if lower.starts_with("<!doctype html") || lower.starts_with("<html") {
        Some("an HTML page".to_string())
    } else if lower.starts_with('<') {
        Some("XML or HTML".to_string())
    } else if lower.starts_with("#include") || lower.starts_with("#part-handler") {
        Some("a cloud-init include file or part handler".to_string())
    } else {
        None
    };
    if let Some(what) = looks_like {
        return Err(NotRunnerJson::Other(what));
    }
    match serde_json::from_str::<serde_json::Value>(start) {
        // Without the byte-order mark an editor may have left: JSON has none.
        Ok(serde_json::Value::Object(_)) => Ok(text.trim_start_matches('\u{feff}').to_string()),
        Ok(other) => Err(NotRunnerJson::Other(format!(
            "JSON, but {} rather than an object",
            json_kind(&other)
        ))),
        // serde_json's syntax errors name a position, never the text.
        Err(e) => Err(NotRunnerJson::Other(format!(
            "{} bytes of text that is not JSON ({} at line {} column {})",
            body.len(),
            syntax_category(&e),
            e.line(),
            e.column()
        ))),
    }
}

fn is_gzip(body: &[u8]) -> bool {
    body.starts_with(&[0x1f, 0x8b])
}

/// Every member of a gzip stream (as cloud-init's `gzip.decompress` reads it), at most
/// `MAX_DECOMPRESSED` bytes of it.
fn gunzip(body: &[u8]) -> Result<Vec<u8>, NotRunnerJson> {
    let mut plain = Vec::new();
    let limit = MAX_DECOMPRESSED as u64 + 1;
    flate2::read::MultiGzDecoder::new(body)
        .take(limit)
        .read_to_end(&mut plain)
        .map_err(|e| {
            NotRunnerJson::Other(format!(
                "{} bytes of gzip-compressed data that cannot be decompressed ({}; corrupt or cut short?)",
                body.len(),
                e.kind()
            ))
        })?;
    if plain.len() > MAX_DECOMPRESSED {
        return Err(NotRunnerJson::Other(format!(
            "{} bytes of gzip-compressed data that decompress to more than {} KiB (the cap of user-data)",
            body.len(),
            MAX_DECOMPRESSED / 1024
        )));
    }
    Ok(plain)
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn syntax_category(e: &serde_json::Error) -> &'static str {
    if e.is_eof() {
        "it ends too early"
    } else {
        "a syntax error"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn other(body: &[u8]) -> String {
        match runner_json(Some(body)) {
            Err(NotRunnerJson::Other(what)) => what,
            r => panic!("expected Other, got {r:?}"),
        }
    }

    #[test]
    fn a_json_object_is_runner_json_as_it_is() {
        let text = "{\"url\": \"https://gitlab.example.com\", \"token\": \"glrt-x\"}\n";
        assert_eq!(runner_json(Some(text.as_bytes())), Ok(text.to_string()));
        // A byte-order mark or leading blank lines are what an editor leaves; still JSON.
        assert_eq!(
            runner_json(Some("\u{feff}\n {\"url\": \"u\"}".as_bytes())),
            Ok("\n {\"url\": \"u\"}".to_string())
        );
    }

    #[test]
    fn nothing_or_white_space_is_missing() {
        assert_eq!(runner_json(None), Err(NotRunnerJson::Missing));
        assert_eq!(runner_json(Some(b"")), Err(NotRunnerJson::Missing));
        assert_eq!(runner_json(Some(b" \n\t")), Err(NotRunnerJson::Missing));
    }

    #[test]
    fn other_user_data_is_named_without_being_quoted() {
        let secret = "glrt-secret.token.value.0123456789";
        let cases: [(Vec<u8>, &str); 9] = [
            (
                format!("#cloud-config\nwrite_files: [{secret}]").into_bytes(),
                "#cloud-config",
            ),
            (format!("#!/bin/sh\necho {secret}").into_bytes(), "script"),
            (
                format!("Content-Type: multipart/mixed\n{secret}").into_bytes(),
                "MIME",
            ),
            (format!("MIME-Version: 1.0\n{secret}").into_bytes(), "MIME"),
            (
                format!("<!DOCTYPE html><p>{secret}</p>").into_bytes(),
                "HTML page",
            ),
            (
                vec![0x1f, 0x8b, 0x08, 0, 0xff, 0xfe],
                "cannot be decompressed",
            ),
            (vec![b'{', 0xff, 0xfe, b'}'], "not UTF-8"),
            (format!("url: {secret}").into_bytes(), "not JSON"),
            (format!("[\"{secret}\"]").into_bytes(), "an array"),
        ];
        for (body, expected) in cases {
            let what = other(&body);
            assert!(what.contains(expected), "{what:?} should say {expected}");
            assert!(!what.contains("glrt-"), "{what:?} quotes the content");
        }
        assert!(other(b"{\"url\": ").contains("ends too early"));
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn gzip_compressed_runner_json_is_decompressed_up_to_the_cap() {
        let text = "{\"url\": \"https://gitlab.example.com\", \"token\": \"glrt-x\"}";
        assert_eq!(
            runner_json(Some(&gzip(text.as_bytes()))),
            Ok(text.to_string())
        );
        // Two members, as `cat a.gz b.gz` makes: read whole, like cloud-init.
        let mut two = gzip(b"{\"url\": ");
        two.extend(gzip(b"\"u\"}"));
        assert_eq!(runner_json(Some(&two)), Ok("{\"url\": \"u\"}".to_string()));
        // Exactly at the cap is read; one byte more is refused, and so is a bomb.
        let mut at_cap = b"{\"url\": \"u\"}".to_vec();
        at_cap.resize(MAX_DECOMPRESSED, b' ');
        assert!(runner_json(Some(&gzip(&at_cap))).is_ok());
        at_cap.push(b' ');
        assert!(other(&gzip(&at_cap)).contains("more than 1024 KiB"));
        let bomb = gzip(&vec![b' '; MAX_DECOMPRESSED]).repeat(64);
        assert!(bomb.len() < 100_000, "{}", bomb.len());
        assert!(other(&bomb).contains("more than 1024 KiB"));
        // What is inside is judged as uncompressed user-data is.
        assert!(other(&gzip(b"#cloud-config\nruncmd: []")).contains("#cloud-config"));
        assert!(other(&gzip(&gzip(text.as_bytes()))).contains("compressed twice"));
        let cut = gzip(text.as_bytes());
        assert!(other(&cut[..cut.len() / 2]).contains("cannot be decompressed"));
        assert_eq!(
            runner_json(Some(&gzip(b" \n"))),
            Err(NotRunnerJson::Missing)
        );
    }

    #[test]
    fn each_platform_names_its_own_command() {
        assert!(
            Platform::Aws
                .how_to_set_user_data()
                .contains("--user-data file://")
        );
        assert!(
            Platform::Gce
                .how_to_set_user_data()
                .contains("user-data=runner.json")
        );
        assert!(
            Platform::DigitalOcean
                .how_to_set_user_data()
                .contains("--user-data-file")
        );
    }
}
