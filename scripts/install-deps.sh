#!/usr/bin/env bash
# Installs what the dev environment and the tests need from Debian's packages, when missing:
# softhsm2 (the PKCS#11 token) and opensc (pkcs11-tool, to look at tokens).
source "$(dirname "$0")/lib.sh"

missing=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null || missing+=(softhsm2)
command -v pkcs11-tool >/dev/null || missing+=(opensc)
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
  SUDO=sudo
fi
log "installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
