//! The `log` section: how log lines are written and what they may carry.
//!
//! Read once at start (a format cannot change under a running subscriber);
//! a reload leaves it as it was.

use serde::Deserialize;

/// `log.format`: lines for a person (`text`, the default) or one JSON
/// object per line for a log shipper (`json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    #[serde(default)]
    pub format: LogFormat,
    /// Whether access lines repeat message text. Off by default: a
    /// message is personal data, and the operator decides to keep it.
    #[serde(default)]
    pub message_text: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    pub message_text: bool,
}

impl From<FileLog> for LogConfig {
    fn from(f: FileLog) -> Self {
        LogConfig {
            format: f.format,
            message_text: f.message_text,
        }
    }
}
