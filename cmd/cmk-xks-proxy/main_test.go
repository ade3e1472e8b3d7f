package main

import (
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/hashicorp/go-hclog"
)

// The front end verifies Vault's TLS whatever the environment says: VAULT_SKIP_VERIFY would send its token and
// AWS's data keys to whoever answers, and VAULT_AGENT_ADDR would send them elsewhere than -vault-addr.
func TestVaultTLSIsVerifiedWhateverTheEnvironment(t *testing.T) {
	t.Setenv("VAULT_SKIP_VERIFY", "true")
	t.Setenv("VAULT_AGENT_ADDR", "http://127.0.0.1:1")
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("hvs.test\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := newProxy(config{vaultAddr: "https://vault.example.internal:8200", tokenFile: tokenFile, mount: "cmk"}, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	tr := p.client.CloneConfig().HttpClient.Transport.(*http.Transport)
	if tr.TLSClientConfig.InsecureSkipVerify {
		t.Fatal("VAULT_SKIP_VERIFY turned verification off")
	}
	if p.client.Address() != "https://vault.example.internal:8200" {
		t.Fatalf("the proxy talks to %s", p.client.Address())
	}
	if p.client.Token() != "hvs.test" {
		t.Fatalf("token %q", p.client.Token())
	}
}

// What is not an XKS request's path is answered here.
func TestXKSShapedPaths(t *testing.T) {
	for path, want := range map[string]bool{
		"/kms/xks/v1/health": true, "/a/b-c/kms/xks/v1/keys/k.1_x/encrypt": true, "/t/kms/xks/v1/keys/k/metadata": true,
		"/kms/xks/v1/keys/k/sign": false, "/kms/xks/v2/health": false, "/healthz": false, "/t/kms/xks/v1/keys//decrypt": false,
	} {
		if got := xksShaped.MatchString(path); got != want {
			t.Errorf("%s: %v", path, got)
		}
	}
}
