// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * netd NodePort, externalIP and LoadBalancer-IP traffic arriving from outside the node (tc).
 *
 *   netd_from_outside_{l2,l3}  tc ingress of the external (underlay) device and of the overlay
 *                              device:
 *     - the reply of a SNATed connection (backend -> netd_cfg.snat_ip:port, coming back through
 *       the overlay, or the underlay with direct routing): reverse NAT to frontend -> client,
 *       redirected to the device towards the client (the frontend is a local address: the
 *       stack would drop it as a martian);
 *     - a packet of a known connection: translated as its first packet was;
 *     - a new connection to a frontend: a backend is picked (session affinity by client
 *       address), DNAT to it; a backend on another node is also SNATed to this node's overlay
 *       address, so that its reply comes back here, and redirected straight to the device the
 *       route points at (again: the source is now a local address). A local backend sees
 *       the client's address (and so does every backend under externalTrafficPolicy Local,
 *       whose frontends only have local endpoints).
 *   netd_to_outside_{l2,l3}    tc egress of the external device: replies of local backends
 *                              (not SNATed, routed by the stack) get the frontend back as source.
 *
 * Packets that are not ours return TC_ACT_UNSPEC (TCX_NEXT), not TC_ACT_OK: on a TCX hook, OK
 * ends the chain, and the udp overlay's decapsulation may be attached to the same device.
 * A frontend without any endpoint is refused (ICMP port unreachable, as kube-proxy's REJECT);
 * one with a Local policy and no local endpoint drops. ClusterIPs are served too, for hosts
 * outside the node that route the service range through it.
 * IPv4 TCP/UDP only; fragments and everything else pass untouched.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <stddef.h>
#include "lb.h"

#define AF_INET 2
#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10
/* Idle time after which a SNAT port may be reused; after a FIN or RST (long enough for the
 * backend's TIME_WAIT to accept a new connection on the same tuple, short enough for
 * ~1000 new connections a second to one remote backend). */
#define CT_IDLE_TCP (3600ULL * NSEC_PER_SEC)
#define CT_IDLE_UDP (120ULL * NSEC_PER_SEC)
#define CT_IDLE_CLOSING (30ULL * NSEC_PER_SEC)
#define SNAT_TRIES 16

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct netd_cfg);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} netd_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct netd_ct_key);
	__type(value, struct netd_ct_value);
	__uint(max_entries, NETD_MAX_CT);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} netd_ct SEC(".maps");

struct pkt {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u32 l4off;
	__u8 proto;
	__u8 tcp_flags;
};

/* IPv4 TCP/UDP, not a fragment: fills `p`, returns 1. */
static __always_inline int parse(struct __sk_buff *skb, __u32 l3off, struct pkt *p)
{
	struct iphdr ip;
	__u16 ports[2];

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return 0;
	if (bpf_skb_load_bytes(skb, l3off, &ip, sizeof(ip)) < 0)
		return 0;
	if (ip.version != 4 || ip.ihl < 5 || (ip.frag_off & bpf_htons(0x3fff)))
		return 0;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return 0;
	p->l4off = l3off + ip.ihl * 4;
	if (bpf_skb_load_bytes(skb, p->l4off, ports, sizeof(ports)) < 0)
		return 0;
	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->sport = ports[0];
	p->dport = ports[1];
	p->proto = ip.protocol;
	p->tcp_flags = 0;
	if (ip.protocol == IPPROTO_TCP && bpf_skb_load_bytes(skb, p->l4off + 13, &p->tcp_flags, 1) < 0)
		return 0;
	return 1;
}

/* Rewrites the packet's addresses and ports to the given ones, fixing the IP and L4
 * checksums incrementally. */
static __always_inline int rewrite(struct __sk_buff *skb, __u32 l3off, const struct pkt *p,
				   __u32 saddr, __u16 sport, __u32 daddr, __u16 dport)
{
	__u32 csum = p->l4off + (p->proto == IPPROTO_TCP ? 16 : 6);
	/* UDP: a zero checksum means "none" and stays zero; a computed zero becomes 0xffff. */
	__u64 l4f = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (saddr != p->saddr) {
		if (bpf_l4_csum_replace(skb, csum, p->saddr, saddr, l4f | BPF_F_PSEUDO_HDR | 4) < 0 ||
		    bpf_l3_csum_replace(skb, l3off + offsetof(struct iphdr, check), p->saddr, saddr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, l3off + offsetof(struct iphdr, saddr), &saddr, 4, 0) < 0)
			return -1;
	}
	if (daddr != p->daddr) {
		if (bpf_l4_csum_replace(skb, csum, p->daddr, daddr, l4f | BPF_F_PSEUDO_HDR | 4) < 0 ||
		    bpf_l3_csum_replace(skb, l3off + offsetof(struct iphdr, check), p->daddr, daddr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, l3off + offsetof(struct iphdr, daddr), &daddr, 4, 0) < 0)
			return -1;
	}
	if (sport != p->sport) {
		if (bpf_l4_csum_replace(skb, csum, p->sport, sport, l4f | 2) < 0 ||
		    bpf_skb_store_bytes(skb, p->l4off, &sport, 2, 0) < 0)
			return -1;
	}
	if (dport != p->dport) {
		if (bpf_l4_csum_replace(skb, csum, p->dport, dport, l4f | 2) < 0 ||
		    bpf_skb_store_bytes(skb, p->l4off + 2, &dport, 2, 0) < 0)
			return -1;
	}
	return 0;
}

/* Sends the (rewritten) packet out of the device the route to `daddr` points at, with the
 * next hop's link-layer address from the neighbour table, bypassing the local stack. */
static __always_inline int redirect_routed(struct __sk_buff *skb, const struct pkt *p, __u32 saddr, __u32 daddr,
					   __u16 sport, __u16 dport)
{
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.l4_protocol = p->proto;
	fib.sport = sport;
	fib.dport = dport;
	fib.ipv4_src = saddr;
	fib.ipv4_dst = daddr;
	fib.ifindex = skb->ifindex;
	/* tot_len 0: no MTU check here (GRO packets are larger than any MTU; TCP's MSS keeps
	 * segments within the overlay's). */
	long r = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (r != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_SHOT;
	struct bpf_redir_neigh nh = { .nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst };
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

static __always_inline __u16 csum_fold(__s64 csum)
{
	__u32 sum = (__u32)csum;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* ICMP destination unreachable, port unreachable (RFC 792). */
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3

/* What a rejected packet becomes: an IP header, the ICMP header, and the original IP header with
 * the first 8 bytes of its payload (the ports, which the client matches to its socket). */
struct icmp_reject {
	struct iphdr ip;
	__u8 type;
	__u8 code;
	__u16 check;
	__u32 unused;
	struct iphdr inner;
	__u8 l4[8];
};
_Static_assert(sizeof(struct icmp_reject) == 20 + 8 + 20 + 8, "no padding: the struct is the packet");

/* Refuses `p` as kube-proxy's REJECT does: the packet is turned into an ICMP port unreachable
 * from the frontend to the client (TCP connect() fails with ECONNREFUSED at once, UDP's next
 * receive too) and sent back out of the device it came in on. Left to the stack, a packet to
 * an external IP, LB IP or ClusterIP (not this node's addresses) would be forwarded instead.
 * The checksums are computed whole. A packet that came from a local socket over a veth still
 * carries CHECKSUM_PARTIAL, which tells the receiver on the other end to trust them; nothing
 * on that path recomputes them (veth offloads checksums). */
static __always_inline int reject(struct __sk_buff *skb, __u32 l3off, const struct pkt *p)
{
	struct icmp_reject r = {};
	if (bpf_skb_load_bytes(skb, l3off, &r.inner, sizeof(r.inner)) < 0 || r.inner.ihl != 5 ||
	    bpf_skb_load_bytes(skb, p->l4off, r.l4, sizeof(r.l4)) < 0)
		return TC_ACT_SHOT; /* IP options or a truncated header: not worth an answer */
	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.tot_len = bpf_htons(sizeof(r));
	r.ip.saddr = p->daddr;
	r.ip.daddr = p->saddr;
	r.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.ip, sizeof(r.ip), 0));
	r.type = ICMP_DEST_UNREACH;
	r.code = ICMP_PORT_UNREACH;
	r.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.type, sizeof(r) - sizeof(r.ip), 0));
	if (bpf_skb_change_tail(skb, l3off + sizeof(r), 0) < 0 ||
	    bpf_skb_store_bytes(skb, l3off, &r, sizeof(r), BPF_F_RECOMPUTE_CSUM) < 0)
		return TC_ACT_SHOT;
	if (l3off == ETH_HLEN) {
		__u8 mac[12], swapped[12];
		if (bpf_skb_load_bytes(skb, 0, mac, sizeof(mac)) < 0)
			return TC_ACT_SHOT;
		__builtin_memcpy(swapped, mac + 6, 6);
		__builtin_memcpy(swapped + 6, mac, 6);
		if (bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0) < 0)
			return TC_ACT_SHOT;
	}
	return bpf_redirect(skb->ifindex, 0);
}

/* Whether `addr` is one of this node's addresses (the route lookup does not forward it). */
static __always_inline int is_local(struct __sk_buff *skb, __u32 addr)
{
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.ipv4_dst = addr;
	fib.ifindex = skb->ifindex;
	return bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH) == BPF_FIB_LKUP_RET_NOT_FWDED;
}

static __always_inline void touch(struct netd_ct_value *v, __u64 now)
{
	/* Coarse: one write a second at most, not one per packet. */
	if (now - v->last_ns > NSEC_PER_SEC)
		v->last_ns = now;
}

/* A FIN or RST: the REPLY entry `v` (the one the SNAT port allocator checks) is closing. */
static __always_inline void closing(struct netd_ct_value *v, const struct pkt *p, __u64 now)
{
	if ((p->tcp_flags & (TCPF_FIN | TCPF_RST)) && !(v->flags & NETD_CT_F_CLOSING)) {
		v->flags |= NETD_CT_F_CLOSING;
		v->last_ns = now;
	}
}

/* A free SNAT source port towards `be` (network order), or 0. */
static __always_inline __u16 snat_port(const struct netd_cfg *cfg, const struct pkt *p,
				       const struct netd_backend *be, __u64 now)
{
	__u32 min = cfg->snat_port_min, max = cfg->snat_port_max;
	if (max < min || min == 0)
		return 0;
	__u32 range = max - min + 1;
	__u32 start = bpf_get_prandom_u32() % range;
	__u64 idle = p->proto == IPPROTO_TCP ? CT_IDLE_TCP : CT_IDLE_UDP;
	struct netd_ct_key rk = {
		.saddr = be->ip, .daddr = cfg->snat_ip, .sport = be->port, .proto = p->proto, .dir = NETD_CT_REPLY,
	};
	for (int i = 0; i < SNAT_TRIES; i++) {
		rk.dport = bpf_htons((__u16)(min + (start + i) % range));
		struct netd_ct_value *v = bpf_map_lookup_elem(&netd_ct, &rk);
		if (!v || now - v->last_ns > (v->flags & NETD_CT_F_CLOSING ? CT_IDLE_CLOSING : idle))
			return rk.dport;
	}
	return 0;
}

/* Applies a FORWARD translation: routed by the stack when only the destination changed
 * (local backend), redirected when the source is now our SNAT address. */
static __always_inline int forward(struct __sk_buff *skb, __u32 l3off, const struct pkt *p,
				   const struct netd_ct_value *v)
{
	__u32 saddr = v->saddr, daddr = v->daddr, flags = v->flags;
	__u16 sport = v->sport, dport = v->dport;
	if (rewrite(skb, l3off, p, saddr, sport, daddr, dport) < 0)
		return TC_ACT_SHOT;
	if (flags & NETD_CT_F_SNAT)
		return redirect_routed(skb, p, saddr, daddr, sport, dport);
	return TC_ACT_OK;
}

static __always_inline int from_outside(struct __sk_buff *skb, __u32 l3off)
{
	struct pkt p;
	if (!parse(skb, l3off, &p))
		return TC_ACT_UNSPEC;
	__u64 now = bpf_ktime_get_ns();

	/* 1. The reply of a connection we SNATed. */
	struct netd_ct_key k = {
		.saddr = p.saddr, .daddr = p.daddr, .sport = p.sport, .dport = p.dport, .proto = p.proto, .dir = NETD_CT_REPLY,
	};
	struct netd_ct_value *v = bpf_map_lookup_elem(&netd_ct, &k);
	if (v && (v->flags & NETD_CT_F_SNAT)) {
		touch(v, now);
		closing(v, &p, now);
		__u32 saddr = v->saddr, daddr = v->daddr;
		__u16 sport = v->sport, dport = v->dport;
		if (rewrite(skb, l3off, &p, saddr, sport, daddr, dport) < 0)
			return TC_ACT_SHOT;
		return redirect_routed(skb, &p, saddr, daddr, sport, dport);
	}

	/* 2. A known connection (a new TCP connection re-picks, even on a reused tuple). */
	k.dir = NETD_CT_FORWARD;
	int syn = p.proto == IPPROTO_TCP && (p.tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
	if (!syn) {
		v = bpf_map_lookup_elem(&netd_ct, &k);
		if (v) {
			touch(v, now);
			if ((v->flags & NETD_CT_F_SNAT) && (p.tcp_flags & (TCPF_FIN | TCPF_RST))) {
				struct netd_ct_key rk = {
					.saddr = v->daddr, .daddr = v->saddr, .sport = v->dport, .dport = v->sport,
					.proto = p.proto, .dir = NETD_CT_REPLY,
				};
				struct netd_ct_value *rv = bpf_map_lookup_elem(&netd_ct, &rk);
				if (rv)
					closing(rv, &p, now);
			}
			return forward(skb, l3off, &p, v);
		}
	}

	/* 3. A new connection to a frontend? */
	struct netd_svc_key sk = { .vip = p.daddr, .port = p.dport, .proto = p.proto, .scope = NETD_SCOPE_EXTERNAL };
	struct netd_svc_value *svc = bpf_map_lookup_elem(&netd_svc, &sk);
	if (!svc) {
		sk.vip = 0; /* NodePort on every node address */
		svc = bpf_map_lookup_elem(&netd_svc, &sk);
		if (svc && !is_local(skb, p.daddr))
			svc = NULL;
	}
	if (!svc) {
		/* A ClusterIP, from a host that routes the service range through this node: served
		 * as kube-proxy does (a remote backend sees this node's SNAT address, a local one
		 * the client's, see the README). */
		sk.vip = p.daddr;
		sk.scope = NETD_SCOPE_INTERNAL;
		svc = bpf_map_lookup_elem(&netd_svc, &sk);
		if (!svc)
			return TC_ACT_UNSPEC;
	}
	if (svc->count == 0)
		return svc->flags & NETD_SVC_F_REJECT ? reject(skb, l3off, &p) : TC_ACT_SHOT;
	struct netd_affinity_key ak = { .client_ip = p.saddr };
	struct netd_backend be;
	if (!pick_backend(svc, &ak, &be))
		return TC_ACT_SHOT;

	struct netd_ct_value fwd = {
		.last_ns = now, .saddr = p.saddr, .daddr = be.ip, .sport = p.sport, .dport = be.port,
	};
	if (!be.local) {
		__u32 zero = 0;
		struct netd_cfg *cfg = bpf_map_lookup_elem(&netd_cfg, &zero);
		if (!cfg || !cfg->snat_ip)
			return TC_ACT_SHOT;
		fwd.sport = snat_port(cfg, &p, &be, now);
		if (!fwd.sport)
			return TC_ACT_SHOT;
		fwd.saddr = cfg->snat_ip;
		fwd.flags = NETD_CT_F_SNAT;
	}
	struct netd_ct_key rk = {
		.saddr = be.ip, .daddr = fwd.saddr, .sport = be.port, .dport = fwd.sport, .proto = p.proto, .dir = NETD_CT_REPLY,
	};
	struct netd_ct_value rv = {
		.last_ns = now, .saddr = p.daddr, .daddr = p.saddr, .sport = p.dport, .dport = p.sport, .flags = fwd.flags,
	};
	if (bpf_map_update_elem(&netd_ct, &rk, &rv, BPF_ANY) < 0 || bpf_map_update_elem(&netd_ct, &k, &fwd, BPF_ANY) < 0)
		return TC_ACT_SHOT;
	return forward(skb, l3off, &p, &fwd);
}

static __always_inline int to_outside(struct __sk_buff *skb, __u32 l3off)
{
	struct pkt p;
	if (!parse(skb, l3off, &p))
		return TC_ACT_UNSPEC;
	struct netd_ct_key k = {
		.saddr = p.saddr, .daddr = p.daddr, .sport = p.sport, .dport = p.dport, .proto = p.proto, .dir = NETD_CT_REPLY,
	};
	struct netd_ct_value *v = bpf_map_lookup_elem(&netd_ct, &k);
	if (!v || (v->flags & NETD_CT_F_SNAT))
		return TC_ACT_UNSPEC;
	touch(v, bpf_ktime_get_ns());
	if (rewrite(skb, l3off, &p, v->saddr, v->sport, v->daddr, v->dport) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

/* Devices with an Ethernet header (the underlay, VXLAN) and without (the udp backend's TUN). */
SEC("classifier")
int netd_from_outside_l2(struct __sk_buff *skb)
{
	return from_outside(skb, ETH_HLEN);
}

SEC("classifier")
int netd_from_outside_l3(struct __sk_buff *skb)
{
	return from_outside(skb, 0);
}

SEC("classifier")
int netd_to_outside_l2(struct __sk_buff *skb)
{
	return to_outside(skb, ETH_HLEN);
}

SEC("classifier")
int netd_to_outside_l3(struct __sk_buff *skb)
{
	return to_outside(skb, 0);
}

char _license[] SEC("license") = "GPL";
