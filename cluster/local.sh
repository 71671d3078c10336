#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: a head and N worker nodes, each its own raylet
# with its own CPU resources. Loopback only (127.0.0.1); the Jobs API/dashboard on the head.
#
#   cluster/local.sh up [N_WORKERS]   start (default: 1 worker node)
#   cluster/local.sh status           ray status
#   cluster/local.sh stop-node I      kill worker node I (its raylet and all it started, SIGKILL): a node lost mid-run
#   cluster/local.sh start-node I     start worker node I again (it rejoins the cluster)
#   cluster/local.sh down             stop every node (of this cluster only: other Rays on the machine stay up)
#
# Each worker node has the resources {"hone_worker_I": 1, "hone_node": 1}: ask a training worker for
# {"hone_node": 1} to place one per worker node.
#
# Settings (environment): HONE_CLUSTER_PORT (6390), HONE_CLUSTER_CPUS per node (2),
# HONE_CLUSTER_DASHBOARD_PORT (8265), HONE_CLUSTER_METRICS_PORT (8080), HONE_CLUSTER_DASHBOARD (1),
# HONE_CLUSTER_DIR (state: /tmp/hone-cluster). Uses the `ray` on PATH (make setup's .venv/bin).
# Ports: the head's GCS on PORT, node I's node manager on PORT+100+I, every node's dashboard agent on PORT+200+I (the head
# is node 0): never Ray's default agent port 52365, which another Ray on the machine (a test's, a notebook's) may hold,
# and without which the head's Jobs API cannot submit.
set -euo pipefail

PORT=${HONE_CLUSTER_PORT:-6390}
CPUS=${HONE_CLUSTER_CPUS:-2}
DASH_PORT=${HONE_CLUSTER_DASHBOARD_PORT:-8265}
METRICS_PORT=${HONE_CLUSTER_METRICS_PORT:-8080}
DASHBOARD=${HONE_CLUSTER_DASHBOARD:-1}
DIR=${HONE_CLUSTER_DIR:-/tmp/hone-cluster}
RAY=${RAY:-ray}
# A laptop cluster on loopback: no token auth, so local drivers and `hone` connect as-is.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

start_node() {
  $RAY start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="$CPUS" \
    --resources="{\"hone_worker_$1\": 1, \"hone_node\": 1}" --metrics-export-port=$((METRICS_PORT + $1)) \
    --node-manager-port=$((PORT + 100 + $1)) --dashboard-agent-listen-port=$((PORT + 200 + $1)) \
    --disable-usage-stats >"$DIR/worker-$1.log" 2>&1 || { cat "$DIR/worker-$1.log"; exit 1; }
}

# The given processes and all their descendants (a snapshot taken before anything is killed).
tree() {
  local found="$*" all=""
  while [ -n "$found" ]; do
    all="$all $found"
    found=$(for pid in $found; do pgrep -P "$pid" || true; done)
  done
  echo $all
}

cmd=${1:-status}
case "$cmd" in
  up)
    workers=${2:-1}
    mkdir -p "$DIR"
    if [ -f "$DIR/address" ] && $RAY status --address "$(cat "$DIR/address")" >/dev/null 2>&1; then
      echo "already up: $(cat "$DIR/address")"; exit 0
    fi
    dash_args=(--include-dashboard=false)
    if [ "$DASHBOARD" = 1 ]; then
      dash_args=(--include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT")
    fi
    $RAY start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="$CPUS" \
      --resources='{"hone_head": 1}' --metrics-export-port="$METRICS_PORT" --dashboard-agent-listen-port=$((PORT + 200)) \
      --temp-dir="$DIR/ray" --disable-usage-stats "${dash_args[@]}" >"$DIR/head.log" 2>&1 \
      || { cat "$DIR/head.log"; exit 1; }
    echo "127.0.0.1:$PORT" >"$DIR/address"
    for i in $(seq 1 "$workers"); do start_node "$i"; done
    echo "up: head 127.0.0.1:$PORT + $workers worker node(s), $CPUS CPUs each"
    [ "$DASHBOARD" = 1 ] && echo "dashboard / Jobs API: http://127.0.0.1:$DASH_PORT"
    echo "use it: export RAY_ADDRESS=127.0.0.1:$PORT   (or hone ... --address 127.0.0.1:$PORT)"
    ;;
  stop-node)
    i=${2:?usage: $0 stop-node I}
    # The raylet and every process it started (workers, agents), as when the machine is lost: a worker does not rely on
    # noticing its raylet's death, which it misses where nothing reaps the killed raylet (an init that does not reap
    # orphans leaves it a zombie, and a zombie looks alive).
    raylet=$(pgrep -f -- "raylet.*--node_manager_port=$((PORT + 100 + i))( |$)" || true)
    [ -n "$raylet" ] || { echo "worker node $i is not running" >&2; exit 1; }
    kill -9 $(tree $raylet) 2>/dev/null || true
    echo "worker node $i stopped"
    ;;
  start-node)
    i=${2:?usage: $0 start-node I}
    [ -f "$DIR/address" ] || { echo "the cluster is down: $0 up first" >&2; exit 1; }
    start_node "$i"
    echo "worker node $i started"
    ;;
  status)
    [ -f "$DIR/address" ] || { echo "down"; exit 1; }
    $RAY status --address "$(cat "$DIR/address")"
    ;;
  down)
    # This cluster's processes only, not `ray stop` (which stops every Ray on the machine: a `hone serve` or another
    # cluster beside this one): those whose command line names its state folder or its GCS address, and all they
    # started (workers, agents, Ray Jobs' drivers). SIGKILL, as `ray stop --force`.
    all=$(tree $(pgrep -f -- "$DIR/ray/|address=[0-9.]+:$PORT( |\$)" || true))
    [ -z "$all" ] || kill -9 $all 2>/dev/null || true
    rm -f "$DIR/address"
    echo "down"
    ;;
  *)
    echo "usage: $0 up [N_WORKERS] | status | stop-node I | start-node I | down" >&2; exit 2
    ;;
esac
