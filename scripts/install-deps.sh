#!/usr/bin/env bash
# Installs what the dev environment and the tests need from Debian's packages, when missing: softhsm2 (the
# PKCS#11 token of make dev), opensc (pkcs11-tool, to look at tokens and to delete an object behind the engine's
# back in a test), openssl (the tests check CSRs and signatures with it and sign with imported keys), python3
# (make hsm-matrix writes docs/HSMS.md with it), prometheus (an end-to-end test scrapes the metrics with it, and
# promtool checks the example rules), chromium (a unit test opens cmk-evidence's HTML report in headless Chromium),
# wrk (make bench measures single requests with it, as a client outside Go's HTTP stack), curl (the AWS External
# Key Store tests sign their requests with its own --aws-sigv4, an implementation apart from the engine's);
# and the other PKCS#11 implementations of
# the test matrix: NSS softokn (libnss3, with certutil from libnss3-tools), opencryptoki's software token, and
# tpm2-pkcs11 on a software TPM (swtpm) behind tpm2-abrmd on a D-Bus session bus of the test's own.
source "$(dirname "$0")/lib.sh"

missing=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
[ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null || missing+=(softhsm2)
command -v pkcs11-tool >/dev/null || missing+=(opensc)
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3)
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
for p in libnss3 libnss3-tools opencryptoki libtpm2-pkcs11-1 libtpm2-pkcs11-tools swtpm swtpm-tools tpm2-abrmd \
  libtss2-tcti-tabrmd0 dbus-daemon; do
  have "$p" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
  SUDO=sudo
fi
log "installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
