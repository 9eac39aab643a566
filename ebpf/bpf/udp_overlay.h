/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * netd udp overlay fast path: map key/value layouts, shared by bpf/udp_overlay.c and
 * ebpf/src/udp.rs (`cargo test -p netd-ebpf layout` compares them).
 *
 * Byte order: addresses and the port in network byte order (as in packets); the rest in host
 * order.
 */
#ifndef NETD_UDP_OVERLAY_H
#define NETD_UDP_OVERLAY_H

#include <linux/types.h>

/* netd_udp_cfg[0]: what this node's datapath is. */
struct netd_udp_cfg {
	__u32 local_ip;         /* outer source; inbound datagrams must be addressed to it */
	__u16 port;             /* outer UDP port, both ends (flannel: the same on every node) */
	__u16 enabled;          /* 0: every packet is left to the userspace datapath */
	__u32 underlay_ifindex; /* encapsulated packets leave through this device */
	__u32 tun_ifindex;      /* decapsulated packets are received on this device */
};

/* netd_udp_peers: LPM trie, peer pod subnet -> the peer's public IP. */
struct netd_udp_peer_key {
	__u32 prefixlen;
	__u32 addr;
};

struct netd_udp_peer {
	__u32 ip;
	__u32 flags;
};

/* netd_udp_peer.flags */
/* The peer takes a TCP super-packet in one datagram (its lease says so; every netd does): what
 * a virtual underlay (veth) hands over when it gets a UDP-tunnel GSO packet. Other peers
 * (flanneld) get everything from the userspace datapath, whose datagrams are proper ones; all
 * of a flow takes the same path, so nothing is reordered. */
#define NETD_UDP_PEER_F_SUPER (1u << 0)

/* netd_udp_bulk: inner flows seen in bulk on receive, and when last. */
struct netd_udp_flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u32 proto;
};

#define NETD_UDP_BULK_STICKY_MS 100
#define NETD_UDP_MAX_BULK_FLOWS 65536

/* netd_udp_stats (per-CPU array) indexes. */
#define NETD_UDP_ENCAP_PACKETS 0 /* encapsulated in the kernel (GSO super-packets count once) */
#define NETD_UDP_ENCAP_BYTES   1 /* inner bytes */
#define NETD_UDP_DECAP_PACKETS 2
#define NETD_UDP_DECAP_BYTES   3
#define NETD_UDP_ENCAP_PASSED  4 /* left to userspace: no peer route, or not encapsulable */
#define NETD_UDP_DECAP_PASSED  5 /* left to userspace: unknown source, GRO batch, fragment... */
#define NETD_UDP_ENCAP_ERRORS  6 /* dropped half-way (the packet was already changed) */
#define NETD_UDP_DECAP_BULK    7 /* left to userspace as part of a bulk flow (subset of PASSED) */
#define NETD_UDP_STATS         8

#define NETD_UDP_MAX_PEERS 65536

#endif
