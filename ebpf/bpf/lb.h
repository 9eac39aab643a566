/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The maps (pinned by name, so every netd object shares them: sock.c and nodeport.c are
 * loaded separately and meet in the same pinned maps) and backend selection, shared by the
 * socket load balancer and the tc NodePort programs.
 */
#ifndef NETD_LB_H
#define NETD_LB_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"

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

static __always_inline int same_backend(const struct netd_backend *a, const struct netd_backend *b)
{
	return a->ip == b->ip && a->port == b->port;
}

/* Picks a backend of `svc` (count > 0). `ak` identifies the client for session affinity
 * (its `id` is filled in here). Returns 1 and fills `out`, or 0 when the slot is missing
 * (cannot happen: netd writes slots before the count that exposes them). */
static __always_inline int pick_backend(const struct netd_svc_value *svc, struct netd_affinity_key *ak,
					struct netd_backend *out)
{
	__u32 count = svc->count;
	__u64 now = 0;
	int affinity = svc->flags & NETD_SVC_F_AFFINITY;
	if (affinity) {
		ak->id = svc->id;
		now = bpf_ktime_get_ns();
		struct netd_affinity_value *av = bpf_map_lookup_elem(&netd_affinity, ak);
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
		return 0;
	*out = *be;
	if (affinity) {
		struct netd_affinity_value av = { .last_ns = now, .backend = *be, .slot = sk.slot };
		bpf_map_update_elem(&netd_affinity, ak, &av, BPF_ANY);
	}
	return 1;
}

#endif
