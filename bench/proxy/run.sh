#!/usr/bin/env bash
# Service proxy benchmark (kube-proxy's job), netd against kube-proxy-style rulesets for the
# same services, in the same run:
#   - full sync of SERVICES services x ENDPOINTS endpoints (netd nftables over netlink; anchors:
#     iptables-legacy-restore, `nft -f` of kube-proxy's nftables layout, iptables-nft-restore;
#     the slow anchors are measured at ANCHOR services and extrapolated, which the output says);
#   - one endpoint change with SERVICES services present (median of 21);
#   - restart adoption (read the table back, change nothing);
#   - new TCP connections/s through a ClusterIP with SERVICES services vs with 1;
#   - RSS of netd's proxy state apart from the generated objects.
#
#   sudo bench/proxy/run.sh                      # 10,000 x 10
#   SERVICES=1000 bench/proxy/run.sh
#   bench/proxy/run.sh --netd-only               # netd's figures only (fast)
#
# Everything runs in network namespaces named ntb-<pid>-* (removed at the end, also on failure;
# the test bed reaps what a killed run leaves). Needs root, nft, iptables-legacy, iptables-nft.
# The machine may be shared: compare netd with the anchors of the same run, not across runs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
cargo run --release -p netd-proxy --example bench -- \
  --services "${SERVICES:-10000}" --endpoints "${ENDPOINTS:-10}" --anchor-services "${ANCHOR:-1000}" "$@"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
