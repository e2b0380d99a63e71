//! How the process logs: plain text on a terminal or in a file, journald's native protocol
//! under systemd (priorities and fields, so `journalctl -p warning` and
//! `journalctl CAMERA=cam0` work, and no timestamp of our own beside journald's), or one
//! JSON object per line for log shippers. `RUST_LOG` filters in every format.
//!
//! `auto` picks journald when `$JOURNAL_STREAM` names the very stream stderr is (systemd
//! sets it for a service whose output goes to the journal), text otherwise. When journald
//! was asked for but its socket does not answer, the logs go to stderr as text and the first
//! line says so: never silently nowhere.

use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, fmt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
    Journald,
}

/// The default filter: the embedded demo broker logs every connection, and an ERROR on each
/// clean disconnect; `RUST_LOG=info,rumqttd=info` shows it when needed.
const DEFAULT_FILTER: &str = "info,ort=warn,rumqttd=off";

/// Installs the global subscriber for `format`.
pub fn init(format: LogFormat) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let format = match format {
        LogFormat::Auto if stderr_is_the_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        chosen => chosen,
    };
    match format {
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_syslog_identifier("edge-inspect".into()).with_field_prefix(None);
                tracing_subscriber::registry().with(filter()).with(layer).init();
            }
            Err(e) => {
                text(filter());
                tracing::warn!(error = %e, "journald does not answer; logging text to stderr.");
            }
        },
        LogFormat::Json => {
            fmt().json().with_env_filter(filter()).with_writer(std::io::stderr).with_current_span(false).init();
        }
        LogFormat::Text | LogFormat::Auto => text(filter()),
    }
}

fn text(filter: EnvFilter) {
    fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// `$JOURNAL_STREAM` is `<device>:<inode>` of the journal's stream; stderr is the journal
/// when its own device and inode match (systemd.exec(5)).
fn stderr_is_the_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else { return false };
    stream.to_string_lossy() == format!("{}:{}", stderr.dev(), stderr.ino())
}
