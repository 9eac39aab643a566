# Shared by run.sh and cpu_ab.sh (sourced). They set SRV and CLI (namespace names), ADDR (the
# server address) and WORK (a scratch directory).

# The server and client namespaces, a veth between them: server $ADDR/24, client 198.18.9.1.
make_pair() {
    ip netns add "$SRV"
    ip netns add "$CLI"
    ip -n "$SRV" link set lo up
    ip -n "$CLI" link set lo up
    ip -n "$SRV" link add v0 type veth peer name eth0 netns "$CLI"
    ip -n "$SRV" addr add "$ADDR/24" dev v0
    ip -n "$SRV" link set v0 up
    ip -n "$CLI" addr add 198.18.9.1/24 dev eth0
    ip -n "$CLI" link set eth0 up
}

# Stops whatever runs in the server namespace: TERM, up to 5 s, then KILL.
stop_server() {
    local p
    for p in $(ip netns pids "$SRV" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do [[ -z $(ip netns pids "$SRV" 2>/dev/null) ]] && return; sleep 0.1; done
    for p in $(ip netns pids "$SRV" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    sleep 0.2
}

# The EXIT trap of both scripts.
cleanup() {
    stop_server
    ip netns del "$SRV" 2>/dev/null || true
    ip netns del "$CLI" 2>/dev/null || true
    rm -rf "$WORK"
}

# Knot DNS's configuration for the bench, serving
# $1/cluster.local.zone on $2:53 with one UDP, one TCP and one background worker.
write_knot_conf() {
    local work=$1 addr=$2
    mkdir -p "$work/knot/db"
    cp "$work/cluster.local.zone" "$work/knot/"
    cat >"$work/knot/knot.conf" <<EOC
server:
  rundir: "$work/knot"
  listen: $addr@53
  udp-workers: 1
  tcp-workers: 1
  background-workers: 1
log:
  - target: stderr
    any: warning
database:
  storage: "$work/knot/db"
template:
  - id: default
    storage: "$work/knot"
    file: "%s.zone"
    semantic-checks: off
    journal-content: none
    zonefile-sync: -1
zone:
  - domain: cluster.local
EOC
}
