package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
)

// people is a userpass auth method of a test's own: users log in as Vault entities, as the people and services
// zero-trust conditions are about do.
type people struct {
	t    *testing.T
	srv  *vaulttest.Server
	path string // the auth method's mount path
}

func newPeople(t *testing.T, srv *vaulttest.Server, m mount) *people {
	t.Helper()
	p := &people{t: t, srv: srv, path: "userpass-" + m.Path}
	if err := srv.Client.Sys().EnableAuthWithOptions(p.path, &api.EnableAuthOptions{Type: "userpass"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Client.Sys().DisableAuth(p.path) })
	return p
}

// login creates user name with the policies and logs it in; it returns a client holding the user's token and the
// entity Vault made for it.
func (p *people) login(name string, policies ...string) (*api.Client, string) {
	p.t.Helper()
	mustWrite(p.t, p.srv.Client, "auth/"+p.path+"/users/"+name, map[string]interface{}{"password": "pw-" + name, "token_policies": strings.Join(policies, ",")})
	c, err := p.srv.Client.Clone()
	if err != nil {
		p.t.Fatal(err)
	}
	c.ClearToken()
	s, err := c.Logical().Write("auth/"+p.path+"/login/"+name, map[string]interface{}{"password": "pw-" + name})
	if err != nil {
		p.t.Fatalf("login %s: %v", name, err)
	}
	c.SetToken(s.Auth.ClientToken)
	if s.Auth.EntityID == "" {
		p.t.Fatalf("login %s: no entity", name)
	}
	return c, s.Auth.EntityID
}

// from is c sending its requests from source address ip (another loopback address: Vault listens on 127.0.0.1).
func from(t *testing.T, c *api.Client, ip string) *api.Client {
	t.Helper()
	cfg := api.DefaultConfig()
	cfg.Address = c.Address()
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 10 * time.Second}
	cfg.HttpClient = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		return dialer.DialContext(ctx, network, addr)
	}}}
	out, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	out.SetToken(c.Token())
	return out
}

// appPolicy lets its holder use key name of mount m for every operation (the ACL's gate), nothing else.
func appPolicy(t *testing.T, srv *vaulttest.Server, m mount, name string) string {
	t.Helper()
	policy := m.Path + "-use-" + name
	rules := ""
	for _, op := range []string{"encrypt", "decrypt", "rewrap", "datakey/plaintext", "datakey/wrapped", "hmac", "sign", "verify"} {
		rules += `path "` + m.Path + "/" + op + "/" + name + `" { capabilities = ["update"] }` + "\n"
	}
	if err := srv.Client.Sys().PutPolicy(policy, rules); err != nil {
		t.Fatal(err)
	}
	return policy
}

// denied checks a call was refused with 403 by the key's condition named.
func denied(t *testing.T, what string, err error, condition string) {
	t.Helper()
	if statusOf(err) != 403 || !strings.Contains(err.Error(), condition) {
		t.Fatalf("%s: want 403 naming %s, got %v", what, condition, err)
	}
}

// TestAccessConditionsOnARealServer: a key bound to a network, a group and entity metadata, through Vault's real
// userpass entities, identity groups and listener: the ACL admits all callers, the key's conditions do not.
func TestAccessConditionsOnARealServer(t *testing.T) {
	m := newMount(t, dev)
	root := dev.Client
	mustWrite(t, root, m.Path+"/keys/pay", nil)
	p := newPeople(t, dev, m)
	policy := appPolicy(t, dev, m, "pay")
	alice, aliceID := p.login("alice", policy)
	bob, _ := p.login("bob", policy)
	group := m.Path + "-payments-ops"
	mustWrite(t, root, "identity/group", map[string]interface{}{"name": group, "member_entity_ids": []string{aliceID}})
	mustWrite(t, root, "identity/entity/id/"+aliceID, map[string]interface{}{"metadata": map[string]string{"device": "managed"}})

	auditLog := filepath.Join(t.TempDir(), "audit.log")
	device := "file-" + m.Path
	if err := root.Sys().EnableAuditWithOptions(device, &api.EnableAuditOptions{Type: "file", Options: map[string]string{"file_path": auditLog}}); err != nil {
		t.Fatal(err)
	}
	defer root.Sys().DisableAudit(device)

	ct := encrypt(t, alice, m, "pay", "before any condition")
	mustWrite(t, root, m.Path+"/keys/pay/access", map[string]interface{}{
		"allowed_cidrs": "127.0.0.1/32", "allowed_groups": group, "required_entity_metadata": "device=managed",
	})
	if got := decrypt(t, alice, m, "pay", ct); got != "before any condition" {
		t.Fatalf("alice decrypts %q", got)
	}
	_, err := from(t, alice, "127.0.0.2").Logical().Write(m.Path+"/decrypt/pay", map[string]interface{}{"ciphertext": ct})
	denied(t, "alice from 127.0.0.2", err, "allowed_cidrs")
	_, err = from(t, alice, "127.0.0.2").Logical().Write(m.Path+"/encrypt/pay", map[string]interface{}{
		"batch_input": []interface{}{map[string]interface{}{"plaintext": b64("a")}, map[string]interface{}{"plaintext": b64("b")}}})
	denied(t, "a batch from 127.0.0.2 (judged once)", err, "allowed_cidrs")
	_, err = bob.Logical().Write(m.Path+"/decrypt/pay", map[string]interface{}{"ciphertext": ct})
	denied(t, "bob, without the metadata", err, "required_entity_metadata")
	mustWrite(t, root, "identity/entity/id/"+entityOf(t, bob), map[string]interface{}{"metadata": map[string]string{"device": "managed"}})
	// The engine keeps what it read of an entity for up to 5 seconds: bob's new metadata counts after that.
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		_, err = bob.Logical().Write(m.Path+"/decrypt/pay", map[string]interface{}{"ciphertext": ct})
		if !strings.Contains(fmt.Sprint(err), "required_entity_metadata") || time.Now().After(deadline) {
			break
		}
	}
	denied(t, "bob, outside the group", err, "allowed_groups")
	_, err = root.Logical().Write(m.Path+"/decrypt/pay", map[string]interface{}{"ciphertext": ct})
	denied(t, "root, which has no entity", err, "entity")

	// Hours: a window that is not now, then one that is.
	tomorrow := strings.ToLower(time.Now().UTC().Add(24 * time.Hour).Weekday().String()[:3])
	mustWrite(t, root, m.Path+"/keys/pay/access", map[string]interface{}{"allowed_hours": tomorrow + " 00:00-24:00", "time_zone": "UTC"})
	_, err = alice.Logical().Write(m.Path+"/decrypt/pay", map[string]interface{}{"ciphertext": ct})
	denied(t, "alice outside the key's hours", err, "allowed_hours")
	mustWrite(t, root, m.Path+"/keys/pay/access", map[string]interface{}{"allowed_hours": "daily 00:00-24:00"})
	if got := decrypt(t, alice, m, "pay", ct); got != "before any condition" {
		t.Fatalf("alice decrypts %q", got)
	}

	// Vault's audit device records the denial as the response's error, with the source address and the entity.
	if !auditHasDenial(t, auditLog, m.Path+"/decrypt/pay", "allowed_cidrs", "127.0.0.2", aliceID) {
		t.Fatal("the audit log has no response to alice's decrypt from 127.0.0.2 carrying the denial")
	}

	// The denials are counted on the key, by condition; the key read summarises its conditions.
	acc := mustRead(t, root, m.Path+"/keys/pay/access")
	by := acc.Data["denials"].(map[string]interface{})["by_condition"].(map[string]interface{})
	for _, c := range []string{"allowed_cidrs", "required_entity_metadata", "allowed_groups", "entity", "allowed_hours"} {
		if by[c] == nil {
			t.Errorf("denials by %s not counted: %v", c, by)
		}
	}
	if s := mustRead(t, root, m.Path+"/keys/pay").Data["access"].(string); !strings.Contains(s, "allowed_cidrs=127.0.0.1/32") {
		t.Fatalf("key read: access %q", s)
	}
	// Removing the conditions gives the ACL alone back.
	if _, err := root.Logical().Delete(m.Path + "/keys/pay/access"); err != nil {
		t.Fatal(err)
	}
	if got := decrypt(t, from(t, bob, "127.0.0.2"), m, "pay", ct); got != "before any condition" {
		t.Fatalf("bob decrypts %q", got)
	}
}

func entityOf(t *testing.T, c *api.Client) string {
	t.Helper()
	s, err := c.Auth().Token().LookupSelf()
	if err != nil {
		t.Fatal(err)
	}
	return s.Data["entity_id"].(string)
}

func mustRead(t *testing.T, c *api.Client, path string) *api.Secret {
	t.Helper()
	s, err := c.Logical().Read(path)
	if err != nil || s == nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return s
}

// auditHasDenial says whether the audit log at path has a response entry for reqPath whose error names condition,
// from remote address addr by entity.
func auditHasDenial(t *testing.T, path, reqPath, condition, addr, entity string) bool {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(raw), "\n") {
		var entry struct {
			Type string `json:"type"`
			Auth struct {
				EntityID string `json:"entity_id"`
			} `json:"auth"`
			Request struct {
				Path       string `json:"path"`
				RemoteAddr string `json:"remote_address"`
			} `json:"request"`
			Error string `json:"error"`
		}
		if json.Unmarshal([]byte(line), &entry) != nil || entry.Type != "response" {
			continue
		}
		if entry.Request.Path == reqPath && strings.Contains(entry.Error, condition) && entry.Request.RemoteAddr == addr && entry.Auth.EntityID == entity {
			return true
		}
	}
	return false
}

// TestGrantAndApprovalAcrossAPluginKill: a contractor holds a 2-hour, 100-use grant on a key that needs one, and a
// version's destruction waits for a custodian. The plugin is killed (SIGKILL) while the grant is in use:
// afterwards its uses go on from where storage knew them, never giving more than 100 in all, and the 101st is
// refused 403 naming the grant; the pending destruction survives and, approved, runs once.
func TestGrantAndApprovalAcrossAPluginKill(t *testing.T) {
	t.Parallel()
	srv, err := vaulttest.StartDev(filepath.Join(t.TempDir(), "grants"), vaultBin, pluginBin, softhsm)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	m := newMount(t, srv)
	root := srv.Client
	mustWrite(t, root, m.Path+"/keys/vendor", nil)
	ct := encrypt(t, root, m, "vendor", "contract data")
	mustWrite(t, root, m.Path+"/keys/vendor/access", map[string]interface{}{"grants_required": true, "max_grant_ttl": "8h"})
	p := newPeople(t, srv, m)
	carol, carolID := p.login("carol", appPolicy(t, srv, m, "vendor"))
	_, err = carol.Logical().Write(m.Path+"/decrypt/vendor", map[string]interface{}{"ciphertext": ct})
	denied(t, "carol before her grant", err, "grants_required")

	g := mustWrite(t, root, m.Path+"/keys/vendor/grants", map[string]interface{}{
		"entity_id": carolID, "operations": "decrypt", "ttl": "2h", "max_uses": 100, "reason": "CHG-1234"})
	id := g.Data["id"].(string)
	if _, err := carol.Logical().Write(m.Path+"/encrypt/vendor", map[string]interface{}{"plaintext": b64("x")}); statusOf(err) != 403 {
		t.Fatalf("carol encrypts with a decrypt-only grant: %v", err)
	}
	custodian, _ := p.login("dave", custodianPolicy(t, srv, m))
	mustWrite(t, root, m.Path+"/keys/payroll", map[string]interface{}{"approvals_required": 1})
	mustWrite(t, root, m.Path+"/keys/payroll/rotate", nil)
	approval := heldRequest(t, root, m.Path+"/keys/payroll/versions/1/destroy")

	used := 0
	for ; used < 3; used++ {
		if got := decrypt(t, carol, m, "vendor", ct); got != "contract data" {
			t.Fatalf("carol decrypts %q", got)
		}
	}
	for _, pid := range srv.PluginPIDs() {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
	}
	for {
		_, err := carol.Logical().Write(m.Path+"/decrypt/vendor", map[string]interface{}{"ciphertext": ct})
		if statusOf(err) == 403 {
			if !strings.Contains(err.Error(), "grant") {
				t.Fatalf("refused for another reason: %v", err)
			}
			break
		}
		if err != nil {
			continue // the plugin restarting under the request: Vault answered for it
		}
		used++
		if used > 100 {
			t.Fatal("more than 100 uses of a 100-use grant")
		}
	}
	// The plugin's death may cost the unused part of a reserved block (a grant never gives more, may give fewer).
	if used < 90 {
		t.Fatalf("only %d uses of 100 before the grant ran out", used)
	}
	read := mustRead(t, root, m.Path+"/keys/vendor/grants/"+id)
	if read.Data["state"] != "used_up" {
		t.Fatalf("grant after its last use: %v", read.Data)
	}
	t.Logf("%d uses served of a 100-use grant across a plugin kill", used)

	// The destruction held before the kill is still pending; approved now, it runs once.
	if st := mustRead(t, root, m.Path+"/approvals/"+approval).Data["state"]; st != "pending" {
		t.Fatalf("approval after the plugin kill: %v", st)
	}
	mustWrite(t, custodian, m.Path+"/approvals/"+approval+"/approve", nil)
	if st := mustRead(t, root, m.Path+"/keys/payroll/versions/1").Data["state"]; st != "destroy_scheduled" {
		t.Fatalf("version 1 after the approval: %v", st)
	}
	if n := historyCount(t, root, m.Path+"/keys/payroll/history", "approval_executed"); n != 1 {
		t.Fatalf("%d executions recorded, want 1", n)
	}
}

// heldRequest writes path and checks it was held for dual control (HTTP 202); it returns the approval's id.
func heldRequest(t *testing.T, c *api.Client, path string) string {
	t.Helper()
	raw, err := c.Logical().WriteRaw(path, nil)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	defer raw.Body.Close()
	var body struct {
		Data map[string]interface{} `json:"data"`
	}
	if err := json.NewDecoder(raw.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	id, _ := body.Data["approval_id"].(string)
	if raw.StatusCode != 202 || id == "" || body.Data["state"] != "pending" {
		t.Fatalf("%s answered %d %v, want 202 with an approval_id", path, raw.StatusCode, body.Data)
	}
	return id
}

// custodianPolicy writes examples/policies/cmk-custodian.hcl for mount m on srv and returns its name.
func custodianPolicy(t *testing.T, srv *vaulttest.Server, m mount) string {
	t.Helper()
	body, err := os.ReadFile(filepath.Join("..", "examples", "policies", "cmk-custodian.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	name := m.Path + "-custodian"
	if err := srv.Client.Sys().PutPolicy(name, strings.ReplaceAll(string(body), `"cmk/`, `"`+m.Path+`/`)); err != nil {
		t.Fatal(err)
	}
	return name
}

// historyCount counts the events of a kind in a key's history.
func historyCount(t *testing.T, c *api.Client, path, kind string) int {
	t.Helper()
	n := 0
	for _, e := range mustRead(t, c, path).Data["events"].([]interface{}) {
		if e.(map[string]interface{})["event"] == kind {
			n++
		}
	}
	return n
}
