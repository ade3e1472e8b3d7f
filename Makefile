# Make targets are the interface for people and CI.
SHELL := /bin/bash
GO    ?= go
PLUGIN := .build/plugins/vault-plugin-secrets-cmk
EVIDENCE := .build/bin/cmk-evidence
XKS_PROXY := .build/bin/cmk-xks-proxy
VAULT  := .build/vault/vault
FUZZTIME ?= 10s
SOAK_DURATION ?= 10m
SOAK_FAULT_RATE ?= 0.01
FAULTS_PLUGIN := .build/faults/vault-plugin-secrets-cmk
# The version the plugin reports to Vault (VERSION file); registration under another -version is refused by Vault.
VERSION := $(shell cat VERSION)
VERSION_FLAG := -ldflags "-X github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk.Version=$(VERSION)"

.PHONY: all help api-doc clients build deps vault dev test unit e2e fuzz rules bench bench-smoke reference soak soak-smoke faults-plugin cluster hsm-matrix lint fmt clean

all: build

# Every target with the comment above it.
help:
	@awk '/^# / { c = (c ? c " " : "") substr($$0, 3); next } /^[a-z][a-z0-9-]*:/ { t = $$1; sub(":.*", "", t); if (c) printf "  %-12s %s\n", t, c; c = ""; next } { c = "" }' $(MAKEFILE_LIST)

# The plugin binary, .build/plugins/vault-plugin-secrets-cmk, the offline evidence verifier, .build/bin/cmk-evidence,
# and the AWS External Key Store front end, .build/bin/cmk-xks-proxy.
build:
	$(GO) build -trimpath $(VERSION_FLAG) -o $(PLUGIN) ./cmd/vault-plugin-secrets-cmk
	$(GO) build -trimpath -o $(EVIDENCE) ./cmd/cmk-evidence
	$(GO) build -trimpath -o $(XKS_PROXY) ./cmd/cmk-xks-proxy

# Debian packages the tokens and tests need (softhsm2, opensc, openssl, NSS, opencryptoki, tpm2-pkcs11 on swtpm),
# installed when missing.
deps:
	@scripts/install-deps.sh

# Third-party Transit clients for the end-to-end suite (SOPS, go-kms-wrapping, vault-client-go, sigstore), built
# from the pinned module scripts/clients into .build/clients, reused when present.
clients:
	@scripts/build-clients.sh

# Vault v1.21.0 built from source, reused when present.
vault:
	@scripts/build-vault.sh

# A Vault dev server with the engine mounted at cmk/ on a SoftHSM token; Ctrl-C stops it.
dev: deps build vault
	@scripts/dev.sh

# Unit tests, short fuzzing, then the end-to-end suite against a real Vault server.
test: deps build vault unit fuzz e2e bench-smoke soak-smoke rules

# Unit tests under -race, on real SoftHSM, NSS, opencryptoki and tpm2-pkcs11 tokens (-tags cmkfaults compiles
# the PKCS#11 fault injector the recovery tests use, never in a release build).
unit:
	$(GO) test -tags cmkfaults -race -count=1 -timeout 25m -v $$($(GO) list ./... | grep -v /tests$$) 2>&1 | scripts/test-summary.sh

# The example Prometheus alerting rules: valid, and each alert raised by the series that should raise it.
rules: deps
	promtool check rules examples/prometheus/cmk-alerts.yml
	cd examples/prometheus && promtool test rules cmk-alerts.test.yml

# Short fuzzing of the ciphertext parser and of request decoding (Go's fuzzer takes one target per run).
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParseCiphertext$$' -fuzztime $(FUZZTIME) ./internal/keys/
	$(GO) test -run '^$$' -fuzz '^FuzzRequestData$$' -fuzztime $(FUZZTIME) .

# The end-to-end suite against real Vault servers (dev, raft, a 3-node cluster) with the built plugin.
e2e: deps build vault clients
	CMK_E2E_VAULT=$(CURDIR)/$(VAULT) CMK_E2E_PLUGIN=$(CURDIR)/$(PLUGIN) CMK_E2E_CLIENTS=$(CURDIR)/.build/clients \
	  $(GO) test -race -count=1 -v -timeout 30m ./tests/ 2>&1 | scripts/test-summary.sh

# HashiCorp's external KV plugin, built from the pinned Vault module: the benchmark's transport reference.
reference:
	@test -x .build/reference/vault-plugin-secrets-kv || (cd scripts/vault && $(GO) build -trimpath -ldflags "-s -w" \
	  -o ../../.build/reference/vault-plugin-secrets-kv github.com/hashicorp/vault-plugin-secrets-kv/cmd/vault-plugin-secrets-kv)

# Side-by-side measurements (not part of make test); results go to docs/BENCHMARKS.md.
bench: deps build vault reference faults-plugin
	$(GO) run ./tests/bench -out docs/BENCHMARKS.md $(BENCH_FLAGS)

# The benchmark with tiny counts: checks that it runs, measures nothing.
bench-smoke: deps build vault faults-plugin
	$(GO) run ./tests/bench -quick -kv-plugin=/nonexistent

# The plugin with PKCS#11 failpoints compiled in (-tags cmkfaults), never a release: the soak's random faults
# (CMK_FAULT_RATE_FILE) and the benchmark's network-HSM model (CMK_HSM_LATENCY, a delay per call).
faults-plugin:
	$(GO) build -trimpath -tags cmkfaults -o $(FAULTS_PLUGIN) ./cmd/vault-plugin-secrets-cmk

# Mixed load with injected PKCS#11 faults (1% of calls) and a plugin kill; reports errors by class, lost
# ciphertexts, 400s on valid ones, unexplained 500s and plugin crashes (each must be 0).
soak: deps vault faults-plugin
	$(GO) run ./tests/soak -plugin $(FAULTS_PLUGIN) -duration $(SOAK_DURATION) -fault-rate $(SOAK_FAULT_RATE)

# The soak, shorter: part of make test (2 minutes at 1%).
soak-smoke: deps vault faults-plugin
	$(GO) run ./tests/soak -plugin $(FAULTS_PLUGIN) -duration 2m -fault-rate 0.01

# A 3-node Vault cluster with raft storage on loopback, the engine on one shared SoftHSM token (.cluster/).
cluster: deps build vault
	@scripts/cluster.sh start

# The HSM package's tests on every PKCS#11 implementation, writing their capability table into docs/HSMS.md.
hsm-matrix: deps
	@scripts/hsm-matrix.sh

# docs/API.md written again from the paths' schemas and sample requests on a SoftHSM token (make test checks it).
api-doc: deps
	CMK_UPDATE_API_DOC=1 $(GO) test -count=1 -run '^TestAPIReference$$' .

# gofmt, go vet and staticcheck, with and without -tags cmkfaults.
lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed: make fmt"; exit 1; }
	$(GO) vet ./...
	$(GO) vet -tags cmkfaults ./...
	@command -v staticcheck >/dev/null || $(GO) install honnef.co/go/tools/cmd/staticcheck@latest
	PATH="$$PATH:$$($(GO) env GOPATH)/bin" staticcheck ./...
	PATH="$$PATH:$$($(GO) env GOPATH)/bin" staticcheck -tags cmkfaults ./...

# gofmt every tracked Go file.
fmt:
	gofmt -w $$(git ls-files '*.go')

# Remove the plugin and tool builds and the dev server's state (the Vault build in .build/vault is kept).
clean:
	rm -rf .build/plugins .build/bin .dev
