#!/usr/bin/env python3
"""Splits a CPU profile of the plugin by layer: each sample goes to the innermost layer on its stack (the HSM
before the key model, the model before the request handler, the handler before Vault's plugin transport); what
has none of them is Go's runtime (GC, scheduler) or other. Reads `go tool pprof -traces BINARY PROFILE` on stdin.
Used for docs/BENCHMARKS.md's CPU profiles (make bench BENCH_FLAGS='-cpuprofile F -profile-load single|batch')."""
import re
import sys

LAYERS = [
    ("HSM (hsm/, PKCS#11 calls, SoftHSM)", ("/hsm.", "miekg/pkcs11", "_Cfunc_", "softhsm", "SoftHSM", "libsofthsm", "Botan", "OSSL", "EVP_", "libcrypto")),
    ("key model (internal/keys)", ("/internal/keys.",)),
    ("request handler (path_*.go, Vault's framework)", ("vault-plugin-secrets-cmk/vault-plugin-secrets-cmk.", "vault/sdk/framework", "vault/sdk/logical", "internal/evidence")),
    ("Vault's plugin transport (gRPC, HTTP/2, protobuf, network)", ("google.golang.org/grpc", "golang.org/x/net/http2", "google.golang.org/protobuf",
                                                                 "go-plugin", "vault/sdk/plugin", "net.", "internal/poll", "syscall.", "crypto/tls", "bufio.")),
    ("Go runtime (GC, scheduler)", ("runtime.",)),
]

def units(value):
    m = re.match(r"\s*([0-9.]+)(ns|us|µs|ms|s)\b", value)
    if not m:
        return 0.0
    return float(m.group(1)) * {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]

totals, total = {}, 0.0
for block in sys.stdin.read().split("-----------+-------------------------------------------------------"):
    lines = [l for l in block.splitlines() if l.strip()]
    m = re.match(r"\s*([0-9.]+(?:ns|us|µs|ms|s))\s+(.*)", lines[0]) if lines else None
    if not m:
        continue
    v = units(m.group(1))
    frames = [m.group(2)] + [l.strip() for l in lines[1:]]
    layer = "other"
    for name, marks in LAYERS:
        if any(any(m in f for m in marks) for f in frames):
            layer = name
            break
    totals[layer] = totals.get(layer, 0.0) + v
    total += v

print("| layer | share of the plugin's CPU |")
print("|---|---|")
for name, _ in LAYERS + [("other", ())]:
    if name in totals:
        print(f"| {name} | {100 * totals[name] / total:.0f}% |")
