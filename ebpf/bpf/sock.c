// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * netd socket-level load balancing for ClusterIPs (cgroup v2 sock_addr hooks).
 *
 *   connect4     TCP/UDP connect() to VIP:port  -> rewrite to a backend
 *   sendmsg4     unconnected UDP sendto(VIP)    -> rewrite to a backend
 *   recvmsg4     UDP replies from the backend   -> shown as coming from VIP:port
 *   getpeername4 connected sockets              -> peer shown as VIP:port
 *
 * No per-packet NAT: the socket talks to the backend directly. A frontend without an endpoint
 * to pick (none at all, or none on this node under internalTrafficPolicy Local) refuses
 * connect()/sendmsg() with ECONNREFUSED (bpf_set_retval, kernel >= 5.18; older kernels report
 * EPERM): where kube-proxy drops, the client fails at once instead of waiting (README).
 */
#include "lb.h"

#define ECONNREFUSED 111

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct netd_revnat_key);
	__type(value, struct netd_revnat_value);
	__uint(max_entries, NETD_MAX_REVNAT);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} netd_revnat SEC(".maps");

/* Picks a backend for frontend `key`. Returns 1 and fills `out` on success, 0 when the
 * frontend is not a service, -1 when the service must be refused. */
static __always_inline int lookup_and_pick(struct bpf_sock_addr *ctx, struct netd_svc_key *key,
					   struct netd_backend *out)
{
	/* The internal scope holds ClusterIPs, and the external frontends of externalTrafficPolicy
	 * Local services with the cluster's endpoints: pods and the node are not "outside". */
	struct netd_svc_value *svc = bpf_map_lookup_elem(&netd_svc, key);
	if (!svc) {
		/* Not a ClusterIP: maybe this node's NodePort or an external IP (hairpin from a
		 * pod or the host), balanced here too instead of by the tc programs. Exact
		 * addresses only (a "any node address" NodePort has vip 0 and stays with tc). */
		key->scope = NETD_SCOPE_EXTERNAL;
		svc = bpf_map_lookup_elem(&netd_svc, key);
		key->scope = NETD_SCOPE_INTERNAL;
		if (!svc)
			return 0;
	}
	if (svc->count == 0)
		return -1; /* no endpoints (or none local under a Local policy): fail fast */
	struct netd_affinity_key ak = { .netns = bpf_get_netns_cookie(ctx) };
	return pick_backend(svc, &ak, out) ? 1 : -1;
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
	int r = lookup_and_pick(ctx, &key, &be);
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
