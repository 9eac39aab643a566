// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * netd socket-level load balancing for ClusterIPs (cgroup v2 sock_addr hooks).
 *
 *   connect4     TCP/UDP connect() to VIP:port  -> rewrite to a backend
 *   sendmsg4     unconnected UDP sendto(VIP)    -> rewrite to a backend
 *   recvmsg4     UDP replies from the backend   -> shown as coming from VIP:port
 *   getpeername4 connected sockets              -> peer shown as VIP:port
 *
 * No per-packet NAT: the socket talks to the backend directly. A service without any
 * endpoint refuses connect()/sendmsg() with ECONNREFUSED (bpf_set_retval, kernel >= 5.18;
 * older kernels report EPERM).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"

#define ECONNREFUSED 111
#define NSEC_PER_SEC 1000000000ULL

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct netd_svc_key);
	__type(value, struct netd_svc_value);
	__uint(max_entries, NETD_MAX_SERVICES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} netd_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct netd_slot_key);
	__type(value, struct netd_backend);
	__uint(max_entries, NETD_MAX_SLOTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} netd_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct netd_affinity_key);
	__type(value, struct netd_affinity_value);
	__uint(max_entries, NETD_MAX_AFFINITY);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} netd_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct netd_revnat_key);
	__type(value, struct netd_revnat_value);
	__uint(max_entries, NETD_MAX_REVNAT);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} netd_revnat SEC(".maps");

static __always_inline int same_backend(const struct netd_backend *a, const struct netd_backend *b)
{
	return a->ip == b->ip && a->port == b->port;
}

/* Picks a backend for frontend `key`. Returns 1 and fills `out` on success, 0 when the
 * frontend is not a service, -1 when the service must be refused. */
static __always_inline int pick_backend(struct bpf_sock_addr *ctx, struct netd_svc_key *key,
					struct netd_backend *out)
{
	struct netd_svc_value *svc = bpf_map_lookup_elem(&netd_svc, key);
	if (!svc)
		return 0;
	__u32 count = svc->count;
	if (count == 0)
		return -1;

	struct netd_affinity_key ak = {};
	__u64 now = 0;
	int affinity = svc->flags & NETD_SVC_F_AFFINITY;
	if (affinity) {
		ak.netns = bpf_get_netns_cookie(ctx);
		ak.id = svc->id;
		now = bpf_ktime_get_ns();
		struct netd_affinity_value *av = bpf_map_lookup_elem(&netd_affinity, &ak);
		if (av && now - av->last_ns <= (__u64)svc->affinity_timeout * NSEC_PER_SEC &&
		    av->slot >= 1 && av->slot <= count) {
			/* Still valid only if that slot still holds that backend. */
			struct netd_slot_key sk = { .id = svc->id, .slot = av->slot };
			struct netd_backend *be = bpf_map_lookup_elem(&netd_slots, &sk);
			if (be && same_backend(be, &av->backend)) {
				*out = *be;
				av->last_ns = now;
				return 1;
			}
		}
	}

	struct netd_slot_key sk = { .id = svc->id, .slot = bpf_get_prandom_u32() % count + 1 };
	struct netd_backend *be = bpf_map_lookup_elem(&netd_slots, &sk);
	if (!be)
		return -1; /* cannot happen: netd writes slots before the count that exposes them */
	*out = *be;
	if (affinity) {
		struct netd_affinity_value av = { .last_ns = now, .backend = *be, .slot = sk.slot };
		bpf_map_update_elem(&netd_affinity, &ak, &av, BPF_ANY);
	}
	return 1;
}

static __always_inline int lb4(struct bpf_sock_addr *ctx)
{
	struct netd_svc_key key = {
		.vip = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
		.proto = (__u8)ctx->protocol,
		.scope = NETD_SCOPE_INTERNAL,
	};
	struct netd_backend be;
	int r = pick_backend(ctx, &key, &be);
	if (r == 0)
		return 1;
	if (r < 0) {
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	struct netd_revnat_key rk = { .cookie = bpf_get_socket_cookie(ctx), .ip = be.ip, .port = be.port };
	struct netd_revnat_value rv = { .vip = key.vip, .port = key.port };
	bpf_map_update_elem(&netd_revnat, &rk, &rv, BPF_ANY);
	ctx->user_ip4 = be.ip;
	ctx->user_port = be.port;
	return 1;
}

SEC("cgroup/connect4")
int netd_connect4(struct bpf_sock_addr *ctx)
{
	return lb4(ctx);
}

SEC("cgroup/sendmsg4")
int netd_sendmsg4(struct bpf_sock_addr *ctx)
{
	return lb4(ctx);
}

static __always_inline void revnat4(struct bpf_sock_addr *ctx)
{
	struct netd_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.ip = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
	};
	struct netd_revnat_value *rv = bpf_map_lookup_elem(&netd_revnat, &rk);
	if (rv) {
		ctx->user_ip4 = rv->vip;
		ctx->user_port = rv->port;
	}
}

SEC("cgroup/recvmsg4")
int netd_recvmsg4(struct bpf_sock_addr *ctx)
{
	revnat4(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int netd_getpeername4(struct bpf_sock_addr *ctx)
{
	revnat4(ctx);
	return 1;
}

char _license[] SEC("license") = "GPL";
