//! Text for the people reading netd's output: an error with its causes on one line, durations as
//! numbers for log fields, colour only where it shows.

use std::error::Error;
use std::ffi::OsStr;
use std::time::Duration;

/// `e` and its causes on one line, joined with ": ", each said once. A cause whose text the
/// message so far already contains is left out: many errors (ours, by convention, and most
/// libraries') repeat their source in their own message, which is how "X" followed by
/// "Caused by: X" comes about.
///
/// For errors of other crates, whose message may or may not include their causes. Ours put their
/// source in their message, sometimes reworded: print those with `Display`.
pub fn error_chain(e: &dyn Error) -> String {
    with_causes(e.to_string(), e.source())
}

/// `message` followed by `cause` and its own causes, as [`error_chain`] joins them. For an error
/// whose own `Display` is not fit to print (it shows its source with `Debug`, as tonic's
/// `Status` does): say what it means in `message`, then its causes.
pub fn with_causes(mut message: String, mut cause: Option<&(dyn Error + 'static)>) -> String {
    while let Some(c) = cause {
        let s = c.to_string();
        if !s.is_empty() && !message.contains(&s) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&s);
        }
        cause = c.source();
    }
    message
}

/// `d` in milliseconds with microsecond resolution, for `took_ms` log fields: a number in JSON
/// logs, `took_ms=1.346` in text ones.
pub fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// Whether text logs get ANSI colours: only when they go to a terminal (files, pipes and journald
/// would store the escapes), and not when `NO_COLOR` is set to anything but "" (no-color.org).
pub fn use_colour(to_terminal: bool, no_color: Option<&OsStr>) -> bool {
    to_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// `2025-06-01T12:00:00Z` (UTC, whole seconds), the form Kubernetes uses for timestamps.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;

    /// An error with a fixed message and an optional source.
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl fmt::Display for E {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for E {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = E("Connection refused (os error 111)", None);
        // A wrapper that repeats its source, then one that does not, then one with no text.
        let e = E("etcd get /a: Connection refused (os error 111)", Some(Box::new(io)));
        assert_eq!(error_chain(&e), "etcd get /a: Connection refused (os error 111)");
        let e = E("transport error", Some(Box::new(E("tcp connect error", Some(Box::new(E("", Some(Box::new(E("Connection refused (os error 111)", None))))))))));
        assert_eq!(error_chain(&e), "transport error: tcp connect error: Connection refused (os error 111)");
        let leaf = E("tcp connect error", None);
        assert_eq!(with_causes("tcp connect error".into(), Some(&leaf)), "tcp connect error");
        assert_eq!(with_causes(String::new(), Some(&leaf)), "tcp connect error");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))), "an empty NO_COLOR does not count");
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None), "a file, pipe or journald gets no escapes");
        assert!(!use_colour(false, Some(OsStr::new("1"))));
    }

    #[test]
    fn millis_are_numbers_with_microsecond_resolution() {
        assert_eq!(millis(Duration::from_micros(1346)), 1.346);
        assert_eq!(millis(Duration::from_nanos(1_346_999)), 1.346);
        assert_eq!(millis(Duration::from_secs(2)), 2000.0);
        assert_eq!(millis(Duration::from_micros(1346)).to_string(), "1.346");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let epoch = std::time::UNIX_EPOCH;
        assert_eq!(rfc3339(epoch), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(epoch + std::time::Duration::from_secs(1_748_779_200)), "2025-06-01T12:00:00Z");
    }
}
