# Shared by run.sh and cpu_ab.sh (sourced): Knot DNS's configuration for the bench, serving
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
