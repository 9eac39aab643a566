#!/usr/bin/env bash
# Cluster DNS benchmark: netd-dns vs Knot DNS vs NSD serving the same cluster.local zone, in
# the same run, each pinned to one core, queried by dnsperf from another namespace.
#
#   sudo bench/dns/run.sh                     # 10 s per measurement
#   DURATION=5 SERVICES=5000 bench/dns/run.sh
#
# Data: `netd-dns-standalone bench-data` makes $SERVICES ClusterIP services (+ $HEADLESS
# headless ones with 3 endpoints), the JSON netd-dns reads, the zone file Knot and NSD load
# (rendered from the very same Zone), and three query files:
#   A    svc-N.ns-M.svc.cluster.local A                  (positive answers)
#   NX   www.exampleN.com.ns-M.svc.cluster.local A       (a pod's search-path miss: NXDOMAIN+SOA)
#   SRV  _http._tcp.svc-N.ns-M.svc.cluster.local SRV     (answer + additional A)
#
# Per query mix and server (interleaved, so machine noise hits all alike):
#   1. max rate: dnsperf unthrottled (-c 2 -q 200, one thread) for $DURATION s;
#      the server's CPU time (utime+stime of every process in its namespace) gives its load,
#      and qps / load = what one core of the server sustains ("qps/core");
#   2. the same with netd-dns-standalone's batched load generator (blast: sendmmsg/recvmmsg,
#      256 outstanding), which needs far less client CPU than dnsperf;
#   3. server CPU per query at a fixed paced rate ($FIXED_RATE, blast);
#   4. latency at half the SERVER's maximum: its one-core capacity (blast q/s over the server's
#      CPU share) halved, offered paced by blast, which times every response (p50, p99). Half
#      of dnsperf's maximum would be half of the client's maximum on this machine.
#      Measured $LAT_RUNS times; the run with the median p99+lost is reported, every run's p99
#      listed beside it, with how long the server's busiest thread and the client waited for
#      their cores (run-queue wait, /proc/<tid>/schedstat): on a shared machine another task
#      on either core for a few ms shows in the p99 as if the server were slow (README.md).
#      Servers run under SCHED_FIFO 1 alike (SERVER_RT; 0: nice $BENCH_NICE), the client at nice
#      $BENCH_NICE (default -20).
# On a 2-core machine the client has one core: dnsperf, not the server, usually sets the
# maximum, hence the CPU-normalized figure.
#
# Topology: namespaces ntb-<pid>-dnsb-srv (198.18.9.2, the server) and ntb-<pid>-dnsb-cli
# (198.18.9.1) joined by a veth pair; nothing in the root namespace. Everything is named
# ntb-<pid>-*, so the netd test bed reaps what a killed run leaves; a normal exit cleans up.
#
# Needs: root, iproute2, dnsperf, knot (knotd), nsd, bind9-dnsutils (dig), and the release
# build of netd-dns-standalone (built here if missing).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export LC_ALL=C

DURATION=${DURATION:-10}
SERVICES=${SERVICES:-1000}
HEADLESS=${HEADLESS:-100}
SERVER_CPU=${SERVER_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
SERVERS=${SERVERS:-"netd knot nsd"}
MIXES=${MIXES:-"A NX SRV"}
FIXED_RATE=${FIXED_RATE:-30000}
LAT_RUNS=${LAT_RUNS:-5}
# Nice value of every server and of the client alike (0: the caller's). The machine's other
# tasks (the VM agent at nice -10, other users' builds) otherwise take the server's core for
# milliseconds at a time, which a p99 measures (README: "Latency on a shared machine").
BENCH_NICE=${BENCH_NICE:--20}
# Run every server alike (not the client) under SCHED_FIFO priority $SERVER_RT (0: no, nice
# $BENCH_NICE instead): then nothing but interrupts and other real-time tasks takes the server's
# core while it has work, and a p99 measures the server, not the machine's other tasks. At half
# load a server sleeps half the time, so those tasks still run (and RT throttling keeps 5%).
SERVER_RT=${SERVER_RT:-1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${NETD_DNS:-$ROOT/target/release/netd-dns-standalone}
P="ntb-$$-"
SRV=${P}dnsb-srv
CLI=${P}dnsb-cli
ADDR=198.18.9.2
WORK=$(mktemp -d "/tmp/${P}dnsbench-XXXX")

for tool in dnsperf knotd nsd dig taskset; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install dnsperf knot nsd bind9-dnsutils util-linux)" >&2; exit 1; }
done
if [[ -z ${NETD_DNS:-} ]]; then
    (cd "$ROOT" && cargo build --release -q -p netd-dns --bin netd-dns-standalone)
fi


trap cleanup EXIT

make_pair

"$BIN" bench-data --out "$WORK" --services "$SERVICES" --headless "$HEADLESS"

mkdir -p "$WORK/nsd"
cp "$WORK/cluster.local.zone" "$WORK/nsd/"
write_knot_conf "$WORK" "$ADDR"
cat >"$WORK/nsd/nsd.conf" <<EOF
server:
  ip-address: $ADDR
  port: 53
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "$WORK/nsd"
  database: ""
  zonelistfile: "$WORK/nsd/zone.list"
  xfrdfile: "$WORK/nsd/xfrd.state"
  pidfile: "$WORK/nsd/nsd.pid"
  logfile: "$WORK/nsd/nsd.log"
  minimal-responses: yes
  # Debian's NSD rate-limits responses (RRL) by default; a benchmark from one address would
  # measure the limiter.
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
  verbosity: 0
remote-control:
  control-enable: no
zone:
  name: cluster.local
  zonefile: cluster.local.zone
EOF

start_server() { # NAME
    local cmd
    case $1 in
        netd) cmd=("$BIN" serve --services "$WORK/services.json" --slices "$WORK/slices.json"
            --dns-listen $ADDR:53 --dns-add-lo-address false --dns-workers 1 --dns-upstream 127.0.0.1:9
            --cluster-dns-ip 10.96.0.10 --serial 1) ;;
        knot) cmd=(knotd -c "$WORK/knot/knot.conf") ;;
        nsd) cmd=(nsd -d -c "$WORK/nsd/nsd.conf") ;;
    esac
    local prio=(nice -n "$BENCH_NICE")
    if [[ $SERVER_RT != 0 ]]; then prio=(chrt -f "$SERVER_RT"); fi
    RUST_LOG=warn ip netns exec "$SRV" "${prio[@]}" taskset -c "$SERVER_CPU" "${cmd[@]}" >"$WORK/$1.log" 2>&1 &
    for _ in $(seq 100); do
        if [[ $(ip netns exec "$CLI" dig +short +time=1 +tries=1 @$ADDR svc-0.ns-0.svc.cluster.local 2>/dev/null) == 10.96.10.1 ]]; then
            # Knot pins its UDP worker threads itself (thread i to CPU i, counting every online
            # CPU), which overrides taskset: its UDP worker would run on CPU 0, the client's.
            # Pin every thread of every server again, now that they have all started.
            local p
            for p in $(ip netns pids "$SRV"); do taskset -a -p -c "$SERVER_CPU" "$p" >/dev/null; done
            return
        fi
        sleep 0.1
    done
    echo "$1 did not come up:" >&2
    cat "$WORK/$1.log" >&2
    exit 1
}

# Warns about server threads that used CPU time on another CPU than SERVER_CPU (the pin did
# not hold); prints nothing when all is well.
check_placement() { # NAME
    local p t cpu
    for p in $(ip netns pids "$SRV"); do
        for t in /proc/"$p"/task/*; do
            cpu=$(sed 's/.*) //' "$t/stat" 2>/dev/null | awk '{print $37}')
            if [[ -n $cpu && $cpu != "$SERVER_CPU" ]] && (( $(sed 's/.*) //' "$t/stat" | awk '{print $12 + $13}') > 5 )); then
                echo "  warning: $1 thread $(cat "$t/comm") last ran on CPU $cpu, not $SERVER_CPU" >&2
            fi
        done
    done
}

cpu_ticks() { # utime+stime of every process in the server namespace
    local p t=0
    for p in $(ip netns pids "$SRV"); do
        # Fields after the ")" that ends the command name (which may hold spaces: "nsd: main").
        t=$((t + $(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}' || echo 0)))
    done
    echo $t
}

# Per thread of every process in the server namespace: "task-path exec-ns run-delay-ns"
# (/proc/<pid>/task/<tid>/schedstat: CPU time, and time runnable but not running).
srv_sched() {
    local p t
    for p in $(ip netns pids "$SRV"); do
        for t in /proc/"$p"/task/*; do
            echo "$t $(cut -d' ' -f1,2 "$t/schedstat" 2>/dev/null)"
        done
    done
}

# Of two srv_sched snapshots: the run-queue wait (ms) of the thread that used the most CPU in
# between, the one answering the queries (netd's UDP worker, Knot's UDP worker, NSD's child):
# time another task held the server's core while it had work, plus a few µs per wake-up.
# (The server's other threads wait behind that one; their wait is not the server's.)
srv_wait_ms() {
    awk 'NR == FNR {e[$1] = $2; d[$1] = $3; next}
        ($1 in e) && $2 - e[$1] > best {best = $2 - e[$1]; w = $3 - d[$1]}
        END {printf "%.1f", w / 1e6}' "$1" "$2"
}

HZ=$(getconf CLK_TCK)
# Runs "$@" and prints the server's CPU share (%) over it; the command's output goes to $OUT.
with_cpu() {
    local t0 t1 s0 s1
    t0=$(cpu_ticks)
    s0=$EPOCHREALTIME
    "$@" >"$OUT" 2>&1
    s1=$EPOCHREALTIME
    t1=$(cpu_ticks)
    awk -v t=$((t1 - t0)) -v hz="$HZ" -v s0="$s0" -v s1="$s1" 'BEGIN {printf "%.1f", 100 * t / hz / (s1 - s0)}'
}

qfile() { case $1 in A) echo "$WORK/queries-a.txt" ;; NX) echo "$WORK/queries-nx.txt" ;; SRV) echo "$WORK/queries-srv.txt" ;; esac; }
client() { ip netns exec "$CLI" nice -n "$BENCH_NICE" taskset -c "$CLIENT_CPU" "$@"; }

RESULTS="$WORK/results"
: >"$RESULTS"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); client at nice $BENCH_NICE, servers $( [[ $SERVER_RT != 0 ]] && echo "SCHED_FIFO $SERVER_RT" || echo "at nice $BENCH_NICE")"
for mix in $MIXES; do
    for s in $SERVERS; do
        start_server "$s"
        OUT="$WORK/out"
        # Warm-up (caches, page faults), not measured.
        client dnsperf -s $ADDR -d "$(qfile "$mix")" -l 1 -c 2 -q 200 >/dev/null 2>&1 || true
        cpu=$(with_cpu client dnsperf -s $ADDR -d "$(qfile "$mix")" -l "$DURATION" -c 2 -q 200 -T 1)
        qps=$(awk '/Queries per second/ {printf "%.0f", $4}' "$OUT")
        rc=$(awk '/Response codes/ {print $3 $4}' "$OUT" | tr -d '(),')
        lost=$(awk '/Queries lost/ {print $4}' "$OUT" | tr -d '()')
        bcpu=$(with_cpu client "$BIN" blast --server $ADDR:53 --queries "$(qfile "$mix")" --seconds "$DURATION" --window 256 --sockets 4)
        bqps=$(awk '{printf "%.0f", $2}' "$OUT")
        # Server CPU per query at a fixed offered rate: the least noise-sensitive efficiency figure.
        fcpu=$(with_cpu client "$BIN" blast --server $ADDR:53 --queries "$(qfile "$mix")" --seconds "$DURATION" --rate "$FIXED_RATE" --window 4096 --sockets 4)
        fus=$(awk -v c="$fcpu" -v r="$FIXED_RATE" 'BEGIN {printf "%.2f", c / 100 / r * 1e6}')
        # Latency at half of the SERVER's maximum: its one-core capacity is the blast rate over
        # the server's CPU share (the client, not the server, often sets the blast maximum), and
        # blast offers half of that, paced, and times every response.
        # When the client cannot offer that much (its maximum, blast q/s, is lower), half of the
        # client's maximum is used instead: a lighter load, so this is then a lower bound.
        half=$(awk -v q="$bqps" -v c="$bcpu" 'BEGIN {c = (c > 1) ? c : 1; h = q / (c / 100) / 2; if (h > q / 2) h = q / 2; printf "%.0f", h}')
        # Another task holding the server's or the client's core for a few ms (the VM's own
        # agent at nice -10 does, about once a second; builds and tests of other users) delays
        # every query in flight meanwhile, and a p99 over 5 s shows it: LAT_RUNS runs, and the
        # run with the median p99+lost is reported (all p99s listed beside it), with its wait.
        runs=()
        for run in $(seq "$LAT_RUNS"); do
            srv_sched >"$WORK/sched0"
            client "$BIN" blast --server $ADDR:53 --queries "$(qfile "$mix")" --seconds "$DURATION" --rate "$half" --window 4096 --sockets 4 >"$OUT" 2>&1 || true
            srv_sched >"$WORK/sched1"
            one=$(awk -v sw="$(srv_wait_ms "$WORK/sched0" "$WORK/sched1")" '{for (i = 1; i < NF; i++) if ($i == "qps") q = $(i + 1); else if ($i == "p50_us") a = $(i + 1); else if ($i == "p99_us") b = $(i + 1); else if ($i == "p99_all_us") c = $(i + 1); else if ($i == "lost") l = $(i + 1); else if ($i == "wait_us") w = $(i + 1)}
                END {printf "%.0f %s %s %s %s %s %s", q, (a == "" ? "-" : a), (b == "" ? "-" : b), (c == "" ? "-" : c), (l == "" ? "-" : l), sw, (w == "" || w == "-" ? "-" : sprintf("%.1f", w / 1000))}' "$OUT")
            echo "    $mix $s latency run $run: achieved q/s, p50/p99/p99+lost us, lost, wait ms server/client: $one" >&2
            runs+=("$one")
        done
        # The median run by p99+lost ("inf" and "-" sort last).
        lat=$(printf '%s\n' "${runs[@]}" | awk '{k = ($4 ~ /^[0-9.]+$/) ? $4 : 1e18; print k, $0}' | sort -g | cut -d' ' -f2- | sed -n "$(( (${#runs[@]} + 1) / 2 ))p")
        all=$(printf '%s\n' "${runs[@]}" | awk '{printf "%s%s", (NR > 1 ? "," : ""), $3}')
        check_placement "$s"
        stop_server
        printf '%s %s %s %s %s %s %s %s %s %s %s\n' "$mix" "$s" "$qps" "$cpu" "$bqps" "$bcpu" "$fus" "$half" "$lat" "$rc" "$all" >>"$RESULTS"
        echo "  $mix $s: dnsperf ${qps} q/s (server CPU ${cpu}%), blast ${bqps} q/s (${bcpu}%), ${fus} us CPU/query at ${FIXED_RATE} q/s, at half the server's max (${half} q/s offered) achieved q/s, p50/p99/p99-with-lost us, lost, wait ms server/client: $lat, $rc (dnsperf lost $lost)" >&2
    done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "cluster.local zone: $SERVICES ClusterIP + $HEADLESS headless services; servers on CPU $SERVER_CPU, client on CPU $CLIENT_CPU; ${DURATION}s per measurement"
printf '%-4s %-5s %11s %6s %9s %10s %6s %9s %9s %9s %9s %8s %8s %8s %6s %11s  %-16s %s\n' mix server "dnsperf q/s" "cpu%" "q/s/core" "blast q/s" "cpu%" "q/s/core" "us/query" "half q/s" "achieved" "p50 us" "p99 us" "p99+lost" "lost" "wait ms s/c" "rcode" "p99 us of runs"
awk '{
    pc = ($4 > 0) ? $3 / ($4 / 100) : 0; bc = ($6 > 0) ? $5 / ($6 / 100) : 0;
    printf "%-4s %-5s %11d %6.1f %9d %10d %6.1f %9d %9s %9s %9s %8s %8s %8s %6s %11s  %-16s %s\n", $1, $2, $3, $4, pc, $5, $6, bc, $7, $8, $9, $10, $11, $12, $13, $14 "/" $15, $16, $17
}' "$RESULTS"
echo "q/s/core: rate / server CPU share; us/query: server CPU time per query at $FIXED_RATE q/s (blast, paced);"
echo "half q/s: half the server's one-core capacity (blast q/s/core / 2), or half the client's maximum if lower, offered"
echo "paced by blast; achieved: the rate answered; p50/p99 over the answered queries; p99+lost: over every query sent,"
echo "the lost ones (unanswered after 1 s) counted as slowest (inf: over 1% lost); lost: blast's count;"
echo "wait ms s/c: how long the server's busiest thread and the client waited for their cores while runnable during"
echo "that run (other tasks on them; a few us per wake-up besides); latency: the run with the median p99+lost of"
echo "$LAT_RUNS (p99 us of runs: every run's p99, in order)"
