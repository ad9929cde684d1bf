//! The last warnings and errors this process logged, for the status page: what an operator
//! looks for first when a site misbehaves. The binary installs [`RecentErrors`] beside its
//! log output; fields that name keys are left out and anything shaped like a key ID is
//! masked, because the page is for aggregates only.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Entries kept, newest last.
const KEPT: usize = 20;
/// Longest message kept, in characters.
const MAX_MESSAGE: usize = 300;

static RECENT: Mutex<VecDeque<RecentError>> = Mutex::new(VecDeque::new());

/// One warning or error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentError {
    /// Unix time, seconds.
    pub at: u64,
    /// `WARN` or `ERROR`.
    pub level: String,
    /// The message and its fields, key IDs masked.
    pub message: String,
}

/// A `tracing` layer that keeps the last warnings and errors for the status page.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecentErrors;

impl<S: Subscriber> Layer<S> for RecentErrors {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        // Levels order from ERROR (least verbose) up to TRACE.
        if level > Level::WARN {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let mut message = scrub(&text.message);
        if !text.fields.is_empty() {
            message.push_str(&scrub(&text.fields));
        }
        if message.chars().count() > MAX_MESSAGE {
            message = message.chars().take(MAX_MESSAGE).collect::<String>() + "…";
        }
        record(RecentError {
            at: crate::status::unix_now(),
            level: level.to_string(),
            message,
        });
    }
}

fn record(entry: RecentError) {
    let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
    if recent.len() == KEPT {
        recent.pop_front();
    }
    recent.push_back(entry);
}

/// The entries kept, newest first.
pub fn recent() -> Vec<RecentError> {
    let recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
    recent.iter().rev().cloned().collect()
}

#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let name = field.name();
        if name == "message" {
            let _ = write!(self.message, "{value:?}");
        } else if !names_keys(name) {
            let _ = write!(self.fields, " {name}={value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let name = field.name();
        if name == "message" {
            self.message.push_str(value);
        } else if !names_keys(name) {
            let _ = write!(self.fields, " {name}={value}");
        }
    }
}

/// Fields whose values are keys or key IDs.
fn names_keys(field: &str) -> bool {
    let field = field.to_ascii_lowercase();
    field == "key" || field.starts_with("key_") || field.ends_with("_key") || field == "keys"
}

/// `text` with every UUID (a key ID, or a request ID that leads to one) replaced.
pub(crate) fn scrub(text: &str) -> String {
    const MASK: &str = "<id>";
    const SHAPE: [usize; 5] = [8, 4, 4, 4, 12];
    let bytes = text.as_bytes();
    let is_uuid_at = |start: usize| {
        let mut at = start;
        for (i, len) in SHAPE.iter().enumerate() {
            if i > 0 {
                if bytes.get(at) != Some(&b'-') {
                    return false;
                }
                at += 1;
            }
            for _ in 0..*len {
                if !bytes.get(at).is_some_and(u8::is_ascii_hexdigit) {
                    return false;
                }
                at += 1;
            }
        }
        true
    };
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        if is_uuid_at(i) {
            out.push_str(MASK);
            i += 36;
        } else {
            let c = text[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn key_ids_are_masked() {
        assert_eq!(
            scrub("key 5F1e6c0a-3b1d-4f5e-9a7b-0c1d2e3f4a5b gone, é ok"),
            "key <id> gone, é ok"
        );
        assert_eq!(scrub("not-a-uuid-1234"), "not-a-uuid-1234");
    }

    #[test]
    fn keeps_warnings_and_errors_without_key_fields() {
        let subscriber = tracing_subscriber::registry().with(RecentErrors);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("an info line is not kept");
            tracing::warn!(
                site = "KME_B",
                key_id = "5f1e6c0a-3b1d-4f5e-9a7b-0c1d2e3f4a5b",
                "peer unreachable 5f1e6c0a-3b1d-4f5e-9a7b-0c1d2e3f4a5b"
            );
        });
        let kept = recent();
        let newest = kept.first().expect("the warning was kept");
        assert_eq!(newest.level, "WARN");
        assert_eq!(newest.message, "peer unreachable <id> site=KME_B");
        assert!(kept.iter().all(|e| !e.message.contains("info line")));
    }
}
