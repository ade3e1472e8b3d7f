// Command vault-plugin-secrets-cmk serves the cmk secrets engine to Vault as an external, multiplexed plugin.
package main

import (
	"net/http"
	_ "net/http/pprof" // served only when CMK_PPROF_ADDR is set
	"os"
	"strings"

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

func fatal(err error) {
	hclog.New(&hclog.LoggerOptions{}).Error("plugin shutting down", "error", err)
	os.Exit(1)
}
