#!/usr/bin/env bash
# Runs the HSM package's token-matrix tests on every PKCS#11 implementation and writes the capability table they
# record into docs/HSMS.md, between its markers.
source "$(dirname "$0")/lib.sh"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
CMK_MATRIX_OUT="$out" go test -tags cmkfaults -count=1 -run 'TestEveryAlgorithmOnEveryToken|TestImportOnEveryToken|TestWorkingCopyProbeOnEveryToken' ./hsm/
doc=docs/HSMS.md
python3 - "$doc" "$out" <<'PY'
import sys
doc, table = sys.argv[1], open(sys.argv[2]).read()
text = open(doc).read()
begin, end = "<!-- matrix:begin -->", "<!-- matrix:end -->"
i, j = text.index(begin) + len(begin), text.index(end)
open(doc, "w").write(text[:i] + "\n" + table + text[j:])
PY
log "capability table written to $doc"
