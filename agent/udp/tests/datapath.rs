//! End-to-end tests of the UDP datapath in network namespaces (root).
//!
//! Two namespaces joined by a veth (198.18.2.1/24 — 198.18.2.2/24); each
//! runs a datapath (started from this process on a thread that joined the
//! namespace), with 10.244.{1,2}.0/32 on its TUN device and 10.244.0.0/16
//! routed through it.

mod common;

use anyhow::Result;
use common::*;
use netd_udp::checksum;
use netd_udp::packet::{be16, fix_ipv4_checksum, put16};
use netd_udp::{UdpDatapath, UdpError};
use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

fn two_nodes(tag: &str, workers: usize) -> Result<(Pair, UdpDatapath, UdpDatapath)> {
    let pair = Pair::new(tag)?;
    let da = start_node(&pair.a, config(UNDERLAY_A, workers), TUN_ADDR_A)?;
    let db = start_node(&pair.b, config(UNDERLAY_B, workers), TUN_ADDR_B)?;
    da.set_peers(&[peer(SUBNET_B, UNDERLAY_B)]);
    db.set_peers(&[peer(SUBNET_A, UNDERLAY_A)]);
    Ok((pair, da, db))
}

#[test]
fn ping_and_tcp_transfer_across_two_nodes() -> Result<()> {
    let (pair, da, db) = two_nodes("udp-e2e", 2)?;
    let link = pair.a.ip(&["-d", "link", "show", TUN])?;
    assert!(link.contains("mtu 1472"), "{link}");
    assert!(link.contains("tun"), "{link}");
    let v6 = pair.a.ip(&["-6", "addr", "show", "dev", TUN])?;
    assert!(v6.trim().is_empty(), "IPv6 is disabled on the device: {v6}");
    let f = da.features();
    println!("features: {f:?}");
    assert_eq!(f.workers, 2);
    assert_ne!(
        f.tun_offload & libc::TUN_F_TSO4,
        0,
        "this kernel supports TSO on TUN"
    );

    assert!(ping(&pair.a, TUN_ADDR_B, 3), "ping A -> B over the overlay");
    assert!(ping(&pair.b, TUN_ADDR_A, 3), "ping B -> A over the overlay");

    let r = iperf(&pair.b, &pair.a, TUN_ADDR_B, 3, &[])?;
    println!("iperf3 A -> B over the UDP datapath: {r:?}");
    assert!(r.bytes > 0, "{r:?}");
    let r2 = iperf(&pair.a, &pair.b, TUN_ADDR_A, 2, &["-P", "2"])?;
    println!("iperf3 B -> A, 2 streams: {r2:?}");
    assert!(r2.bytes > 0, "{r2:?}");

    let (sa, sb) = (da.stats(), db.stats());
    println!("A: {sa:?}\nB: {sb:?}");
    // Everything A sent, B received (nothing unknown, nothing malformed).
    assert!(sa.packets_out > 1000 && sb.packets_in > 1000);
    assert_eq!(sa.dropped_unknown_source + sb.dropped_unknown_source, 0);
    assert_eq!(sa.dropped_malformed + sb.dropped_malformed, 0);
    assert_eq!(sa.errors + sb.errors, 0);
    // The sender got TSO super-packets and segmented them; the receiver
    // coalesced segments into GSO writes to its TUN device.
    assert!(
        sa.gso_packets > 0,
        "A segmented no TSO super-packet: {sa:?}"
    );
    assert!(sb.gro_packets > 0, "B coalesced nothing: {sb:?}");
    assert!(
        sa.packets_out > sa.tun_reads,
        "fewer reads than packets: batching works"
    );
    Ok(())
}

#[test]
fn peer_changes_take_effect_and_unrouted_packets_are_dropped() -> Result<()> {
    let (pair, da, _db) = two_nodes("udp-peers", 1)?;
    assert!(ping(&pair.a, TUN_ADDR_B, 1));
    da.set_peers(&[]);
    let before = da.stats().dropped_no_route;
    assert!(!ping(&pair.a, TUN_ADDR_B, 1), "no peer route: no answer");
    assert!(da.stats().dropped_no_route > before);
    // Unknown destinations inside the network are dropped too.
    da.set_peers(&[peer(SUBNET_B, UNDERLAY_B)]);
    let before = da.stats().dropped_no_route;
    assert!(!ping(&pair.a, "10.244.77.1", 1));
    assert!(da.stats().dropped_no_route > before);
    assert!(ping(&pair.a, TUN_ADDR_B, 1), "peer restored");
    Ok(())
}

/// An IPv4 + ICMP echo request from `src` to `dst`.
fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, id: u16, seq: u16) -> Vec<u8> {
    let payload = b"netd-udp wire test";
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    put16(&mut p, 2, total as u16);
    put16(&mut p, 4, 0x1234);
    p[8] = ttl;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    fix_ipv4_checksum(&mut p);
    p[20] = 8;
    put16(&mut p, 24, id);
    put16(&mut p, 26, seq);
    p[28..].copy_from_slice(payload);
    let c = checksum::checksum(&p[20..]);
    put16(&mut p, 22, c);
    p
}

/// A plain UDP socket in `ns` bound to `ip:8285`: a flannel peer as seen
/// on the wire.
fn flannel_socket(ns: &netd_tests::Netns, ip: &str) -> Result<UdpSocket> {
    let s = in_netns(ns, || UdpSocket::bind((ip, 8285)))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

#[test]
fn wire_compatible_with_flannel_and_unknown_sources_are_dropped() -> Result<()> {
    let pair = Pair::new("udp-wire")?;
    let da = start_node(&pair.a, config(UNDERLAY_A, 1), TUN_ADDR_A)?;
    da.set_peers(&[peer(SUBNET_B, UNDERLAY_B)]);
    let peer_sock = flannel_socket(&pair.b, UNDERLAY_B)?;
    let to_a = format!("{UNDERLAY_A}:8285");
    let pod_b: Ipv4Addr = "10.244.2.5".parse()?;
    let tun_a: Ipv4Addr = TUN_ADDR_A.parse()?;

    // Inbound: a raw echo request as the UDP payload is delivered to A's
    // TUN; A's kernel answers and the reply comes back the same way.
    let req = icmp_echo(pod_b, tun_a, 64, 0x4242, 1);
    peer_sock.send_to(&req, &to_a)?;
    let mut buf = [0u8; 2048];
    let (n, from) = peer_sock.recv_from(&mut buf)?;
    assert_eq!(from.to_string(), to_a, "reply from A's datapath port");
    let rep = &buf[..n];
    assert_eq!(
        rep.len(),
        req.len(),
        "payload is exactly the inner packet, no header"
    );
    assert_eq!(rep[0], 0x45);
    assert_eq!(usize::from(be16(rep, 2)), n);
    assert_eq!(
        checksum::fold(checksum::sum(&rep[..20], 0)),
        0xffff,
        "IP checksum"
    );
    assert_eq!(&rep[12..16], &tun_a.octets());
    assert_eq!(&rep[16..20], &pod_b.octets());
    assert_eq!(rep[9], 1);
    assert_eq!(rep[20], 0, "ICMP echo reply");
    assert_eq!(&rep[24..], &req[24..], "same id, seq and data");
    assert_eq!(rep[8], 64, "TTL not decremented by default");
    // Workers publish their counters after each batch: the reply can beat the count.
    let counted = |da: &UdpDatapath| {
        let s = da.stats();
        (s.packets_in, s.dropped_unknown_source)
    };
    eventually(Duration::from_secs(3), || counted(&da) == (1, 0));
    assert_eq!(counted(&da), (1, 0));

    // Outbound: a ping from A to a pod of B arrives as a raw IP packet.
    let mut child = pair
        .a
        .spawn(&["ping", "-c", "1", "-W", "1", "10.244.2.9"], None)?;
    let (n, from) = peer_sock.recv_from(&mut buf)?;
    let _ = child.wait();
    assert_eq!(from.to_string(), to_a);
    let out = &buf[..n];
    assert_eq!(
        (out[0], out[9], out[20]),
        (0x45, 1, 8),
        "IPv4 ICMP echo request"
    );
    assert_eq!(&out[16..20], &[10, 244, 2, 9]);

    // A datagram from an address that is not a peer's is dropped and
    // counted, and nothing answers it.
    pair.b
        .ip(&["addr", "add", "198.18.2.99/24", "dev", "eth0"])?;
    let stranger = flannel_socket(&pair.b, "198.18.2.99")?;
    stranger.set_read_timeout(Some(Duration::from_millis(700)))?;
    let before = da.stats();
    stranger.send_to(&icmp_echo(pod_b, tun_a, 64, 0x4242, 2), &to_a)?;
    assert!(eventually(Duration::from_secs(3), || da
        .stats()
        .dropped_unknown_source
        == 1));
    assert!(
        stranger.recv_from(&mut buf).is_err(),
        "no answer to a stranger"
    );
    assert_eq!(da.stats().packets_in, before.packets_in);

    // Once the stranger's address is a peer's, it is accepted.
    da.set_peers(&[
        peer(SUBNET_B, UNDERLAY_B),
        peer("10.244.3.0/24", "198.18.2.99"),
    ]);
    stranger.send_to(&icmp_echo(pod_b, tun_a, 64, 0x4242, 3), &to_a)?;
    peer_sock
        .recv_from(&mut buf)
        .expect("reply (routed to B's subnet owner)");
    assert_eq!(da.stats().dropped_unknown_source, 1);
    Ok(())
}

#[test]
fn ttl_is_decremented_when_asked() -> Result<()> {
    let pair = Pair::new("udp-ttl")?;
    let cfg = netd_udp::UdpConfig {
        decrement_ttl: true,
        ..config(UNDERLAY_A, 1)
    };
    let da = start_node(&pair.a, cfg, TUN_ADDR_A)?;
    da.set_peers(&[peer(SUBNET_B, UNDERLAY_B)]);
    let peer_sock = flannel_socket(&pair.b, UNDERLAY_B)?;
    let to_a = format!("{UNDERLAY_A}:8285");
    let (pod_b, tun_a) = ("10.244.2.5".parse()?, TUN_ADDR_A.parse()?);
    let mut buf = [0u8; 2048];

    peer_sock.send_to(&icmp_echo(pod_b, tun_a, 64, 7, 1), &to_a)?;
    let (n, _) = peer_sock.recv_from(&mut buf)?;
    assert_eq!(buf[8], 63, "reply TTL 64 decremented once on the way out");
    assert_eq!(checksum::fold(checksum::sum(&buf[..20], 0)), 0xffff);
    assert_eq!(n, 46);

    // TTL 1 cannot be decremented: dropped and counted, never delivered.
    peer_sock.set_read_timeout(Some(Duration::from_millis(700)))?;
    peer_sock.send_to(&icmp_echo(pod_b, tun_a, 1, 7, 2), &to_a)?;
    assert!(eventually(Duration::from_secs(3), || da
        .stats()
        .dropped_ttl
        == 1));
    assert!(peer_sock.recv_from(&mut buf).is_err());
    Ok(())
}

#[test]
fn device_lifecycle_and_start_errors() -> Result<()> {
    let pair = Pair::new("udp-life")?;
    let da = start_node(&pair.a, config(UNDERLAY_A, 2), TUN_ADDR_A)?;
    // A second datapath with the same device name refuses to attach to it.
    let again = in_netns(&pair.a, || {
        UdpDatapath::start(netd_udp::UdpConfig {
            port: 8286,
            ..config(UNDERLAY_A, 1)
        })
    });
    assert!(
        matches!(again, Err(UdpError::TunOpen { queue: 0, .. })),
        "{again:?}"
    );
    // Stopping removes the device (and with it its address and routes).
    da.stop();
    assert!(
        eventually(Duration::from_secs(3), || pair
            .a
            .ip(&["link", "show", TUN])
            .is_err()),
        "device gone after stop"
    );

    // The port is taken by someone without SO_REUSEPORT (flanneld, say).
    let squatter = in_netns(&pair.a, || UdpSocket::bind((UNDERLAY_A, 8285)))?;
    let err = in_netns(&pair.a, || UdpDatapath::start(config(UNDERLAY_A, 1))).unwrap_err();
    assert!(matches!(err, UdpError::Socket { worker: 0, .. }), "{err}");
    assert!(err.to_string().contains("198.18.2.1:8285"), "{err}");
    drop(squatter);
    assert!(
        eventually(Duration::from_secs(3), || pair
            .a
            .ip(&["link", "show", TUN])
            .is_err()),
        "failed start leaves no device"
    );

    // Bad configuration is refused before anything is created.
    for bad in [
        netd_udp::UdpConfig {
            tun_name: "a-name-that-is-too-long".into(),
            ..config(UNDERLAY_A, 1)
        },
        netd_udp::UdpConfig {
            mtu: 10,
            ..config(UNDERLAY_A, 1)
        },
        netd_udp::UdpConfig {
            port: 0,
            ..config(UNDERLAY_A, 1)
        },
        netd_udp::UdpConfig {
            workers: 1000,
            ..config(UNDERLAY_A, 1)
        },
    ] {
        // In the namespace all the same, should validation ever let one by.
        let r = in_netns(&pair.a, || UdpDatapath::start(bad));
        assert!(matches!(r, Err(UdpError::Config(_))), "{r:?}");
    }
    Ok(())
}

/// A persistent device outlives its datapath with its address and routes,
/// the next datapath adopts it and carries traffic at once, and `remove`
/// deletes it.
#[test]
fn a_persistent_device_is_adopted_by_the_next_datapath() -> Result<()> {
    let pair = Pair::new("udp-persist")?;
    let persist = |local| netd_udp::UdpConfig {
        persist: true,
        ..config(local, 2)
    };
    let da = start_node(&pair.a, persist(UNDERLAY_A), TUN_ADDR_A)?;
    assert!(!da.adopted(), "created, not adopted");
    let db = start_node(&pair.b, config(UNDERLAY_B, 1), TUN_ADDR_B)?;
    da.set_peers(&[peer(SUBNET_B, UNDERLAY_B)]);
    db.set_peers(&[peer(SUBNET_A, UNDERLAY_A)]);
    assert!(ping(&pair.a, TUN_ADDR_B, 1));
    da.stop();
    // Still there, with what the caller installed; nobody reads it now.
    let addr = pair.a.ip(&["-4", "addr", "show", "dev", TUN])?;
    assert!(addr.contains(&format!("{TUN_ADDR_A}/32")), "{addr}");
    let route = pair.a.ip(&["route", "show", NETWORK])?;
    assert!(route.contains(TUN), "{route}");
    assert!(!ping(&pair.a, TUN_ADDR_B, 1), "no datapath, no traffic");

    let da = in_netns(&pair.a, || UdpDatapath::start(persist(UNDERLAY_A)))?;
    assert!(da.adopted());
    assert_ne!(
        da.features().tun_offload & libc::TUN_F_TSO4,
        0,
        "offloads set again"
    );
    da.set_peers(&[peer(SUBNET_B, UNDERLAY_B)]);
    assert!(
        ping(&pair.a, TUN_ADDR_B, 1),
        "the adopted device carries traffic"
    );
    let r = iperf(&pair.b, &pair.a, TUN_ADDR_B, 1, &[])?;
    assert!(r.bytes > 0, "{r:?}");

    da.remove()?;
    assert!(
        eventually(Duration::from_secs(3), || pair
            .a
            .ip(&["link", "show", TUN])
            .is_err()),
        "remove deletes a persistent device"
    );
    Ok(())
}

/// xorshift bytes: cheap, deterministic, incompressible.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[test]
fn tcp_stream_content_survives_segmentation_and_coalescing() -> Result<()> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let (pair, da, db) = two_nodes("udp-tcp", 2)?;
    let data = pattern(48 << 20, 0x5eed);
    let listener = in_netns(&pair.b, || TcpListener::bind((TUN_ADDR_B, 7000)))?;
    let reader = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut conn, _) = listener.accept()?;
        let mut got = Vec::new();
        conn.read_to_end(&mut got)?;
        Ok(got)
    });
    let mut conn = in_netns(&pair.a, || TcpStream::connect((TUN_ADDR_B, 7000)))?;
    // Uneven writes so that super-packets end at odd places.
    for chunk in data.chunks(1_000_003) {
        conn.write_all(chunk)?;
    }
    drop(conn);
    let got = reader.join().expect("reader thread")?;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "received bytes differ from the sent ones");
    assert!(
        eventually(Duration::from_secs(2), || da.stats().gso_packets > 0
            && db.stats().gro_packets > 0),
        "offload paths used: {:?} {:?}",
        da.stats(),
        db.stats()
    );
    Ok(())
}

#[test]
fn udp_gso_from_an_application_is_segmented() -> Result<()> {
    use std::os::fd::AsRawFd;
    let (pair, da, db) = two_nodes("udp-uso", 1)?;
    let rx = in_netns(&pair.b, || UdpSocket::bind((TUN_ADDR_B, 9999)))?;
    rx.set_read_timeout(Some(Duration::from_secs(2)))?;
    let tx = in_netns(&pair.a, || UdpSocket::bind((TUN_ADDR_A, 0)))?;
    let seg: libc::c_int = 1000;
    // SAFETY: UDP_SEGMENT takes one int, passed with its size.
    let r = unsafe {
        libc::setsockopt(
            tx.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            &seg as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
    let data = pattern(9500, 77);
    tx.send_to(&data, (TUN_ADDR_B, 9999))?;
    let mut buf = [0u8; 2000];
    let mut got = Vec::new();
    for _ in 0..10 {
        let n = rx.recv(&mut buf)?;
        got.push(buf[..n].to_vec());
    }
    assert_eq!(
        got.iter().map(Vec::len).collect::<Vec<_>>(),
        [1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 500]
    );
    assert_eq!(got.concat(), data);
    // Counters are published after each batch, possibly just after the
    // application got its data.
    assert!(eventually(Duration::from_secs(2), || db.stats().packets_in
        == 10
        && da.stats().packets_out == 10));
    let sa = da.stats();
    if da.features().tun_offload & libc::TUN_F_USO4 != 0 {
        assert_eq!(
            sa.gso_packets, 1,
            "one USO super-packet from the TUN: {sa:?}"
        );
    }
    Ok(())
}
