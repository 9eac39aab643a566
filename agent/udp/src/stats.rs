//! Counters: each worker thread accumulates in plain integers and adds them
//! to its own cache-line-aligned atomics once per batch; [`UdpStats`] is
//! the sum over all threads.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the datapath's counters since start. "Out" is TUN → peer
/// (encapsulated and sent), "in" is peer → TUN (received and delivered).
/// Packet and byte counts are of inner IPv4 packets (as on the wire: a
/// 64 KiB TSO super-packet sent as 45 datagrams counts 45).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpStats {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Datagrams whose source IP is not a current peer's public IP.
    pub dropped_unknown_source: u64,
    /// Packets from the TUN device whose destination is in no peer subnet.
    pub dropped_no_route: u64,
    /// Packets that are not well-formed IPv4 (either direction), or that
    /// the kernel handed us with an unsupported GSO type.
    pub dropped_malformed: u64,
    /// Packets dropped because their TTL ran out (only with
    /// `decrement_ttl`).
    pub dropped_ttl: u64,
    /// Failed system calls on the TUN device or the sockets (the packets
    /// concerned are lost).
    pub errors: u64,
    /// `read` calls that returned a packet from the TUN device.
    pub tun_reads: u64,
    /// Super-packets (TSO/USO) among them, segmented by us.
    pub gso_packets: u64,
    /// `sendmmsg` calls.
    pub udp_sends: u64,
    /// `recvmmsg` calls that returned datagrams.
    pub udp_recvs: u64,
    /// Datagrams received (a UDP GRO datagram counts once).
    pub udp_datagrams_in: u64,
    /// `writev` calls to the TUN device.
    pub tun_writes: u64,
    /// Among them, coalesced TCP super-packets.
    pub gro_packets: u64,
}

/// Indices into the counter arrays, one per [`UdpStats`] field.
#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub(crate) enum C {
    PacketsOut,
    BytesOut,
    PacketsIn,
    BytesIn,
    DroppedUnknownSource,
    DroppedNoRoute,
    DroppedMalformed,
    DroppedTtl,
    Errors,
    TunReads,
    GsoPackets,
    UdpSends,
    UdpRecvs,
    UdpDatagramsIn,
    TunWrites,
    GroPackets,
}

const N: usize = C::GroPackets as usize + 1;

/// One thread's shared counters.
#[repr(align(64))]
#[derive(Debug, Default)]
pub(crate) struct Counters([AtomicU64; N]);

/// One thread's not-yet-published increments.
#[derive(Debug, Default)]
pub(crate) struct Local([u64; N]);

impl Local {
    #[inline]
    pub fn add(&mut self, c: C, n: u64) {
        self.0[c as usize] += n;
    }

    /// Adds everything to `to` and resets.
    pub fn publish(&mut self, to: &Counters) {
        for (l, a) in self.0.iter_mut().zip(to.0.iter()) {
            if *l != 0 {
                a.fetch_add(*l, Ordering::Relaxed);
                *l = 0;
            }
        }
    }
}

impl Counters {
    pub fn add_to(&self, s: &mut UdpStats) {
        let v = |c: C| self.0[c as usize].load(Ordering::Relaxed);
        s.packets_out += v(C::PacketsOut);
        s.bytes_out += v(C::BytesOut);
        s.packets_in += v(C::PacketsIn);
        s.bytes_in += v(C::BytesIn);
        s.dropped_unknown_source += v(C::DroppedUnknownSource);
        s.dropped_no_route += v(C::DroppedNoRoute);
        s.dropped_malformed += v(C::DroppedMalformed);
        s.dropped_ttl += v(C::DroppedTtl);
        s.errors += v(C::Errors);
        s.tun_reads += v(C::TunReads);
        s.gso_packets += v(C::GsoPackets);
        s.udp_sends += v(C::UdpSends);
        s.udp_recvs += v(C::UdpRecvs);
        s.udp_datagrams_in += v(C::UdpDatagramsIn);
        s.tun_writes += v(C::TunWrites);
        s.gro_packets += v(C::GroPackets);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_sums_and_resets() {
        let c = Counters::default();
        let mut l = Local::default();
        l.add(C::PacketsIn, 3);
        l.add(C::GroPackets, 1);
        l.publish(&c);
        l.add(C::PacketsIn, 2);
        l.publish(&c);
        let mut s = UdpStats::default();
        c.add_to(&mut s);
        assert_eq!(s.packets_in, 5);
        assert_eq!(s.gro_packets, 1);
        assert_eq!(s.packets_out, 0);
        assert_eq!(l.0, [0; N]);
    }
}
