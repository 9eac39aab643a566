// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * netd udp overlay fast path: flannel's `udp` backend wire format (the inner IPv4 packet as the
 * payload of a UDP datagram between the nodes' public IPs, port 8285 by default), encapsulated
 * and decapsulated in the kernel, on tc hooks, instead of by the userspace datapath.
 *
 *   netd_udp_encap  tc egress of the TUN device (an L3 device: the packet starts at the IP
 *                   header). A packet for a peer's pod subnet gets the outer IPv4 + UDP header
 *                   (bpf_skb_adjust_room with the ENCAP flags, so a GSO super-packet stays one
 *                   and is segmented as a UDP tunnel packet further down), a link-layer header,
 *                   and leaves through the underlay device (bpf_redirect_neigh: route and
 *                   neighbour of the peer's public IP). It never reaches the TUN queue.
 *   netd_udp_decap  tc ingress of the underlay device. A datagram to this node's public IP and
 *                   the overlay port, from a peer's public IP in the current leases, holding
 *                   exactly one inner IPv4 packet, loses its outer headers and is received on
 *                   the TUN device (bpf_redirect with BPF_F_INGRESS), as if the userspace
 *                   datapath had written it there.
 *
 * Everything else is left to the userspace datapath (TC_ACT_UNSPEC: TCX_NEXT, so that other
 * programs on the hook, netd's NodePort translation on the underlay, still see it; TC_ACT_OK
 * would end the chain), which keeps its own rules and
 * counters: no peer for the destination (dropped and counted there), a peer that does not
 * take super-packets (flanneld: see NETD_UDP_PEER_F_SUPER), a source that is not a peer
 * (dropped and counted there), fragments, IP options, and bulk on receive (see bulk()).
 * Datagrams of other ports or addresses are not ours and pass untouched.
 *
 * To a peer that says it takes them (every netd: NETD_UDP_PEER_F_SUPER), a GSO super-packet goes
 * out as one skb; a real NIC (or the kernel's GSO) cuts it into proper datagrams, a veth hands it
 * over whole and the receiver's userspace datapath writes it to its TUN device as a GSO packet.
 * Over a veth, the inner checksum may also stay partial (CHECKSUM_PARTIAL crosses namespaces),
 * which the kernel decap keeps as such and the userspace datapath knows how to complete.
 *
 * The outer header: DF set (it fits the underlay MTU: the TUN MTU is the underlay's minus 28),
 * TTL 64, the inner DSCP (not ECN: nobody would carry an outer CE mark back into the inner
 * header), UDP checksum 0 (allowed for IPv4; the inner packet has its own checksums), source
 * and destination port both the overlay port, as flannel's socket bound to it sends.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "udp_overlay.h"

#define OUTER_LEN (sizeof(struct iphdr) + sizeof(struct udphdr))
#define IP_DF 0x4000

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct netd_udp_cfg);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} netd_udp_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct netd_udp_peer_key);
	__type(value, struct netd_udp_peer);
	__uint(max_entries, NETD_UDP_MAX_PEERS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} netd_udp_peers SEC(".maps");

/* Public IPs inbound datagrams are accepted from (value unused). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u8);
	__uint(max_entries, NETD_UDP_MAX_PEERS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} netd_udp_srcs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct netd_udp_flow);
	__type(value, __u64);
	__uint(max_entries, NETD_UDP_MAX_BULK_FLOWS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} netd_udp_bulk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, NETD_UDP_STATS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} netd_udp_stats SEC(".maps");

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&netd_udp_stats, &idx);

	if (v)
		*v += n;
}

static __always_inline struct netd_udp_cfg *config(void)
{
	__u32 zero = 0;
	struct netd_udp_cfg *cfg = bpf_map_lookup_elem(&netd_udp_cfg, &zero);

	return cfg && cfg->enabled ? cfg : 0;
}

static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0);

	if (sum < 0)
		return 0;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

struct outer {
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
} __attribute__((packed));

SEC("classifier")
int netd_udp_encap(struct __sk_buff *skb)
{
	struct netd_udp_cfg *cfg = config();
	struct netd_udp_peer_key key = { .prefixlen = 32 };
	struct netd_udp_peer *peer;
	struct iphdr inner;
	struct outer o = {};
	struct iphdr ip = {};
	__u32 len = skb->len;

	if (!cfg)
		return TC_ACT_UNSPEC;
	if (skb->protocol != bpf_htons(ETH_P_IP) || bpf_skb_load_bytes(skb, 0, &inner, sizeof(inner)) < 0 ||
	    inner.version != 4 || len > 0xffff - OUTER_LEN)
		goto pass;
	/* adjust_room and change_head refuse a non-GSO skb over SKB_MAX_ALLOC (16 KiB with 4 KiB
	 * pages): keep such packets (TUN MTU over 16 KiB) away from the half-way failure. */
	if (!skb->gso_size && len + sizeof(struct outer) > 16 * 1024 - 512)
		goto pass;
	key.addr = inner.daddr;
	peer = bpf_map_lookup_elem(&netd_udp_peers, &key);
	if (!peer || !(peer->flags & NETD_UDP_PEER_F_SUPER))
		goto pass;
	/* Room for the outer IP + UDP header in front of the inner packet (the skb has no
	 * link-layer header here). On failure nothing changed: userspace takes it. FIXED_GSO:
	 * the inner MSS already fits (TUN MTU = underlay MTU - 28). */
	if (bpf_skb_adjust_room(skb, OUTER_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
					BPF_F_ADJ_ROOM_ENCAP_L4_UDP) < 0)
		goto pass;
	/* A link-layer header for bpf_redirect_neigh, which fills in the addresses. */
	if (bpf_skb_change_head(skb, sizeof(struct ethhdr), 0) < 0)
		goto drop;
	ip.version = 4;
	ip.ihl = 5;
	ip.tos = inner.tos & 0xfc;
	ip.tot_len = bpf_htons(len + OUTER_LEN);
	ip.frag_off = bpf_htons(IP_DF);
	ip.ttl = 64;
	ip.protocol = IPPROTO_UDP;
	ip.saddr = cfg->local_ip;
	ip.daddr = peer->ip;
	ip.check = ip_checksum(&ip);
	o.eth.h_proto = bpf_htons(ETH_P_IP);
	o.ip = ip;
	o.udp.source = cfg->port;
	o.udp.dest = cfg->port;
	o.udp.len = bpf_htons(len + sizeof(struct udphdr));
	if (bpf_skb_store_bytes(skb, 0, &o, sizeof(o), 0) < 0)
		goto drop;
	count(NETD_UDP_ENCAP_PACKETS, 1);
	count(NETD_UDP_ENCAP_BYTES, len);
	return bpf_redirect_neigh(cfg->underlay_ifindex, 0, 0, 0);
pass:
	count(NETD_UDP_ENCAP_PASSED, 1);
	return TC_ACT_UNSPEC;
drop:
	count(NETD_UDP_ENCAP_ERRORS, 1);
	return TC_ACT_SHOT;
}

/* 20 + 8 + 20 bytes, 4-byte aligned: no padding, no need to pack it. */
struct encapsulated {
	struct iphdr ip;
	struct udphdr udp;
	struct iphdr inner;
};
_Static_assert(sizeof(struct encapsulated) == 48, "encapsulated headers are 48 bytes");

#define INNER_OFF (sizeof(struct ethhdr) + OUTER_LEN)
#define MAX_GRO_SEGS 64

/* The flow of the inner packet `ip` found at `off` (ports 0 when it has none: not TCP/UDP, a
 * fragment). */
static __always_inline int flow_of(struct __sk_buff *skb, __u32 off, const struct iphdr *ip, struct netd_udp_flow *f)
{
	__u16 ports[2] = {};

	if ((ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) && !(ip->frag_off & bpf_htons(0x3fff)) &&
	    bpf_skb_load_bytes(skb, off + ip->ihl * 4, ports, sizeof(ports)) < 0)
		return 0;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->sport = ports[0];
	f->dport = ports[1];
	f->proto = ip->protocol;
	return 1;
}

/* The flow of the inner packet at `off`, which is yet to be read. */
static __always_inline int inner_flow(struct __sk_buff *skb, __u32 off, struct netd_udp_flow *f)
{
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.version != 4)
		return 0;
	return flow_of(skb, off, &ip, f);
}

static __always_inline void mark_bulk(struct __sk_buff *skb, __u32 off, __u64 now)
{
	struct netd_udp_flow f;

	if (inner_flow(skb, off, &f))
		bpf_map_update_elem(&netd_udp_bulk, &f, &now, BPF_ANY);
}

/*
 * Bulk on receive. Two kinds of skb hold more than one inner packet's worth, and only the
 * userspace datapath can take them apart well: a UDP GRO batch (datagrams of one peer merged
 * for the userspace socket, which has UDP_GRO) and a super-packet (one TCP packet of up to
 * 64 KiB a peer's kernel encapsulated whole and a veth underlay delivered unsegmented: after a
 * decap here it would keep skb->encapsulation, and the pod bridge, without tunnel offloads,
 * would cut it into MTU-sized packets; Linux < 6.19 has no adjust_room flag to clear it).
 * Their flows are remembered, and their single datagrams follow them to userspace for
 * NETD_UDP_BULK_STICKY_MS after the last bulk skb: were a flow's small packets decapsulated
 * here while its bulk waits in the userspace queue, TCP would see them reordered.
 */
static __always_inline int bulk(struct __sk_buff *skb, __u32 inner_len, const struct iphdr *inner)
{
	__u16 inner_tot_len = bpf_ntohs(inner->tot_len);
	__u64 now = bpf_ktime_get_ns();
	struct netd_udp_flow f;
	__u64 *seen;
	int have = flow_of(skb, INNER_OFF, inner, &f);

	if (skb->gso_segs > 1 || inner_tot_len != inner_len) {
		if (have)
			bpf_map_update_elem(&netd_udp_bulk, &f, &now, BPF_ANY);
		/* A GRO batch: the other inner packets start every gso_size bytes. */
		if (inner_tot_len != inner_len && skb->gso_size) {
			for (__u32 i = 1; i < MAX_GRO_SEGS; i++) {
				__u32 off = i * skb->gso_size;

				if (off >= inner_len)
					break;
				mark_bulk(skb, INNER_OFF + off, now);
			}
		}
		return 1;
	}
	if (!have)
		return 0;
	seen = bpf_map_lookup_elem(&netd_udp_bulk, &f);
	return seen && now - *seen < NETD_UDP_BULK_STICKY_MS * 1000000ULL;
}

SEC("classifier")
int netd_udp_decap(struct __sk_buff *skb)
{
	struct netd_udp_cfg *cfg = config();
	struct encapsulated h;
	__u32 inner_len;

	if (!cfg || skb->protocol != bpf_htons(ETH_P_IP) ||
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &h, sizeof(h)) < 0)
		return TC_ACT_UNSPEC;
	if (h.ip.version != 4 || h.ip.protocol != IPPROTO_UDP || h.ip.daddr != cfg->local_ip ||
	    h.udp.dest != cfg->port)
		return TC_ACT_UNSPEC; /* not overlay traffic */
	inner_len = skb->len - INNER_OFF;
	if (h.ip.ihl != 5 || (h.ip.frag_off & bpf_htons(0x3fff)) ||
	    bpf_ntohs(h.ip.tot_len) != skb->len - sizeof(struct ethhdr) || h.inner.version != 4)
		goto pass;
	if (!bpf_map_lookup_elem(&netd_udp_srcs, &h.ip.saddr))
		goto pass;
	if (bulk(skb, inner_len, &h.inner)) {
		count(NETD_UDP_DECAP_BULK, 1);
		goto pass;
	}
	if (bpf_skb_adjust_room(skb, -(__s32)OUTER_LEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO) < 0)
		goto pass;
	count(NETD_UDP_DECAP_PACKETS, 1);
	count(NETD_UDP_DECAP_BYTES, inner_len);
	return bpf_redirect(cfg->tun_ifindex, BPF_F_INGRESS);
pass:
	count(NETD_UDP_DECAP_PASSED, 1);
	return TC_ACT_UNSPEC;
}

char _license[] SEC("license") = "GPL";
