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
	// A refused PIN is not echoed in the error; the configuration read shows no PIN.
	wrongPIN := "wrong-pin-93kd-7"
	_, err := c.Logical().Write(m.Path+"/config/hsm", map[string]interface{}{"token_label": m.Label, "pin": wrongPIN})
	if err == nil || strings.Contains(err.Error(), wrongPIN) || strings.Contains(err.Error(), m.PIN) {
		t.Fatalf("config/hsm with a wrong PIN: %v", err)
	}
	cfg, err := c.Logical().Read(m.Path + "/config/hsm")
	if err != nil {
		t.Fatal(err)
	}
	if shown, _ := json.Marshal(cfg); strings.Contains(string(shown), m.PIN) || cfg.Data["connected"] != true {
		t.Fatalf("config/hsm read: %s", shown)
	}

	raw, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, leak := range []string{secret, b64(secret), m.PIN, wrongPIN} {
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
			if v, ok := entry.Request.Data["pin"].(string); ok {
				sawConfig = true
				if !strings.HasPrefix(v, "hmac-sha256:") {
					t.Fatalf("PIN in the audit entry is not HMAC'd: %q", v)
				}
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
	if strings.Contains(string(serverLog), m.PIN) || strings.Contains(string(serverLog), wrongPIN) || strings.Contains(string(serverLog), secret) {
		t.Fatal("the server log contains the PIN or a plaintext")
	}
}
