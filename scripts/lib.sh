# Shared helpers for the scripts; source it, do not run it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/.build"
VAULT_VERSION="1.21.0"
VAULT_BIN="$BUILD/vault/vault"
PLUGIN_DIR="$BUILD/plugins"
PLUGIN_NAME="vault-plugin-secrets-cmk"
: "${CMK_PKCS11_LIBRARY:=/usr/lib/softhsm/libsofthsm2.so}"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# free_port prints a TCP port on 127.0.0.1 that nothing listens on.
free_port() {
  local port
  for _ in $(seq 1 100); do
    port=$(( 20000 + RANDOM % 40000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  die "no free port found"
}

# wait_vault waits until the server at $1 answers its health check.
wait_vault() {
  local addr=$1 pid=$2
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || return 1
    if VAULT_ADDR="$addr" "$VAULT_BIN" status >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}
