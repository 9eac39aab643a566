#!/usr/bin/env bash
# Server CPU per query at a fixed paced rate, servers alternating round after round (so that
# the noise of a shared machine hits all of them alike), each pinned to one core; plus blast's
# latency figures at that rate. The A/B companion of run.sh, for small differences.
#
#   sudo bench/dns/cpu_ab.sh                                  # netd vs knot, A, 3 rounds
#   MIX=srv ROUNDS=5 RATE=30000 sudo bench/dns/cpu_ab.sh
#   OLD=/tmp/netd-dns-standalone.old SERVERS="netd-old netd knot" sudo bench/dns/cpu_ab.sh
#
# Same topology and data as run.sh (ntb-<pid>-* namespaces, 1000 + 100 services).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${NETD_DNS:-$ROOT/target/release/netd-dns-standalone}
SERVERS=${SERVERS:-"netd knot"}
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
RATE=${RATE:-30000}
MIX=${MIX:-a}
SERVER_CPU=${SERVER_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
P="ntb-$$-"
SRV=${P}ab-srv
CLI=${P}ab-cli
ADDR=198.18.9.2
WORK=$(mktemp -d "/tmp/${P}dnsab-XXXX")
[[ -x $BIN ]] || (cd "$ROOT" && cargo build --release -q -p netd-dns --bin netd-dns-standalone)

trap cleanup EXIT

make_pair
"$BIN" bench-data --out "$WORK" --services 1000 --headless 100 >/dev/null
write_knot_conf "$WORK" "$ADDR"

ticks() {
    local t=0 p
    for p in $(ip netns pids "$SRV"); do t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}'))); done
    echo $t
}
blast() { ip netns exec "$CLI" taskset -c "$CLIENT_CPU" "$BIN" blast --server $ADDR:53 --queries "$WORK/queries-$MIX.txt" --rate "$RATE" --window 4096 --sockets 4 "$@"; }

HZ=$(getconf CLK_TCK)
for round in $(seq "$ROUNDS"); do
    for s in $SERVERS; do
        case $s in
            netd) cmd=("$BIN") ;;
            netd-old) cmd=("${OLD:?OLD=path of the other netd-dns-standalone}") ;;
            knot) cmd=(knotd -c "$WORK/knot/knot.conf") ;;
            *) echo "unknown server $s" >&2; exit 1 ;;
        esac
        [[ $s == knot ]] || cmd+=(serve --services "$WORK/services.json" --slices "$WORK/slices.json" --dns-listen $ADDR:53
            --dns-add-lo-address false --dns-workers 1 --dns-upstream 127.0.0.1:9 --cluster-dns-ip 10.96.0.10 --serial 1)
        RUST_LOG=warn ip netns exec "$SRV" taskset -c "$SERVER_CPU" "${cmd[@]}" >"$WORK/$s.log" 2>&1 &
        for _ in $(seq 50); do
            [[ $(ip netns exec "$CLI" dig +short +time=1 +tries=1 @$ADDR svc-0.ns-0.svc.cluster.local 2>/dev/null) == 10.96.10.1 ]] && break
            sleep 0.1
        done
        # Knot pins its UDP workers itself, over taskset: pin every thread again (see run.sh).
        for p in $(ip netns pids "$SRV"); do taskset -a -p -c "$SERVER_CPU" "$p" >/dev/null; done
        blast --seconds 1 >/dev/null
        t0=$(ticks)
        s0=$EPOCHREALTIME
        out=$(blast --seconds "$SECS")
        s1=$EPOCHREALTIME
        t1=$(ticks)
        us=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v s0="$s0" -v s1="$s1" -v r="$RATE" 'BEGIN {printf "%.2f", t / hz / (s1 - s0) / r * 1e6}')
        echo "round $round $s: $us us CPU/query at $RATE q/s | $out | load $(cut -d' ' -f1 /proc/loadavg)"
        stop_server
    done
done
