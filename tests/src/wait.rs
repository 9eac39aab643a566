//! Polling with a deadline: the test bed's only way to wait for
//! asynchronous effects (a daemon writing a file, a route appearing).

use anyhow::{bail, Result};
use std::panic::Location;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Calls `cond` every `poll` until it returns `Ok(true)`, for at most
/// `timeout`. An `Err` from `cond` counts as "not yet" (files not written
/// yet, a tool failing because a link does not exist yet ...), and the last
/// such error is reported if the deadline passes. The timeout error names
/// the caller's source location, so a test with several waits says which
/// one failed.
#[track_caller]
pub fn wait_until<F>(timeout: Duration, poll: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Result<bool>,
{
    let caller = Location::caller();
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last_err = match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(e) => Some(e),
        };
        if start.elapsed() >= timeout {
            match last_err {
                Some(e) => bail!(
                    "wait_until at {caller} timed out after {timeout:?} ({attempts} attempts); \
                     last error: {e:#}"
                ),
                None => bail!(
                    "wait_until at {caller} timed out after {timeout:?} ({attempts} attempts): \
                     condition still false"
                ),
            }
        }
        sleep(poll.min(timeout.saturating_sub(start.elapsed())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn succeeds_once_condition_holds() {
        let mut n = 0;
        wait_until(Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            Ok(n >= 3)
        })
        .unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn timeout_reports_location_and_last_error() {
        let err = wait_until(Duration::from_millis(30), Duration::from_millis(5), || {
            anyhow::bail!("not there yet")
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("wait.rs") && err.contains("not there yet"),
            "{err}"
        );
    }
}
