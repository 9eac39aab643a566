#!/usr/bin/env bash
# CNI data-path benchmark: netd-cni vs Debian's reference bridge + host-local,
# in the same run, on the same machine.
#
#   sudo bench/cni/run.sh            # N=100 pods, PAR=8
#   N=200 PAR=4 bench/cni/run.sh
#
# For each plugin, in its own "node" network namespace (bridge, IPAM state and
# veths live there; the root namespace is never touched):
#   1. ADD N pods one after another, then DEL them one after another:
#      per-call latency, median and p99 (nearest rank);
#   2. ADD N pods with PAR calls in flight, then DEL them the same way:
#      pods/s (N / wall time).
# Each call is a fork+exec of the plugin with the CNI_* environment and the
# config on stdin, as a runtime does it (the reference bridge also execs
# host-local). Pod namespaces are created beforehand and not timed.
#
# Needs: root, iproute2, containernetworking-plugins (/usr/lib/cni), and the
# release build of netd-cni (built here if missing; NETD_CNI=path overrides).
# Everything is named ntb-<pid>-*, so the netd test bed reaps what a killed
# run leaves behind; a normal exit cleans up itself.
set -euo pipefail
export LC_ALL=C

N=${N:-100}
PAR=${PAR:-8}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
REF_DIR=${CNI_PLUGINS:-/usr/lib/cni}
SELF=$(readlink -f "${BASH_SOURCE[0]}")

# ---------------------------------------------------------------------------
# Inner mode: runs inside a node namespace, prints "add_med add_p99 del_med
# del_p99 add_pps del_pps" (ms, ms, ms, ms, pods/s, pods/s).
# ---------------------------------------------------------------------------
if [[ "${1:-}" == "--inner" ]]; then
    BIN=$2 CONF=$3 PREFIX=$4 OUT=$5
    export BIN CONF PREFIX OUT REF_DIR

    stats() { # FILE of microseconds -> "median p99" in ms
        sort -n "$1" | awk '{v[NR]=$1/1000} END {
            m = (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2;
            r = int(0.99 * NR); if (r < 0.99 * NR) r++; if (r < 1) r = 1;
            printf "%.2f %.2f", m, v[r] }'
    }

    seq_phase() { # COMMAND TAG -> per-call microseconds in $OUT.COMMAND
        local cmd=$1 tag=$2 i t0 t1
        : >"$OUT.$cmd"
        for ((i = 0; i < N; i++)); do
            t0=${EPOCHREALTIME/./}
            if ! CNI_COMMAND=$cmd CNI_CONTAINERID=$tag-$i CNI_NETNS=/var/run/netns/${PREFIX}p$i \
                CNI_IFNAME=eth0 CNI_PATH=$REF_DIR "$BIN" <"$CONF" >"$OUT.last" 2>&1; then
                echo "FAILED: $cmd $tag-$i: $(cat "$OUT.last")" >&2
                exit 1
            fi
            t1=${EPOCHREALTIME/./}
            echo $((t1 - t0)) >>"$OUT.$cmd"
        done
    }

    par_phase() { # COMMAND TAG -> pods/s
        local cmd=$1 tag=$2 t0 t1
        : >"$OUT.err"
        t0=${EPOCHREALTIME/./}
        # sh -c ... exec: one fork+exec of dash, then the plugin replaces it.
        if ! seq 0 $((N - 1)) | xargs -P "$PAR" -I{} sh -c \
            "CNI_COMMAND=$cmd CNI_CONTAINERID=$tag-{} CNI_NETNS=/var/run/netns/${PREFIX}p{} \
             CNI_IFNAME=eth0 CNI_PATH=$REF_DIR exec \"\$BIN\" <\"\$CONF\" >/dev/null 2>>\"\$OUT.err\""; then
            echo "FAILED: parallel $cmd: $(cat "$OUT.err")" >&2
            exit 1
        fi
        t1=${EPOCHREALTIME/./}
        awk -v n="$N" -v us=$((t1 - t0)) 'BEGIN {printf "%.1f", n / (us / 1e6)}'
    }

    seq_phase ADD seq
    seq_phase DEL seq
    add_pps=$(par_phase ADD par)
    del_pps=$(par_phase DEL par)
    echo "$(stats "$OUT.ADD") $(stats "$OUT.DEL") $add_pps $del_pps"
    exit 0
fi

# ---------------------------------------------------------------------------
# Outer mode.
# ---------------------------------------------------------------------------
[[ $(id -u) == 0 ]] || { echo "run as root (network namespaces)" >&2; exit 1; }
for p in bridge host-local; do
    [[ -x $REF_DIR/$p ]] || { echo "$REF_DIR/$p missing: apt-get install containernetworking-plugins" >&2; exit 1; }
done
NETD_CNI=${NETD_CNI:-$ROOT/target/release/netd-cni}
if [[ -z "${SKIP_BUILD:-}" ]]; then
    (cd "$ROOT" && cargo build --release -q -p netd-cni)
fi
[[ -x $NETD_CNI ]] || { echo "$NETD_CNI missing" >&2; exit 1; }

PREFIX="ntb-$$-"
TMP=$(mktemp -d "/tmp/${PREFIX}cnibench-XXXX")
cleanup() {
    local ns
    for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX" || true); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

echo "creating $N pod namespaces ..." >&2
for ((i = 0; i < N; i++)); do ip netns add "${PREFIX}p$i"; done

cat >"$TMP/subnet.env" <<EOF
FLANNEL_NETWORK=10.244.0.0/16
FLANNEL_SUBNET=10.244.7.1/24
FLANNEL_MTU=1450
FLANNEL_IPMASQ=true
EOF
cat >"$TMP/netd.json" <<EOF
{"cniVersion":"1.0.0","name":"netd","type":"netd-cni",
 "subnetFile":"$TMP/subnet.env","dataDir":"$TMP/netd-ipam","bridge":"netd0",
 "dns":{"nameservers":["10.96.0.10"]}}
EOF
# What flannel's CNI plugin hands to bridge: gateway bridge, hairpin, MTU.
cat >"$TMP/ref.json" <<EOF
{"cniVersion":"1.0.0","name":"refnet","type":"bridge","bridge":"cni0",
 "isGateway":true,"isDefaultGateway":true,"ipMasq":false,"hairpinMode":true,"mtu":1450,
 "ipam":{"type":"host-local","subnet":"10.244.8.0/24","gateway":"10.244.8.1",
         "dataDir":"$TMP/ref-ipam"}}
EOF

run_one() { # NAME BIN CONF
    local node="${PREFIX}node-$1"
    ip netns add "$node"
    ip -n "$node" link set lo up
    echo "benchmarking $1 ..." >&2
    N=$N PAR=$PAR ip netns exec "$node" bash "$SELF" --inner "$2" "$3" "$PREFIX" "$TMP/$1"
}

read -r n_am n_ap n_dm n_dp n_aps n_dps < <(run_one netd "$NETD_CNI" "$TMP/netd.json")
read -r r_am r_ap r_dm r_dp r_aps r_dps < <(run_one ref "$REF_DIR/bridge" "$TMP/ref.json")

[[ -n "${n_dps:-}" && -n "${r_dps:-}" ]] || { echo "a benchmark run failed (see above)" >&2; exit 1; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1fx", a / b}'; }
echo
echo "CNI benchmark: $N pods, latency sequential, throughput with $PAR in parallel ($(nproc) CPUs, kernel $(uname -r))"
printf '%-22s %12s %12s %12s %12s %14s %14s\n' "" "ADD med ms" "ADD p99 ms" "DEL med ms" "DEL p99 ms" "ADD pods/s" "DEL pods/s"
printf '%-22s %12s %12s %12s %12s %14s %14s\n' "netd-cni" "$n_am" "$n_ap" "$n_dm" "$n_dp" "$n_aps" "$n_dps"
printf '%-22s %12s %12s %12s %12s %14s %14s\n' "bridge + host-local" "$r_am" "$r_ap" "$r_dm" "$r_dp" "$r_aps" "$r_dps"
printf '%-22s %12s %12s %12s %12s %14s %14s\n' "netd-cni advantage" \
    "$(ratio "$r_am" "$n_am")" "$(ratio "$r_ap" "$n_ap")" "$(ratio "$r_dm" "$n_dm")" "$(ratio "$r_dp" "$n_dp")" \
    "$(ratio "$n_aps" "$r_aps")" "$(ratio "$n_dps" "$r_dps")"
