#!/usr/bin/env bash
# `netd apply` of SERVICES Services (+ one EndpointSlice each) into a real etcd (example
# `apply_bench` of crate netd-proxy): prints the seconds for parsing + validating the file, for
# writing it, and for applying it again (all unchanged), and checks that every Service was
# stored with a ClusterIP of its own.
#
#   sudo bench/registry/run.sh                   # 10,000 Services, release build
#   SERVICES=1000 PROFILE=dev bench/registry/run.sh
#
# etcd runs in a network namespace named ntb-<pid>-* (removed at the end, also on failure).
# Needs root, etcd and etcdctl. The machine may be shared: the load average is printed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
cargo run --profile "${PROFILE:-release}" -p netd-proxy --example apply_bench -- --services "${SERVICES:-10000}" "$@"
