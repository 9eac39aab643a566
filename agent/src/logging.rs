//! Where netd's log lines go and how they look: text for people, coloured only on a terminal
//! (files, pipes and journald get plain text), or one JSON object per line for log pipelines,
//! with each event's fields at the top level next to `timestamp`, `level` and `message`.

use std::io::IsTerminal;

use netd_common::report::use_colour;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Installs the global subscriber: stderr, filtered by `NETD_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("NETD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(use_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref())).init(),
        LogFormat::Json => builder.with_ansi(false).json().flatten_event(true).init(),
    }
}
