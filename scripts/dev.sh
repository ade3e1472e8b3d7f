#!/usr/bin/env bash
# make dev: a Vault dev server on 127.0.0.1 with the plugin mounted at cmk/ on a SoftHSM token of its own.
# Runs in the foreground until interrupted, then stops the server it started. Expects `make build vault deps`.
source "$(dirname "$0")/lib.sh"

DEV="$ROOT/.dev"
TOKEN_LABEL="cmk-dev"
PIN="${CMK_DEV_PIN:-1234}"
ROOT_TOKEN="root"
PLUGIN_BIN="$PLUGIN_DIR/$PLUGIN_NAME"
[ -x "$PLUGIN_BIN" ] || die "plugin not built: run 'make dev'"
[ -x "$VAULT_BIN" ] || die "Vault not built: run 'make dev'"

# A fresh token each run: the dev server keeps its storage in memory, so objects from an earlier run would be
# orphans no Vault knows of.
rm -rf "$DEV/softhsm"
mkdir -p "$DEV/softhsm/tokens"
export SOFTHSM2_CONF="$DEV/softhsm/softhsm2.conf"
cat > "$SOFTHSM2_CONF" <<CONF
directories.tokendir = $DEV/softhsm/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
softhsm2-util --init-token --free --label "$TOKEN_LABEL" --pin "$PIN" --so-pin "$PIN-so" >/dev/null

PORT=$(free_port)
export VAULT_ADDR="http://127.0.0.1:$PORT"
export VAULT_TOKEN="$ROOT_TOKEN"
# -dev-no-store-token: .dev/env carries the token; the user's own ~/.vault-token is left as it was.
"$VAULT_BIN" server -dev -dev-no-store-token -dev-root-token-id="$ROOT_TOKEN" -dev-listen-address="127.0.0.1:$PORT" \
  -dev-plugin-dir="$PLUGIN_DIR" >"$DEV/vault.log" 2>&1 &
VAULT_PID=$!
stop() {
  trap - INT TERM EXIT
  if kill -0 "$VAULT_PID" 2>/dev/null; then
    log "stopping Vault (pid $VAULT_PID)"
    kill "$VAULT_PID" 2>/dev/null || true
    wait "$VAULT_PID" 2>/dev/null || true
  fi
}
trap stop EXIT
# Ctrl-C, SIGINT or SIGTERM is how this script is meant to end: a clean stop exits 0, so make reports no error.
trap 'stop; log "stopped"; exit 0' INT TERM
wait_vault "$VAULT_ADDR" "$VAULT_PID" || { tail -20 "$DEV/vault.log" >&2; die "Vault did not start (log: $DEV/vault.log)"; }

vault() { "$VAULT_BIN" "$@"; }
SHA=$(sha256sum "$PLUGIN_BIN" | cut -d' ' -f1)
vault plugin register -sha256="$SHA" \
  -env="CMK_PKCS11_LIBRARY=$CMK_PKCS11_LIBRARY" -env="SOFTHSM2_CONF=$SOFTHSM2_CONF" \
  secret "$PLUGIN_NAME" >/dev/null
vault secrets enable -path=cmk "$PLUGIN_NAME" >/dev/null
# SoftHSM 2.6's RSA-OAEP lacks SHA-256, which vault transit import wraps with: let imports use the raw-RSA
# fallback (README, BYOK on SoftHSM 2.6).
vault write cmk/config/hsm token_label="$TOKEN_LABEL" pin="$PIN" raw_rsa_oaep_fallback=true >/dev/null
vault write -f cmk/keys/demo >/dev/null

cat > "$DEV/env" <<ENV
export VAULT_ADDR=$VAULT_ADDR
export VAULT_TOKEN=$ROOT_TOKEN
export SOFTHSM2_CONF=$SOFTHSM2_CONF
export PATH="$(dirname "$VAULT_BIN"):\$PATH"
ENV

cat <<MSG

Vault $VAULT_VERSION dev server with the cmk engine at cmk/, on SoftHSM token "$TOKEN_LABEL".
In another terminal:

    source .dev/env        # or:
    export VAULT_ADDR=$VAULT_ADDR VAULT_TOKEN=$ROOT_TOKEN SOFTHSM2_CONF=$SOFTHSM2_CONF
    export PATH="$(dirname "$VAULT_BIN"):\$PATH"

Then, for example:

    vault read cmk/config/hsm
    vault read cmk/keys/demo
    CT=\$(vault write -field=ciphertext cmk/encrypt/demo plaintext=\$(echo -n "hello" | base64))
    vault write -field=plaintext cmk/decrypt/demo ciphertext="\$CT" | base64 -d; echo
    vault write -f cmk/keys/demo/rotate
    pkcs11-tool --module $CMK_PKCS11_LIBRARY --token-label $TOKEN_LABEL --login --pin $PIN --list-objects

Server log: .dev/vault.log. Ctrl-C stops the server, as does SIGINT or SIGTERM to this script (pid $$).
MSG
wait "$VAULT_PID"
