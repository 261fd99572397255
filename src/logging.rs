//! Logs on stderr: readable by default, JSON lines with `--log-format json`, levels by
//! `RUST_LOG`.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. `default_level` applies when `RUST_LOG` is unset: the
/// worker says what it does (`info`); the bridge stays quiet (`warn`) so its stderr only
/// carries what the reference prints there.
pub fn init(format: LogFormat, default_level: &str) {
    // async-nats logs every (re)connect at info; its warnings are what an operator needs.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},async_nats=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}
