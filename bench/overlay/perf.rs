//! Pod-to-pod TCP throughput (iperf3) and TCP request/response latency
//! (a netperf-TCP_RR-like loop built into this binary: one byte each way,
//! TCP_NODELAY, one transaction in flight).

use anyhow::{bail, Context, Result};
use netd_tests::Pod;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

pub const IPERF_PORT: u16 = 5201;
pub const RR_PORT: u16 = 7007;

/// A server process in a pod, killed and reaped on drop (the pod's
/// namespace would kill it too, but not before the pod is dropped).
pub struct Server(Child);

impl Server {
    /// Its pid (`ip netns exec` execs the server, so this is the server's).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// CPU seconds (user + system, all threads) process `pid` has used so far,
/// from `/proc/PID/stat`; 0 if it is gone.
pub fn process_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is the
    // first, utime and stime the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / ticks_per_second()
}

/// irq + softirq seconds of all CPUs so far (`/proc/stat`): where the
/// kernel accounts VXLAN, veth and much of the UDP work, whatever process
/// it interrupted.
pub fn irq_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (v.get(5).copied().unwrap_or(0) + v.get(6).copied().unwrap_or(0)) as f64 / ticks_per_second()
}

/// CPU seconds of this process's waited-for children (the iperf3 clients).
pub fn children_cpu() -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Starts `iperf3 -s` and this binary's RR server in `pod` and waits until
/// both listen.
pub fn start_servers(pod: &Pod) -> Result<(Server, Server)> {
    let port = IPERF_PORT.to_string();
    let iperf = Server(pod.spawn(&["iperf3", "-s", "-p", &port], None)?);
    let exe = std::env::current_exe().context("locating this binary")?;
    let exe = exe.to_str().context("non-UTF-8 binary path")?;
    let rr_port = RR_PORT.to_string();
    let rr = Server(pod.spawn(&[exe, "rr-server", "--port", &rr_port], None)?);
    for p in [IPERF_PORT, RR_PORT] {
        netd_tests::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            let out = pod.run(&["ss", "-Hltn", &format!("sport = :{p}")])?;
            Ok(!out.trim().is_empty())
        })
        .with_context(|| format!("nothing listens on port {p} in {}", pod.ns.name()))?;
    }
    Ok((iperf, rr))
}

/// One `iperf3 -c` run of `seconds` (plus one omitted warm-up second) from
/// `client` to `server_ip`; returns (received Gbit/s, sender retransmits).
pub fn iperf(client: &Pod, server_ip: &str, seconds: u32) -> Result<(f64, u64)> {
    let port = IPERF_PORT.to_string();
    let t = seconds.to_string();
    let out = client.exec(&[
        "iperf3", "-c", server_ip, "-p", &port, "-t", &t, "-O", "1", "-J",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("iperf3 printed no JSON: {text}"))?;
    if let Some(err) = json["error"].as_str() {
        bail!("iperf3 -c {server_ip}: {err}");
    }
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received.bits_per_second in iperf3 output: {text}"))?;
    let retrans = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps / 1e9, retrans))
}

/// One RR run from `client` against the RR server at `server_ip`; returns
/// every transaction's round-trip time in microseconds.
pub fn rr(client: &Pod, server_ip: &str, count: u32) -> Result<Vec<f64>> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let exe = exe.to_str().context("non-UTF-8 binary path")?;
    let addr = format!("{server_ip}:{RR_PORT}");
    let n = count.to_string();
    let out = client.run(&[exe, "rr-client", "--addr", &addr, "--count", &n])?;
    let samples: Vec<f64> = out
        .split_whitespace()
        .map(|s| s.parse::<f64>().map(|ns| ns / 1000.0))
        .collect::<Result<_, _>>()
        .context("bad rr-client output")?;
    if samples.len() != count as usize {
        bail!(
            "rr-client returned {} samples, wanted {count}",
            samples.len()
        );
    }
    Ok(samples)
}

/// `rr-server`: answers every byte with one byte, any number of clients.
pub fn rr_server(port: u16) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    for conn in listener.incoming() {
        let mut conn = conn?;
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut byte = [0u8; 1];
            while matches!(conn.read(&mut byte), Ok(1)) {
                if conn.write_all(&byte).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// `rr-client`: `warmup` untimed then `count` timed one-byte transactions;
/// prints each round trip in nanoseconds.
pub fn rr_client(addr: &str, count: u32, warmup: u32) -> Result<()> {
    let mut conn = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut byte = [b'x'; 1];
    let mut samples = Vec::with_capacity(count as usize);
    for i in 0..warmup + count {
        let start = Instant::now();
        conn.write_all(&byte)?;
        conn.read_exact(&mut byte).context("reading the response")?;
        if i >= warmup {
            samples.push(start.elapsed().as_nanos());
        }
    }
    let mut out = String::with_capacity(samples.len() * 7);
    for s in samples {
        out.push_str(&s.to_string());
        out.push('\n');
    }
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}
