package tests

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"
)

// TestAuditLogHidesPlaintextAndPIN: Vault's own file audit device records every request to the engine, with
// the plaintext HMAC'd, never in clear; no PIN appears in the audit log or in the server's log.
func TestAuditLogHidesPlaintextAndPIN(t *testing.T) {
	c := dev.Client
	logPath := filepath.Join(t.TempDir(), "audit.log")
	device := "file-" + strings.ReplaceAll(t.Name(), "/", "-")
	if err := c.Sys().EnableAuditWithOptions(device, &api.EnableAuditOptions{
		Type: "file", Options: map[string]string{"file_path": logPath},
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Sys().DisableAudit(device)

	m := newMount(t, dev) // config/hsm with the PIN is written while the audit device is on
	secret := "audit-me-plaintext-4f1c"
	mustWrite(t, c, m.Path+"/keys/audited", nil)
	ct := encrypt(t, c, m, "audited", secret)
	decrypt(t, c, m, "audited", ct)

	raw, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, leak := range []string{secret, b64(secret), m.PIN} {
		if strings.Contains(string(raw), leak) {
			t.Fatalf("audit log contains %q in clear", leak)
		}
	}
	var sawEncrypt, sawConfig bool
	sc := bufio.NewScanner(strings.NewReader(string(raw)))
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var entry struct {
			Type    string `json:"type"`
			Request struct {
				Path string                 `json:"path"`
				Data map[string]interface{} `json:"data"`
			} `json:"request"`
		}
		if err := json.Unmarshal(sc.Bytes(), &entry); err != nil {
			t.Fatal(err)
		}
		if entry.Type != "request" {
			continue
		}
		switch entry.Request.Path {
		case m.Path + "/encrypt/audited":
			sawEncrypt = true
			if v, _ := entry.Request.Data["plaintext"].(string); !strings.HasPrefix(v, "hmac-sha256:") {
				t.Fatalf("plaintext in the audit entry is not HMAC'd: %q", v)
			}
		case m.Path + "/config/hsm":
			sawConfig = true
			if v, _ := entry.Request.Data["pin"].(string); !strings.HasPrefix(v, "hmac-sha256:") {
				t.Fatalf("PIN in the audit entry is not HMAC'd: %q", v)
			}
		}
	}
	if !sawEncrypt || !sawConfig {
		t.Fatalf("audit log lacks the encrypt (%v) or config/hsm (%v) request", sawEncrypt, sawConfig)
	}
	serverLog, err := os.ReadFile(dev.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(serverLog), m.PIN) || strings.Contains(string(serverLog), secret) {
		t.Fatal("the server log contains the PIN or a plaintext")
	}
}
