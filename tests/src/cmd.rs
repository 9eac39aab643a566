//! Running external commands (`ip`, `etcdctl`, `ping`, ...) and managing
//! child processes.
//!
//! The test bed drives everything through the same command-line tools an
//! operator would use, so a failure message must show the exact command line
//! and what it printed: that is usually enough to reproduce it by hand.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// `ip netns exec NS args...`. `ip netns exec` execs the program directly
/// (no intermediate fork), so a spawned child's pid is the program's pid
/// and signals sent to it reach the program itself.
pub(crate) fn ns_command(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    // Never let a tool wait for the test's stdin (e.g. `etcdctl put KEY`).
    cmd.stdin(Stdio::null());
    cmd
}

/// A plain command with stdin closed.
pub(crate) fn command(program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// The command line as a human would type it, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut words = vec![quote(&cmd.get_program().to_string_lossy())];
    words.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    words.join(" ")
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` to completion and returns its output whatever the exit code;
/// fails only if the program cannot be started.
pub(crate) fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))
}

/// Runs `cmd`; a non-zero exit is an error carrying the command line,
/// the exit status and both output streams. Returns stdout.
pub(crate) fn check(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    check_output(cmd, out)
}

/// Turns an already collected [`Output`] into stdout or a descriptive error.
pub(crate) fn check_output(cmd: &Command, out: Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    bail!(
        "`{}` failed ({}):\nstderr: {}\nstdout: {}",
        describe(cmd),
        out.status,
        stderr.trim_end(),
        stdout.trim_end()
    )
}

/// Opens `path` for appending (creating it), so restarted processes keep
/// the history of earlier runs in the same log.
pub(crate) fn append_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open log file {}", path.display()))
}

/// Stdout/stderr for a spawned process: the log file, or nothing.
pub(crate) fn log_stdio(cmd: &mut Command, log: Option<&Path>) -> Result<()> {
    match log {
        Some(path) => {
            let file = append_file(path)?;
            cmd.stdout(file.try_clone()?).stderr(file);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    Ok(())
}

/// Sends `sig` to a raw pid; errors (typically ESRCH) are ignored because
/// callers only use this on processes that may already be gone.
pub(crate) fn kill_pid(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return; // never signal process groups or "all processes"
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Sends `sig` to a child that has not been reaped yet. A child that was
/// not waited for keeps its pid (as a zombie), so the pid cannot have been
/// reused by an unrelated process.
pub(crate) fn signal_child(child: &mut Child, sig: libc::c_int) {
    if matches!(child.try_wait(), Ok(None)) {
        kill_pid(child.id(), sig);
    }
}

/// Waits up to `timeout` for `child` to exit.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL: the polite stop, with a
/// guarantee that the process is gone (and reaped) when this returns.
pub(crate) fn terminate(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    signal_child(child, libc::SIGTERM);
    if let Some(status) = wait_timeout(child, grace)? {
        return Ok(status);
    }
    eprintln!(
        "netd-tests: pid {} ignored SIGTERM for {:?}, sending SIGKILL",
        child.id(),
        grace
    );
    kill_and_reap(child)
}

/// SIGKILL and reap.
pub(crate) fn kill_and_reap(child: &mut Child) -> Result<ExitStatus> {
    signal_child(child, libc::SIGKILL);
    Ok(child.wait()?)
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} earlier lines ...]\n"));
    }
    for line in &lines[start..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Reads a log file lossily; a missing file reads as empty.
pub(crate) fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes_only_when_needed() {
        let cmd = command("sh", &["-c", "echo 'a b'"]);
        assert_eq!(describe(&cmd), r"sh -c 'echo '\''a b'\'''");
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "[... 1 earlier lines ...]\nb\nc\n");
        assert_eq!(tail("a\n", 5), "a\n");
    }

    #[test]
    fn check_reports_stderr_and_command() {
        let err = check(&mut command("sh", &["-c", "echo oops >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("oops") && err.contains("sh -c"), "{err}");
    }
}
