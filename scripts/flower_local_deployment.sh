#!/usr/bin/env bash
# A Flower deployment of fedlora on one machine, over loopback only: one SuperLink, N SuperNodes
# (one per client, partition-id 0..N-1), then `flwr run flower_app` against that SuperLink.
# Waits for the run folder's summary.json and stops every process it started (also on error,
# Ctrl-C or kill).
#
#   scripts/flower_local_deployment.sh OUT_DIR [NUM_NODES] [-- extra flwr run --run-config items]
#
# The SuperLink runs through fedlora.flower.superlink on two addresses: the node-facing one,
# 127.0.0.1:BASE_PORT, serves the Fleet API only (a stranger's `flwr supernode register`, `flwr ls`
# or `flwr run` there gets 403); the operator address, 127.0.0.1:OPERATOR_PORT, serves everything
# (the flwr CLI's `local-deployment` connection: keys are registered and the run started there).
# On several machines, bind the node-facing address where the nodes reach it and keep the
# operator address on loopback or an operator-only interface (README, "Who may do what").
#
# Environment: BASE_PORT (default 39500: SuperLink's node-facing address on BASE_PORT, SuperNode i
# on BASE_PORT+1+i), OPERATOR_PORT (default BASE_PORT+NUM_NODES+1: the operator address),
# TIMEOUT (seconds to wait for the run, default 1800), FLWR_HOME (default OUT_DIR/flwr-home),
# FLWR (the flwr executables' folder, default: next to `python`),
# CERTS (a folder with ca.crt, server.pem, server.key: TLS between SuperLink, SuperNodes and flwr;
# default: insecure), AUTH_KEYS (a folder with node-<i> / node-<i>.pub EC key pairs: SuperNode
# authentication, needs CERTS). scripts/flower_dev_certs.sh makes both for loopback trials.
# KILL_NODE=i (fault drill): SIGKILL SuperNode i and its ClientApp process while it trains in
# round KILL_ROUND (default 1; read from its status.json under the node cache), then start it
# again with the same node config and cache dir after RESTART_DELAY seconds (default 2).
# STRANGER=1 (drill, needs AUTH_KEYS): before the run, a stranger with a fresh key tries
# `flwr supernode register` and `flwr ls` on the node-facing address (both must be refused) and
# starts a SuperNode with the unregistered key (it must exit without joining); logs/stranger.log.
# After the run `flwr supernode list` (operator address) goes to logs/nodes.log.
# Each SuperNode runs in its own process group (setsid), so its ClientApp processes go with it.
set -euo pipefail

OUT=$(realpath -m "${1:?usage: $0 OUT_DIR [NUM_NODES] [-- run-config items]}")
NODES=${2:-2}
shift $(( $# >= 2 ? 2 : $# ))
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")
BASE_PORT=${BASE_PORT:-39500}
TIMEOUT=${TIMEOUT:-1800}
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=${FLWR:-$(dirname "$(command -v python)")}
export FLWR_HOME=${FLWR_HOME:-$OUT/flwr-home}
export FEDLORA_NODE_CACHE=${FEDLORA_NODE_CACHE:-$OUT/node-cache}
mkdir -p "$OUT/logs" "$FLWR_HOME"

PIDS=()
signal_all() { # SuperNodes by process group (they lead their own), the SuperLink by pid
  for pid in "${PIDS[@]}"; do kill "-$1" -- "-$pid" 2>/dev/null || kill "-$1" "$pid" 2>/dev/null || true; done
}
cleanup() {
  signal_all TERM
  sleep 2
  signal_all KILL
}
trap cleanup EXIT INT TERM

LINK=127.0.0.1:$BASE_PORT
OPERATOR_PORT=${OPERATOR_PORT:-$((BASE_PORT + NODES + 1))}
OPERATOR=127.0.0.1:$OPERATOR_PORT
PY=${PYTHON:-$BIN/python}
[[ -x "$PY" ]] || PY=python
CERTS=${CERTS:-}
AUTH_KEYS=${AUTH_KEYS:-}
if [[ -n "$CERTS" ]]; then
  CERTS=$(realpath "$CERTS")
  LINK_SEC=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key")
  NODE_SEC=(--root-certificates "$CERTS/ca.crt")
  CLI_SEC="root-certificates = \"$CERTS/ca.crt\""
else
  if [[ -n "$AUTH_KEYS" ]]; then echo "AUTH_KEYS needs CERTS (SuperNode authentication needs TLS)" >&2; exit 2; fi
  LINK_SEC=(--insecure)
  NODE_SEC=(--insecure)
  CLI_SEC="insecure = true"
fi
[[ -n "$AUTH_KEYS" ]] && AUTH_KEYS=$(realpath "$AUTH_KEYS") && LINK_SEC+=(--enable-supernode-auth)
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local-deployment"

[superlink.local-deployment]
address = "$OPERATOR"
$CLI_SEC

[superlink.node-facing]
address = "$LINK"
$CLI_SEC
EOF

# --disable-runtime-dependency-installation: the app's dependencies are already installed here.
# flower-superlink's arguments; --host/--port is the operator address, --fleet-address the nodes'.
PATH="$BIN:$PATH" "$PY" -m fedlora.flower.superlink --fleet-address "$LINK" "${LINK_SEC[@]}" \
  --host 127.0.0.1 --port "$OPERATOR_PORT" \
  --disable-runtime-dependency-installation >"$OUT/logs/superlink.log" 2>&1 &
PIDS+=($!)

if [[ -n "$AUTH_KEYS" ]]; then # only registered SuperNodes may connect
  for ((i = 0; i < NODES; i++)); do
    deadline=$((SECONDS + 60))
    until "$BIN/flwr" supernode register "$AUTH_KEYS/node-$i.pub" local-deployment >>"$OUT/logs/register.log" 2>&1; do
      if ((SECONDS > deadline)); then echo "cannot register node-$i:" >&2; cat "$OUT/logs/register.log" >&2; exit 1; fi
      sleep 2 # the SuperLink may still be starting
    done
  done
fi

NODE_PID=()
start_node() { # start_node i LOG: SuperNode i in its own process group
  local i=$1 NODE_AUTH=()
  [[ -n "$AUTH_KEYS" ]] && NODE_AUTH=(--auth-supernode-private-key "$AUTH_KEYS/node-$i")
  setsid "$BIN/flower-supernode" "${NODE_SEC[@]}" "${NODE_AUTH[@]}" --superlink "$LINK" \
    --host 127.0.0.1 --port $((BASE_PORT + 1 + i)) \
    --node-config "partition-id=$i num-partitions=$NODES" \
    >"$2" 2>&1 &
  NODE_PID[i]=$!
  PIDS+=($!)
}
for ((i = 0; i < NODES; i++)); do start_node "$i" "$OUT/logs/supernode-$i.log"; done

if [[ -n "${STRANGER:-}" ]]; then # a stranger who reaches the nodes' address, with a key of their own
  [[ -n "$AUTH_KEYS" ]] || { echo "STRANGER needs AUTH_KEYS" >&2; exit 2; }
  mkdir -p "$OUT/stranger" && rm -f "$OUT/stranger/key" "$OUT/stranger/key.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C stranger -f "$OUT/stranger/key"
  SLOG=$OUT/logs/stranger.log
  if "$BIN/flwr" supernode register "$OUT/stranger/key.pub" node-facing >>"$SLOG" 2>&1; then
    echo "STRANGER: flwr supernode register was accepted on the node-facing address" | tee -a "$SLOG" >&2; exit 1
  fi
  echo "STRANGER: register refused" >>"$SLOG"
  if "$BIN/flwr" ls node-facing >>"$SLOG" 2>&1; then
    echo "STRANGER: flwr ls was accepted on the node-facing address" | tee -a "$SLOG" >&2; exit 1
  fi
  echo "STRANGER: ls refused" >>"$SLOG"
  "$BIN/flower-supernode" "${NODE_SEC[@]}" --auth-supernode-private-key "$OUT/stranger/key" --superlink "$LINK" \
    --host 127.0.0.1 --port $((OPERATOR_PORT + 1)) --node-config "partition-id=0 num-partitions=$NODES" \
    >"$OUT/logs/supernode-stranger.log" 2>&1 &
  spid=$!
  deadline=$((SECONDS + 90))
  while kill -0 "$spid" 2>/dev/null; do
    if ((SECONDS > deadline)); then
      kill -KILL "$spid" 2>/dev/null || true
      echo "STRANGER: the unregistered SuperNode still runs after 90s" | tee -a "$SLOG" >&2; exit 1
    fi
    sleep 1
  done
  wait "$spid" && code=0 || code=$?
  echo "STRANGER: unregistered SuperNode exited with code $code" >>"$SLOG"
fi

# The run folder is an absolute path: the ServerApp runs in a process of the SuperLink.
RUN_CONFIG="output-dir='$OUT' name='run' partition.num-clients=$NODES"
for item in "${EXTRA[@]}"; do RUN_CONFIG+=" $item"; done
deadline=$((SECONDS + 60))
until "$BIN/flwr" run "$REPO/flower_app" local-deployment --run-config "$RUN_CONFIG" \
    >"$OUT/logs/flwr-run.log" 2>&1; do
  if ((SECONDS > deadline)); then echo "flwr run failed:" >&2; cat "$OUT/logs/flwr-run.log" >&2; exit 1; fi
  sleep 2  # the SuperLink may still be starting
done
cat "$OUT/logs/flwr-run.log"
RUN_ID=$(grep -o 'started run [0-9]*' "$OUT/logs/flwr-run.log" | grep -o '[0-9]*$' || true)

KILL_NODE=${KILL_NODE:-}
KILL_ROUND=${KILL_ROUND:-1}
killed=""
kill_drill() { # SIGKILL SuperNode $KILL_NODE once its status.json says it trains in round $KILL_ROUND
  local status victim pid keep=()
  for status in "$FEDLORA_NODE_CACHE"/*/"client-$KILL_NODE"/status.json; do
    [[ -f "$status" ]] && grep -q "\"round\": $KILL_ROUND, \"phase\": \"training\"" "$status" || continue
    victim=${NODE_PID[KILL_NODE]}
    kill -KILL -- "-$victim" 2>/dev/null || kill -KILL "$victim" 2>/dev/null || true
    for pid in "${PIDS[@]}"; do
      if [[ "$pid" != "$victim" ]]; then keep+=("$pid"); fi
    done
    PIDS=("${keep[@]}")
    echo "killed SuperNode $KILL_NODE (process group $victim) while it trained in round $KILL_ROUND" \
      | tee -a "$OUT/logs/kill.log"
    sleep "${RESTART_DELAY:-2}"
    start_node "$KILL_NODE" "$OUT/logs/supernode-$KILL_NODE-restarted.log"
    echo "restarted SuperNode $KILL_NODE (pid ${NODE_PID[KILL_NODE]}), same node config and cache dir" \
      | tee -a "$OUT/logs/kill.log"
    killed=1
    return
  done
}

deadline=$((SECONDS + TIMEOUT))
until [[ -f "$OUT/run/summary.json" ]]; do
  if ((SECONDS > deadline)); then
    echo "no summary after ${TIMEOUT}s" >&2
    [[ -n "$RUN_ID" ]] && timeout 20 "$BIN/flwr" log "$RUN_ID" local-deployment --show >&2 || true
    exit 1
  fi
  for pid in "${PIDS[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "process $pid exited early; logs in $OUT/logs" >&2
      exit 1
    fi
  done
  if [[ -n "$KILL_NODE" && -z "$killed" ]]; then
    kill_drill
    sleep 0.2
  else
    sleep 2
  fi
done
if [[ -n "$KILL_NODE" && -z "$killed" ]]; then echo "KILL_NODE=$KILL_NODE: never saw it train in round $KILL_ROUND" >&2; exit 1; fi
[[ -n "$RUN_ID" ]] && timeout 20 "$BIN/flwr" log "$RUN_ID" local-deployment --show >"$OUT/logs/serverapp.log" 2>&1 || true
[[ -n "${STRANGER:-}" ]] && { timeout 20 "$BIN/flwr" supernode list local-deployment >"$OUT/logs/nodes.log" 2>&1 || true; }
echo "done: $OUT/run/summary.json"
