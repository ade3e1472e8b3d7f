// Package tests is the end-to-end suite: a real Vault server built from source, the plugin registered in its
// catalog by SHA-256, and a real SoftHSM token made for the run. It runs when CMK_E2E_VAULT and CMK_E2E_PLUGIN
// name the binaries (make e2e sets them).
package tests

import (
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/softhsmtest"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
)

const pluginName = vaulttest.PluginName

var (
	vaultBin  string
	pluginBin string
	softhsm   *softhsmtest.Env
	workDir   string
	dev       *vaulttest.Server // one dev server shared by the tests that need no restart
)

func TestMain(m *testing.M) {
	vaultBin, pluginBin = os.Getenv("CMK_E2E_VAULT"), os.Getenv("CMK_E2E_PLUGIN")
	if vaultBin == "" || pluginBin == "" {
		fmt.Println("end-to-end suite skipped: set CMK_E2E_VAULT and CMK_E2E_PLUGIN (make e2e does)")
		os.Exit(0)
	}
	var err error
	workDir, err = os.MkdirTemp("", "cmk-e2e-")
	if err != nil {
		panic(err)
	}
	code := func() int {
		softhsm, err = softhsmtest.Setup(filepath.Join(workDir, "softhsm"))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		dev, err = vaulttest.StartDev(filepath.Join(workDir, "dev"), vaultBin, pluginBin, softhsm)
		if err != nil {
			fmt.Fprintln(os.Stderr, "start Vault dev server:", err)
			return 1
		}
		defer dev.Stop()
		return m.Run()
	}()
	if code == 0 {
		os.RemoveAll(workDir)
	} else {
		fmt.Fprintln(os.Stderr, "kept for inspection:", workDir)
	}
	os.Exit(code)
}

// mount is one mount of the engine on a token of its own.
type mount = vaulttest.Mount

// newMount creates a token and mounts the engine, configured on it, on server s.
func newMount(t *testing.T, s *vaulttest.Server) mount {
	t.Helper()
	m, err := s.NewMount("cmk")
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func mountOn(t *testing.T, s *vaulttest.Server, m mount) {
	t.Helper()
	if err := s.MountOn(m); err != nil {
		t.Fatal(err)
	}
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// statusOf returns the HTTP status of a failed API call, 0 for success.
func statusOf(err error) int {
	if err == nil {
		return 0
	}
	if re, ok := err.(*api.ResponseError); ok {
		return re.StatusCode
	}
	return -1
}

func mustWrite(t *testing.T, c *api.Client, path string, data map[string]interface{}) *api.Secret {
	t.Helper()
	s, err := c.Logical().Write(path, data)
	if err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
	return s
}

func encrypt(t *testing.T, c *api.Client, m mount, key, plaintext string) string {
	t.Helper()
	return mustWrite(t, c, m.Path+"/encrypt/"+key, map[string]interface{}{"plaintext": b64(plaintext)}).Data["ciphertext"].(string)
}

func decrypt(t *testing.T, c *api.Client, m mount, key, ct string) string {
	t.Helper()
	s := mustWrite(t, c, m.Path+"/decrypt/"+key, map[string]interface{}{"ciphertext": ct})
	pt, err := base64.StdEncoding.DecodeString(s.Data["plaintext"].(string))
	if err != nil {
		t.Fatal(err)
	}
	return string(pt)
}
