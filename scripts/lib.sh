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

# free_port prints a TCP port on 127.0.0.1 that nothing listens on. It draws from below the kernel's
# ephemeral range, so no port the kernel hands out (a client's, or a test server's bound to :0) can take it
# between this check and the server's bind; ports named in CMK_PORTS_TAKEN (space-separated) are skipped.
free_port() {
  local port low=20000 high=32767 first
  if read -r first _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null && [ "$first" -gt $((low + 1000)) ]; then
    high=$((first - 1))
  fi
  for _ in $(seq 1 200); do
    port=$(( low + RANDOM % (high - low + 1) ))
    case " ${CMK_PORTS_TAKEN:-} " in *" $port "*) continue ;; esac
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
