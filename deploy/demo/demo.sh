#!/usr/bin/env bash
# netd demo: three "nodes" (network namespaces) on a shared underlay, a real
# etcd, netd on every node, one workload per node, and a ping matrix across
# the VXLAN overlay.
#
#   deploy/demo/demo.sh            run the demo, tear everything down after
#   KEEP=1 deploy/demo/demo.sh     run it and leave it up for inspection
#   deploy/demo/demo.sh teardown   remove what a KEEP=1 run (or a crash) left
#
# Env: NETD_BIN_DIR (default target/release) holds the netd binary;
#      NETD_DEMO_DIR (default /tmp/netd-demo) holds logs, etcd data, run dirs.
#
# Everything lives in namespaces named netd-demo-*; nothing is created in,
# or changed in, the root namespace. Addresses: underlay 198.18.0.0/24,
# pods 10.244.0.0/16.
set -euo pipefail

readonly NS_PREFIX=netd-demo-
readonly NODES=3
readonly UNDERLAY_NS=${NS_PREFIX}underlay
readonly UNDERLAY_GW=198.18.0.1
readonly ETCD_ENDPOINT=http://${UNDERLAY_GW}:2379
readonly ETCD_PREFIX=/coreos.com/network
readonly NETWORK_CONFIG='{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN_DIR=${NETD_BIN_DIR:-$ROOT/target/release}
[[ $BIN_DIR = /* ]] || BIN_DIR=$ROOT/$BIN_DIR
WORKDIR=${NETD_DEMO_DIR:-/tmp/netd-demo}
KEEP=${KEEP:-0}

if [[ -t 1 ]]; then
    BOLD=$'\e[1m' DIM=$'\e[2m' GREEN=$'\e[32m' RED=$'\e[31m' RESET=$'\e[0m'
else
    BOLD='' DIM='' GREEN='' RED='' RESET=''
fi
step() { printf '%s==>%s %s\n' "$BOLD" "$RESET" "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '%serror:%s %s\n' "$RED" "$RESET" "$*" >&2; exit 1; }

node_ns() { echo "${NS_PREFIX}node$1"; }
pod_ns() { echo "${NS_PREFIX}pod$1"; }
node_ip() { echo "198.18.0.$((10 + $1))"; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
etcdctl_() {
    in_ns "$UNDERLAY_NS" env ETCDCTL_API=3 etcdctl --endpoints "$ETCD_ENDPOINT" \
        --dial-timeout 2s --command-timeout 5s "$@"
}

our_namespaces() {
    ip netns list | awk '{print $1}' | grep "^${NS_PREFIX}" || true
}

# Stops every process inside our namespaces (netd politely first, so it
# logs a clean shutdown), then deletes the namespaces and the work dir.
# Never fails: it runs from the EXIT trap, possibly after an error.
teardown() {
    local namespaces ns pid pids deadline
    namespaces=$(our_namespaces)
    if [[ -n $namespaces ]]; then
        for ns in $namespaces; do
            for pid in $(ip netns pids "$ns" 2>/dev/null); do
                kill -TERM "$pid" 2>/dev/null || true
            done
        done
        deadline=$((SECONDS + 5))
        while ((SECONDS < deadline)); do
            pids=$(for ns in $namespaces; do ip netns pids "$ns" 2>/dev/null; done)
            [[ -z $pids ]] && break
            sleep 0.1
        done
        for ns in $namespaces; do
            for pid in $(ip netns pids "$ns" 2>/dev/null); do
                kill -KILL "$pid" 2>/dev/null || true
            done
        done
        # Pods first, then nodes, then the underlay (etcd's home).
        for ns in $(printf '%s\n' $namespaces | grep -- '-pod') \
                  $(printf '%s\n' $namespaces | grep -- '-node') \
                  $(printf '%s\n' $namespaces | grep -v -- '-pod\|-node'); do
            ip netns del "$ns" 2>/dev/null || printf 'warning: cannot delete netns %s\n' "$ns" >&2
        done
    fi
    # Only ever remove the dir this script created (it holds a marker).
    if [[ -f $WORKDIR/.netd-demo ]]; then
        rm -rf -- "$WORKDIR"
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $KEEP == 1 ]]; then
        echo
        step "KEEP=1: the demo is still up. Look around with e.g.:"
        info "ip netns list | grep ${NS_PREFIX}"
        info "ip -n $(node_ns 0) route show proto 110"
        info "ip -n $(node_ns 0) -d link show netd.1"
        info "bridge -n $(node_ns 0) fdb show dev netd.1"
        info "ip netns exec $(pod_ns 0) ping ${POD_IP[1]:-10.244.X.2}"
        info "less $WORKDIR/node0.log"
        step "Tear it down with: $0 teardown"
    else
        teardown
        ((rc == 0)) || echo "(everything was torn down; rerun with KEEP=1 to keep it for inspection)" >&2
        [[ -z $(our_namespaces) ]] || echo "warning: namespaces left behind: $(our_namespaces | xargs)" >&2
    fi
    exit "$rc"
}

# Polls `cmd...` every 0.1 s for up to $1 seconds; fails if it never succeeds.
wait_for() {
    local timeout=$1; shift
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

env_value() { sed -n "s/^$2=//p" "$1"; }

preflight() {
    ((EUID == 0)) || die "run as root (network namespaces need CAP_NET_ADMIN)"
    local tool
    for tool in ip bridge etcd etcdctl ping; do
        command -v "$tool" >/dev/null || die "missing tool: $tool"
    done
    [[ -x $BIN_DIR/netd ]] || die "no netd binary at $BIN_DIR/netd (cargo build --release -p netd, or set NETD_BIN_DIR)"
    [[ -x $BIN_DIR/netd-cni ]] || die "no netd-cni binary at $BIN_DIR/netd-cni (cargo build --release -p netd-cni, or set NETD_BIN_DIR)"
    if [[ -n $(our_namespaces) ]]; then
        die "namespaces from an earlier demo exist ($(our_namespaces | xargs)); run: $0 teardown"
    fi
    [[ ! -e $WORKDIR ]] || die "$WORKDIR exists (an earlier demo?); run: $0 teardown, or set NETD_DEMO_DIR"
}

start_underlay_and_etcd() {
    step "Underlay $UNDERLAY_GW/24 and etcd ($UNDERLAY_NS)"
    mkdir -m 0700 "$WORKDIR" "$WORKDIR/etcd"
    touch "$WORKDIR/.netd-demo"
    ip netns add "$UNDERLAY_NS"
    ip -n "$UNDERLAY_NS" link set lo up
    ip -n "$UNDERLAY_NS" link add br0 type bridge
    ip -n "$UNDERLAY_NS" addr add "$UNDERLAY_GW/24" dev br0
    ip -n "$UNDERLAY_NS" link set br0 up
    in_ns "$UNDERLAY_NS" etcd --name demo --data-dir "$WORKDIR/etcd" \
        --listen-client-urls "$ETCD_ENDPOINT" --advertise-client-urls "$ETCD_ENDPOINT" \
        --listen-peer-urls "http://$UNDERLAY_GW:2380" \
        --initial-advertise-peer-urls "http://$UNDERLAY_GW:2380" \
        --initial-cluster "demo=http://$UNDERLAY_GW:2380" \
        </dev/null >"$WORKDIR/etcd.log" 2>&1 &
    wait_for 30 etcdctl_ endpoint health || {
        tail -n 20 "$WORKDIR/etcd.log" >&2
        die "etcd did not become healthy (log: $WORKDIR/etcd.log)"
    }
    printf '%s' "$NETWORK_CONFIG" | etcdctl_ put "$ETCD_PREFIX/config" >/dev/null
    info "$ETCD_PREFIX/config = $NETWORK_CONFIG"
}

NETD_PID=()
add_node() {
    local i=$1 ns ip
    ns=$(node_ns "$i")
    ip=$(node_ip "$i")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # Created from inside the underlay, peer placed straight into the node.
    ip -n "$UNDERLAY_NS" link add "n$i" type veth peer name eth0 netns "$ns"
    ip -n "$UNDERLAY_NS" link set "n$i" master br0 up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set eth0 mtu 1500 up
    ip -n "$ns" route add default via "$UNDERLAY_GW"
    mkdir -p "$WORKDIR/node$i/run" "$WORKDIR/node$i/state"
    in_ns "$ns" "$BIN_DIR/netd" run \
        --etcd-endpoints "$ETCD_ENDPOINT" --etcd-prefix "$ETCD_PREFIX" \
        --node-name "node$i" --run-dir "$WORKDIR/node$i/run" \
        --state-dir "$WORKDIR/node$i/state" --resync-interval 5s \
        --cni-conf-dir "$WORKDIR/node$i/cni" --metrics-listen "" \
        </dev/null >"$WORKDIR/node$i.log" 2>&1 &
    NETD_PID[i]=$!
}

wait_subnet_env() {
    local i=$1 env=$WORKDIR/node$1/run/subnet.env
    local deadline=$((SECONDS + 30))
    until grep -qs '^FLANNEL_SUBNET=' "$env"; do
        if ! kill -0 "${NETD_PID[i]}" 2>/dev/null || ((SECONDS >= deadline)); then
            tail -n 20 "$WORKDIR/node$i.log" >&2
            die "node$i: netd wrote no subnet.env ($(kill -0 "${NETD_PID[i]}" 2>/dev/null && echo 'still waiting after 30 s' || echo 'it exited'))"
        fi
        sleep 0.1
    done
    info "node$i $(node_ip "$i")  FLANNEL_SUBNET=$(env_value "$env" FLANNEL_SUBNET)  FLANNEL_MTU=$(env_value "$env" FLANNEL_MTU)"
}

print_leases() {
    step "Subnet leases in etcd ($ETCD_PREFIX/subnets)"
    local key value public mac
    while IFS= read -r key && IFS= read -r value; do
        public=$([[ $value =~ \"PublicIP\":\"([^\"]+)\" ]] && echo "${BASH_REMATCH[1]}" || echo '?')
        mac=$([[ $value =~ \"VtepMAC\":\"([^\"]+)\" ]] && echo "${BASH_REMATCH[1]}" || echo '?')
        printf '    %-44s PublicIP %-13s VtepMAC %s\n' "$key" "$public" "$mac"
    done < <(etcdctl_ get --prefix "$ETCD_PREFIX/subnets")
}

# ---------------------------------------------------------------------------
# add_pod NODE: one pod on node NODE, set up the way a container runtime does it: a new network
# namespace, then `netd-cni ADD` with the plugin configuration from the conflist netd wrote.
# ---------------------------------------------------------------------------
POD_IP=()
add_pod() {
    local i=$1 node pod conflist conf result
    node=$(node_ns "$i")
    pod=$(pod_ns "$i")
    conflist=$WORKDIR/node$i/cni/10-netd.conflist
    wait_for 15 test -s "$conflist" || die "netd on node$i wrote no CNI config ($conflist)"
    conf=$(jq -c '.plugins[0] + {cniVersion: .cniVersion, name: .name}' "$conflist")
    ip netns add "$pod"
    result=$(printf '%s' "$conf" | in_ns "$node" env CNI_COMMAND=ADD CNI_CONTAINERID="demo-pod$i" \
        CNI_NETNS="/var/run/netns/$pod" CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni \
        CNI_ARGS="K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod$i" "$BIN_DIR/netd-cni") \
        || die "netd-cni ADD failed on node$i: $result"
    POD_IP[i]=$(jq -r '.ips[0].address' <<<"$result")
    info "pod$i on node$i: ${POD_IP[i]} via $(jq -r '.ips[0].gateway' <<<"$result") (netd-cni)"
    POD_IP[i]=${POD_IP[i]%/*}
}

routes_converged() {
    local i n
    for ((i = 0; i < NODES; i++)); do
        n=$(ip -n "$(node_ns "$i")" route show proto 110 | grep -c . || true)
        ((n == NODES - 1)) || return 1
    done
}

ping_matrix() {
    step "Pod-to-pod pings across nodes (rows: from, columns: to)"
    local i j ok failures=0 line
    line=$(printf '%-8s' '')
    for ((j = 0; j < NODES; j++)); do line+=$(printf '%-14s' "pod$j"); done
    info "$line"
    line=$(printf '%-8s' '')
    for ((j = 0; j < NODES; j++)); do line+=$(printf '%s%-14s%s' "$DIM" "${POD_IP[j]}" "$RESET"); done
    info "$line"
    for ((i = 0; i < NODES; i++)); do
        line=$(printf '%-8s' "pod$i")
        for ((j = 0; j < NODES; j++)); do
            if ((i == j)); then
                line+=$(printf '%-14s' '-')
                continue
            fi
            ok=0
            # Up to 3 single pings: the first packet of a flow can be lost
            # only if something is still settling; a real break loses all.
            for _ in 1 2 3; do
                if in_ns "$(pod_ns "$i")" ping -n -q -c 1 -W 2 "${POD_IP[j]}" >/dev/null 2>&1; then
                    ok=1
                    break
                fi
            done
            if ((ok)); then
                line+="${GREEN}✓${RESET}$(printf '%-13s' '')"
            else
                line+="${RED}✗${RESET}$(printf '%-13s' '')"
                failures=$((failures + 1))
            fi
        done
        info "$line"
    done
    return "$failures"
}

main() {
    preflight
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    start_underlay_and_etcd

    step "Starting netd on $NODES nodes"
    local i
    for ((i = 0; i < NODES; i++)); do add_node "$i"; done
    for ((i = 0; i < NODES; i++)); do wait_subnet_env "$i"; done

    print_leases

    step "One workload per node"
    for ((i = 0; i < NODES; i++)); do add_pod "$i"; done

    wait_for 15 routes_converged || echo "warning: not every node has $((NODES - 1)) overlay routes yet" >&2
    step "Overlay routes on node0 (ip route show proto 110)"
    ip -n "$(node_ns 0)" route show proto 110 | sed 's/^/    /'

    local failures=0
    ping_matrix || failures=$?
    echo
    step "What an operator sees on node0 (netd status)"
    in_ns "$(node_ns 0)" "$BIN_DIR/netd" status --run-dir "$WORKDIR/node0/run" | sed 's/^/    /' || true
    if ((failures == 0)); then
        step "${GREEN}All $((NODES * (NODES - 1))) cross-node pod pings succeeded.${RESET}"
    else
        step "${RED}$failures of $((NODES * (NODES - 1))) cross-node pod pings failed.${RESET} Logs: $WORKDIR/node*.log"
        ((KEEP == 1)) || for ((i = 0; i < NODES; i++)); do
            printf '%s--- node%d log tail ---%s\n' "$DIM" "$i" "$RESET"
            tail -n 15 "$WORKDIR/node$i.log"
        done
        exit 1
    fi
}

case "${1:-run}" in
    run) main ;;
    teardown)
        ((EUID == 0)) || die "run as root"
        teardown
        if [[ -n $(our_namespaces) ]]; then die "could not delete: $(our_namespaces | xargs)"; fi
        [[ ! -e $WORKDIR ]] || echo "note: $WORKDIR was not created by this script; left in place" >&2
        echo "netd demo torn down."
        ;;
    -h | --help | help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command $1 (use: run, teardown)" ;;
esac
