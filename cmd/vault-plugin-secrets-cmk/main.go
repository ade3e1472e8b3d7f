// Command vault-plugin-secrets-cmk serves the cmk secrets engine to Vault as an external, multiplexed plugin.
package main

import (
	"net/http"
	_ "net/http/pprof" // served only when CMK_PPROF_ADDR is set
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/plugin"

	cmk "github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk"
)

func main() {
	// Profiling for benchmarks: only when the operator sets CMK_PPROF_ADDR at registration, only on loopback.
	if addr := os.Getenv("CMK_PPROF_ADDR"); strings.HasPrefix(addr, "127.0.0.1:") {
		go func() { _ = http.ListenAndServe(addr, nil) }()
	}
	exitWhenOrphaned()
	meta := &api.PluginAPIClientMeta{}
	flags := meta.FlagSet()
	if err := flags.Parse(os.Args[1:]); err != nil {
		fatal(err)
	}
	err := plugin.ServeMultiplex(&plugin.ServeOpts{
		BackendFactoryFunc: cmk.Factory,
		TLSProviderFunc:    api.VaultPluginTLSProvider(meta.GetTLSConfig()),
	})
	if err != nil {
		fatal(err)
	}
}

// exitWhenOrphaned ends the plugin once Vault, its parent, is gone. Vault stops its plugins itself, but not
// always: a node killed outright, or stopped while it was starting the plugin, leaves it running, with HSM
// sessions and a login open for no one.
func exitWhenOrphaned() {
	parent := os.Getppid()
	go func() {
		for range time.Tick(2 * time.Second) {
			if os.Getppid() != parent {
				hclog.New(&hclog.LoggerOptions{}).Warn("Vault, the parent process, is gone: plugin exiting", "parent_pid", parent)
				os.Exit(0)
			}
		}
	}()
}

func fatal(err error) {
	hclog.New(&hclog.LoggerOptions{}).Error("plugin shutting down", "error", err)
	os.Exit(1)
}
