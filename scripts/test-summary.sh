#!/usr/bin/env bash
# Passes `go test -v` output through unchanged and ends it with one line "N passed, N failed, N skipped",
# keeping go test's exit status (read from its own output: the pipe hides it).
set -uo pipefail
pass=0 fail=0 skip=0 bad=0
while IFS= read -r line; do
  printf '%s\n' "$line"
  case "$line" in
    *"--- PASS: "*) pass=$((pass+1)) ;;
    *"--- FAIL: "*) fail=$((fail+1)) ;;
    *"--- SKIP: "*) skip=$((skip+1)) ;;
  esac
  case "$line" in
    FAIL*|"panic: "*|*"[build failed]"*|*"[setup failed]"*) bad=1 ;;
  esac
done
echo "$pass passed, $fail failed, $skip skipped"
# A run that passed nothing (its go test killed before it printed: output of several packages comes at each
# package's end) is no pass.
[ "$fail" -eq 0 ] && [ "$bad" -eq 0 ] && [ "$pass" -gt 0 ]
