package tests

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"
)

// On a real server, a token without an entity (as the token auth method makes them) rotates a key and computes an
// HMAC: the key's history and created_by carry its accessor only as token_accessor_hmac, the same value for each of
// its events, and no response or server log line carries the accessor in clear. The value is not the audit
// device's HMAC of the same accessor (sys/audit-hash): each audit device has a salt of its own, as the README says.
func TestHistoryRecordsTokenAccessorOnlyAsHMAC(t *testing.T) {
	c := dev.Client
	device := "file-" + strings.ReplaceAll(t.Name(), "/", "-")
	if err := c.Sys().EnableAuditWithOptions(device, &api.EnableAuditOptions{
		Type: "file", Options: map[string]string{"file_path": filepath.Join(t.TempDir(), "audit.log")},
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Sys().DisableAudit(device)
	m := newMount(t, dev)

	child, err := c.Auth().Token().Create(&api.TokenCreateRequest{DisplayName: "accessor-test"})
	if err != nil {
		t.Fatal(err)
	}
	accessor := child.Auth.Accessor
	tc, err := c.Clone()
	if err != nil {
		t.Fatal(err)
	}
	tc.SetToken(child.Auth.ClientToken)
	var shown []string
	write := func(path string, data map[string]interface{}) *api.Secret {
		t.Helper()
		s := mustWrite(t, tc, m.Path+path, data)
		raw, _ := json.Marshal(s)
		shown = append(shown, string(raw))
		return s
	}
	write("/keys/k", nil)
	write("/keys/k/rotate", nil)
	write("/hmac/k", map[string]interface{}{"input": b64("data")})
	history, err := tc.Logical().Read(m.Path + "/keys/k/history")
	if err != nil {
		t.Fatal(err)
	}
	key, err := tc.Logical().Read(m.Path + "/keys/k")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []*api.Secret{history, key} {
		raw, _ := json.Marshal(s)
		shown = append(shown, string(raw))
	}
	for _, s := range shown {
		if strings.Contains(s, accessor) {
			t.Fatalf("a response carries the token accessor in clear: %s", s)
		}
	}
	var value string
	for _, ev := range history.Data["events"].([]interface{}) {
		h, _ := ev.(map[string]interface{})["token_accessor_hmac"].(string)
		if !strings.HasPrefix(h, "hmac-sha256:") || value != "" && h != value {
			t.Fatalf("event %v: want one token_accessor_hmac for the token's events (%s)", ev, value)
		}
		value = h
	}
	for n, v := range key.Data["versions"].(map[string]interface{}) {
		if by := v.(map[string]interface{})["created_by"]; by != "token-accessor-test (token accessor "+value+")" {
			t.Fatalf("version %s created_by %v", n, by)
		}
	}
	audit, err := c.Sys().AuditHash(device, accessor)
	if err != nil {
		t.Fatal(err)
	}
	if audit == value {
		t.Fatalf("the audit device's HMAC equals the mount's: %s (the README says they differ)", audit)
	}
	serverLog, err := os.ReadFile(dev.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(serverLog), accessor) {
		t.Fatal("the server log carries the token accessor in clear")
	}
}
