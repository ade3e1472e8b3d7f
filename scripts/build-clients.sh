#!/usr/bin/env bash
# Builds the third-party Transit clients the end-to-end suite runs (tests/clients_test.go) from the pinned module
# scripts/clients into .build/clients: the SOPS binary and transit-clients, a small driver of the library clients
# (go-kms-wrapping's transit wrapper, vault-client-go, sigstore's hashivault KMS). Binaries of the right versions
# built from the same sources are reused. None of these modules enters the plugin's go.mod.
source "$(dirname "$0")/lib.sh"

SOPS_VERSION="3.13.3"
CLIENTS_SRC="$ROOT/scripts/clients"
CLIENTS_BIN="$BUILD/clients"
SOPS_BIN="$CLIENTS_BIN/sops"
DRIVER_BIN="$CLIENTS_BIN/transit-clients"

# The driver carries a hash of the module's sources (-X main.sourceStamp), so a changed driver or go.sum is
# rebuilt; SOPS is checked by its version.
stamp=$(cd "$CLIENTS_SRC" && cat go.mod go.sum tools.go transit-clients/*.go | sha256sum | cut -c1-16)

sops_ok() { [ -x "$SOPS_BIN" ] && "$SOPS_BIN" --disable-version-check --version 2>/dev/null | grep -q "^sops $SOPS_VERSION\b"; }
driver_ok() { [ -x "$DRIVER_BIN" ] && [ "$("$DRIVER_BIN" -version 2>/dev/null | head -1)" = "transit-clients $stamp" ]; }

if sops_ok && driver_ok; then
  exit 0
fi
mkdir -p "$CLIENTS_BIN"
start=$(date +%s)
if ! sops_ok; then
  log "building SOPS v$SOPS_VERSION from the pinned module scripts/clients"
  ( cd "$CLIENTS_SRC" && go build -trimpath -ldflags "-s -w" -o "$SOPS_BIN.tmp" github.com/getsops/sops/v3/cmd/sops )
  mv "$SOPS_BIN.tmp" "$SOPS_BIN"
  sops_ok || die "built $("$SOPS_BIN" --disable-version-check --version 2>&1 | head -1), want sops $SOPS_VERSION"
fi
if ! driver_ok; then
  log "building transit-clients (go-kms-wrapping transit, vault-client-go, sigstore hashivault)"
  ( cd "$CLIENTS_SRC" && go build -trimpath -ldflags "-s -w -X main.sourceStamp=$stamp" -o "$DRIVER_BIN.tmp" ./transit-clients )
  mv "$DRIVER_BIN.tmp" "$DRIVER_BIN"
  driver_ok || die "built transit-clients $("$DRIVER_BIN" -version | head -1), want stamp $stamp"
fi
log "built the Transit clients in $(( $(date +%s) - start ))s:"
"$SOPS_BIN" --disable-version-check --version | head -1 >&2
"$DRIVER_BIN" -version | tail -n +2 >&2
