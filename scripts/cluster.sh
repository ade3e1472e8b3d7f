#!/usr/bin/env bash
# A Vault cluster on this machine: N nodes (default 3) with integrated (raft) storage on 127.0.0.1, the plugin
# registered on every node, the engine mounted at cmk/ on one SoftHSM token that all nodes share. For trying
# failover by hand and for the end-to-end failover test.
#
#   scripts/cluster.sh start [DIR]    start the built binaries; initialise, unseal, join, register, mount
#   scripts/cluster.sh status [DIR]   each node's address, process and HA state
#   scripts/cluster.sh stop [DIR]     stop every node this script started (by the process ids it recorded)
#
# DIR (default .cluster) holds each node's config, raft data, plugin directory, log and pid, the token
# directory, the unseal key and root token (init.json, mode 600), env (VAULT_ADDR and VAULT_TOKEN of node 1)
# and nodes (one line per node: name address pid). Expects `make build vault deps`. CMK_CLUSTER_NODES sets N.
source "$(dirname "$0")/lib.sh"

cmd=${1:-}
DIR=$(realpath -m "${2:-$ROOT/.cluster}")
NODES=${CMK_CLUSTER_NODES:-3}
TOKEN_LABEL=${CMK_CLUSTER_TOKEN_LABEL:-cmk-cluster}
PIN=${CMK_CLUSTER_PIN:-1234}
# The end-to-end suite passes the binaries it tests.
PLUGIN_BIN=${CMK_E2E_PLUGIN:-$PLUGIN_DIR/$PLUGIN_NAME}
VAULT_BIN=${CMK_E2E_VAULT:-$VAULT_BIN}

vault_at() { local addr=$1; shift; VAULT_ADDR="$addr" "$VAULT_BIN" "$@"; }

# wait_for ADDR PID WHAT CMD…: repeat CMD against ADDR until it succeeds (about 60 s at most).
wait_for() {
  local addr=$1 pid=$2 what=$3; shift 3
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || die "node at $addr exited while waiting for $what (log in $DIR)"
    if VAULT_ADDR="$addr" "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "node at $addr: timed out waiting for $what"
}

# start_node NAME: write NAME's config on two free ports and start it. A port can still be taken between
# the check and the bind by a process outside this script; then the node exits at once saying so, and it is
# started again on other ports.
start_node() {
  local node=$1 api cluster attempt pid
  mkdir -p "$DIR/$node/raft" "$DIR/$node/plugins"
  cp "$PLUGIN_BIN" "$DIR/$node/plugins/$PLUGIN_NAME"
  for attempt in 1 2 3 4 5; do
    api=$(free_port)
    cluster=$(CMK_PORTS_TAKEN="$api" free_port)
    local leader_addr=""
    [ "$node" != node1 ] && read -r _ leader_addr _ < <(head -1 "$DIR/nodes")
    {
      echo "storage \"raft\" {"
      echo "  path    = \"$DIR/$node/raft\""
      echo "  node_id = \"$node\""
      [ -n "$leader_addr" ] && printf '  retry_join {\n    leader_api_addr = "%s"\n  }\n' "$leader_addr"
      echo "}"
      echo "listener \"tcp\" {"
      echo "  address         = \"127.0.0.1:$api\""
      echo "  cluster_address = \"127.0.0.1:$cluster\""
      echo "  tls_disable     = true"
      echo "}"
      echo "api_addr         = \"http://127.0.0.1:$api\""
      echo "cluster_addr     = \"https://127.0.0.1:$cluster\""
      echo "plugin_directory = \"$DIR/$node/plugins\""
      echo "disable_mlock    = true"
      echo "log_level        = \"info\""
    } >"$DIR/$node/config.hcl"
    # setsid: the node outlives this script and is stopped by its pid (scripts/cluster.sh stop).
    setsid "$VAULT_BIN" server -config="$DIR/$node/config.hcl" >"$DIR/$node/vault.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$DIR/$node/pid"
    # Listening, or gone: Vault binds its listeners before anything else, so a taken port shows within moments.
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      (exec 3<>"/dev/tcp/127.0.0.1/$api") 2>/dev/null && break
      sleep 0.1
    done
    if ! kill -0 "$pid" 2>/dev/null && grep -q "address already in use" "$DIR/$node/vault.log"; then
      log "$node: port $api or $cluster was taken before Vault bound it (attempt $attempt); trying others"
      continue
    fi
    echo "$node http://127.0.0.1:$api $pid" >>"$DIR/nodes"
    return 0
  done
  die "$node: could not find free ports in 5 attempts (log in $DIR/$node/vault.log)"
}

start() {
  [ -x "$PLUGIN_BIN" ] || die "plugin not built: run 'make build'"
  [ -x "$VAULT_BIN" ] || die "Vault not built: run 'make vault'"
  if [ -f "$DIR/nodes" ]; then
    while read -r _ _ pid; do
      kill -0 "$pid" 2>/dev/null && die "a cluster from $DIR is running: scripts/cluster.sh stop $DIR"
    done <"$DIR/nodes"
    rm -rf "$DIR" # an earlier cluster of this script's: its storage and token go with it
  elif [ -e "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then
    die "$DIR exists and is not a cluster directory of this script: name a new or empty one"
  fi
  mkdir -p "$DIR/softhsm/tokens"
  chmod 700 "$DIR"
  export SOFTHSM2_CONF="$DIR/softhsm/softhsm2.conf"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$DIR/softhsm/tokens" >"$SOFTHSM2_CONF"
  softhsm2-util --init-token --free --label "$TOKEN_LABEL" --pin "$PIN" --so-pin "$PIN-so" >/dev/null

  local leader="" i
  : >"$DIR/nodes"
  for i in $(seq 1 "$NODES"); do
    start_node "node$i"
  done

  local addr pid key root
  read -r _ addr pid < <(head -1 "$DIR/nodes")
  wait_for "$addr" "$pid" "its API" sh -c '"$0" status; [ $? -ne 1 ]' "$VAULT_BIN"
  log "initialising node1 (1 key share: a test cluster)"
  vault_at "$addr" operator init -key-shares=1 -key-threshold=1 -format=json >"$DIR/init.json"
  chmod 600 "$DIR/init.json"
  key=$(sed -n 's/.*"unseal_keys_b64": *\[ *"\([^"]*\)".*/\1/p' <(tr -d '\n' <"$DIR/init.json"))
  root=$(sed -n 's/.*"root_token": *"\([^"]*\)".*/\1/p' <(tr -d '\n' <"$DIR/init.json"))
  [ -n "$key" ] && [ -n "$root" ] || die "could not read the unseal key and root token from $DIR/init.json"
  vault_at "$addr" operator unseal "$key" >/dev/null
  wait_for "$addr" "$pid" "leadership" env VAULT_TOKEN="$root" "$VAULT_BIN" operator raft list-peers
  while read -r node addr pid; do
    [ "$node" = node1 ] && continue
    wait_for "$addr" "$pid" "its API" sh -c '"$0" status; [ $? -ne 1 ]' "$VAULT_BIN"
    # A node joins through retry_join once it has the unseal key; the first attempt may precede the join.
    wait_for "$addr" "$pid" "unseal" sh -c '"$0" operator unseal "$1" >/dev/null && "$0" status' "$VAULT_BIN" "$key"
  done <"$DIR/nodes"
  read -r _ addr pid < <(head -1 "$DIR/nodes")
  export VAULT_TOKEN="$root"
  wait_for "$addr" "$pid" "$NODES raft voters" sh -c \
    '[ "$("$0" operator raft list-peers -format=json | grep -o "\"voter\": *true" | wc -l)" -eq "$1" ]' "$VAULT_BIN" "$NODES"

  # The catalog entry is replicated; every node's plugin directory holds the same binary.
  vault_at "$addr" plugin register -sha256="$(sha256sum "$PLUGIN_BIN" | cut -d' ' -f1)" \
    -env="CMK_PKCS11_LIBRARY=$CMK_PKCS11_LIBRARY" -env="SOFTHSM2_CONF=$SOFTHSM2_CONF" \
    secret "$PLUGIN_NAME" >/dev/null
  vault_at "$addr" secrets enable -path=cmk "$PLUGIN_NAME" >/dev/null
  vault_at "$addr" write cmk/config/hsm token_label="$TOKEN_LABEL" pin="$PIN" >/dev/null
  printf 'export VAULT_ADDR=%s\nexport VAULT_TOKEN=%s\nexport PATH="%s:$PATH"\n' "$addr" "$root" "$(dirname "$VAULT_BIN")" >"$DIR/env"
  chmod 600 "$DIR/env"
  status
  cat <<MSG

$NODES-node Vault cluster (raft) with the cmk engine at cmk/ on SoftHSM token "$TOKEN_LABEL" (SOFTHSM2_CONF=$SOFTHSM2_CONF).
  source $DIR/env               # node1's address and the root token
  vault write -f cmk/keys/demo  # any node answers; standbys forward to the active node
  kill <pid of the active node> # failover: a standby becomes active and serves the same keys
  scripts/cluster.sh stop $DIR
MSG
}

status() {
  [ -f "$DIR/nodes" ] || die "no cluster in $DIR"
  local node addr pid state
  while read -r node addr pid; do
    if kill -0 "$pid" 2>/dev/null; then
      state=$(vault_at "$addr" status 2>/dev/null | awk '/^HA Mode/ {print $3}')
      printf '%s %s pid %s %s\n' "$node" "$addr" "$pid" "${state:-sealed or starting}"
    else
      printf '%s %s pid %s stopped\n' "$node" "$addr" "$pid"
    fi
  done <"$DIR/nodes"
}

stop() {
  [ -f "$DIR/nodes" ] || die "no cluster in $DIR"
  local node addr pid
  while read -r node addr pid; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      log "stopped $node (pid $pid)"
    fi
  done <"$DIR/nodes"
}

case "$cmd" in
  start) start ;;
  status) status ;;
  stop) stop ;;
  *) die "usage: scripts/cluster.sh start|status|stop [DIR]" ;;
esac
