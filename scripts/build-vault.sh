#!/usr/bin/env bash
# Builds the pinned Vault server from source (scripts/vault/go.mod) into .build/vault/vault, unless a binary of
# the right version is already there. A cold build takes several minutes on two cores.
source "$(dirname "$0")/lib.sh"

if [ -x "$VAULT_BIN" ] && "$VAULT_BIN" version 2>/dev/null | grep -q "^Vault v$VAULT_VERSION[ ,]"; then
  exit 0
fi
mkdir -p "$(dirname "$VAULT_BIN")"
log "building Vault v$VAULT_VERSION from source (takes several minutes the first time)"
start=$(date +%s)
( cd "$ROOT/scripts/vault" && go build -trimpath -ldflags "-s -w" -o "$VAULT_BIN.tmp" github.com/hashicorp/vault )
mv "$VAULT_BIN.tmp" "$VAULT_BIN"
"$VAULT_BIN" version | grep -q "^Vault v$VAULT_VERSION[ ,]" || die "built $("$VAULT_BIN" version), want v$VAULT_VERSION"
log "built $("$VAULT_BIN" version) in $(( $(date +%s) - start ))s"
