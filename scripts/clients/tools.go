//go:build tools

// Package clients pins the third-party Transit clients the end-to-end suite runs (scripts/build-clients.sh
// builds them into .build/clients): a module of its own, so that none of them enters the plugin's go.mod. The
// library clients are imported by the driver in transit-clients/; SOPS is a program, pinned here.
package clients

import _ "github.com/getsops/sops/v3/cmd/sops"
