//go:build tools

// Package vault pins the Vault server that the dev environment and the end-to-end tests run: a small module of
// its own, so that `go build github.com/hashicorp/vault` builds exactly the version in go.mod.
package vault

import _ "github.com/hashicorp/vault"
