/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * netd eBPF service dataplane: map key/value layouts.
 *
 * THE single definition of the layouts shared by the BPF programs (C) and netd (Rust,
 * ebpf/src/maps.rs). `cargo test -p netd-ebpf layout` compiles this header with the host
 * compiler and compares every size and offset with the Rust #[repr(C)] types.
 *
 * Byte order: addresses and ports are stored in network byte order (as in struct
 * bpf_sock_addr and in packets); everything else in host order.
 */
#ifndef NETD_MAPS_H
#define NETD_MAPS_H

#include <linux/types.h>

/* Frontend scopes (svc_key.scope). */
#define NETD_SCOPE_INTERNAL 0 /* ClusterIP: socket LB (cgroup hooks) */
#define NETD_SCOPE_EXTERNAL 1 /* NodePort / externalIP / LB IP: tc. vip 0 = any node address */

/* svc_value.flags */
#define NETD_SVC_F_REJECT   (1u << 0) /* no endpoints at all: refuse (ECONNREFUSED) */
#define NETD_SVC_F_AFFINITY (1u << 1) /* sessionAffinity ClientIP */
#define NETD_SVC_F_LOCAL    (1u << 2) /* traffic policy Local: keep client IP (no SNAT) */

/* Map sizes (max_entries); netd may override them at load time. */
#define NETD_MAX_SERVICES  262144
#define NETD_MAX_SLOTS     2097152
#define NETD_MAX_AFFINITY  262144
#define NETD_MAX_REVNAT    262144
#define NETD_MAX_CT        262144

/* netd_cfg: SNAT source ports of NodePort/external traffic sent to other nodes' backends.
 * Below Linux's default ephemeral range (32768-60999), so they never collide with the
 * node's own connections from the overlay address (whose source ports come from that range). */
#define NETD_SNAT_PORT_MIN 1024
#define NETD_SNAT_PORT_MAX 32767

/* netd_ct_key.dir */
#define NETD_CT_FORWARD 0 /* client -> frontend, as it arrives on the external device */
#define NETD_CT_REPLY   1 /* backend -> client (or -> SNAT address), as the reply comes back */

/* netd_ct_value.flags */
#define NETD_CT_F_SNAT    (1u << 0) /* source rewritten to netd_cfg.snat_ip: redirected, not routed */
#define NETD_CT_F_CLOSING (1u << 1) /* TCP FIN or RST seen: its SNAT port is free again soon */

/* netd_svc: frontend -> service. */
struct netd_svc_key {
	__u32 vip;   /* be */
	__u16 port;  /* be */
	__u8 proto;  /* IPPROTO_TCP/UDP/SCTP */
	__u8 scope;  /* NETD_SCOPE_* */
};

struct netd_svc_value {
	__u32 id;               /* backend set id (netd_slots key) */
	__u32 count;            /* slots 1..=count are valid; 0: no endpoints */
	__u32 flags;            /* NETD_SVC_F_* */
	__u32 affinity_timeout; /* seconds, with NETD_SVC_F_AFFINITY */
};

/* netd_slots: (id, slot) -> backend. Slot 0 is unused. */
struct netd_slot_key {
	__u32 id;
	__u32 slot;
};

struct netd_backend {
	__u32 ip;    /* be */
	__u16 port;  /* be */
	__u8 local;  /* on this node */
	__u8 pad;
};

/* netd_affinity (LRU): (id, client) -> backend last chosen. The socket hooks identify the
 * client by its network namespace cookie (its source address is not known at connect()),
 * tc by its source address (client_ip, netns 0). */
struct netd_affinity_key {
	__u64 netns;
	__u32 id;
	__u32 client_ip; /* be */
};

struct netd_affinity_value {
	__u64 last_ns; /* bpf_ktime_get_ns() of the last use */
	struct netd_backend backend;
	__u32 slot;
	__u32 pad;
};

/* netd_revnat (LRU): (socket cookie, backend) -> frontend, so recvmsg4/getpeername4 show
 * the service address to the application. */
struct netd_revnat_key {
	__u64 cookie;
	__u32 ip;   /* be */
	__u16 port; /* be */
	__u16 pad;
};

struct netd_revnat_value {
	__u32 vip;  /* be */
	__u16 port; /* be */
	__u16 pad;
};

/* netd_ct (LRU): the connections tc translated (NodePort, externalIP, LB IP from outside).
 * Two entries per connection: FORWARD keyed by the packet as the client sent it, REPLY keyed
 * by the backend's answer as it comes back; each value is what the packet's addresses and
 * ports become. */
struct netd_ct_key {
	__u32 saddr; /* be */
	__u32 daddr; /* be */
	__u16 sport; /* be */
	__u16 dport; /* be */
	__u8 proto;
	__u8 dir;    /* NETD_CT_* */
	__u16 pad;
};

struct netd_ct_value {
	__u64 last_ns; /* last packet seen (refreshed at most once a second) */
	__u32 saddr;   /* be */
	__u32 daddr;   /* be */
	__u16 sport;   /* be */
	__u16 dport;   /* be */
	__u32 flags;   /* NETD_CT_F_* */
};

/* netd_cfg (array, one entry, key 0): per-node settings rendered from the plan's node. */
struct netd_cfg {
	__u32 snat_ip;       /* be: this node's overlay address (its pod subnet's network address,
	                      * which remote nodes route back through the overlay); 0: none */
	__u16 snat_port_min; /* host order */
	__u16 snat_port_max; /* host order */
};

#endif
