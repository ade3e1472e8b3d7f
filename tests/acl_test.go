package tests

import (
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"
)

// policyToken loads an example policy from examples/policies, rewritten for mount path m (the examples use
// cmk/), and returns a client holding a token with only that policy.
func policyToken(t *testing.T, m mount, file string) *api.Client {
	t.Helper()
	body, err := os.ReadFile(filepath.Join("..", "examples", "policies", file))
	if err != nil {
		t.Fatal(err)
	}
	name := m.Path + "-" + strings.TrimSuffix(file, ".hcl")
	rules := strings.ReplaceAll(string(body), `"cmk/`, `"`+m.Path+`/`)
	if err := dev.Client.Sys().PutPolicy(name, rules); err != nil {
		t.Fatalf("policy %s: %v", file, err)
	}
	secret, err := dev.Client.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{name}, NoDefaultPolicy: true})
	if err != nil {
		t.Fatal(err)
	}
	c, err := dev.Client.Clone()
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(secret.Auth.ClientToken)
	return c
}

func TestLeastPrivilegePolicies(t *testing.T) {
	m := newMount(t, dev)
	root := dev.Client
	mustWrite(t, root, m.Path+"/keys/app", nil)
	mustWrite(t, root, m.Path+"/keys/other", nil)
	other := encrypt(t, root, m, "other", "not yours")

	type call struct {
		name   string
		path   string
		data   map[string]interface{}
		status int // 0 = allowed and succeeds
	}
	pt := map[string]interface{}{"plaintext": b64("x")}
	appCT := map[string]interface{}{"ciphertext": encrypt(t, root, m, "app", "x")}
	cases := map[string][]call{
		"cmk-encrypt-app.hcl": {
			{"encrypt with app", "/encrypt/app", pt, 0},
			{"decrypt with app", "/decrypt/app", appCT, 403},
			{"encrypt with another key", "/encrypt/other", pt, 403},
			{"create a key by upsert", "/encrypt/new", pt, 403},
			{"rotate", "/keys/app/rotate", nil, 403},
			{"read the key", "/keys/app", nil, 403},
		},
		"cmk-decrypt-app.hcl": {
			{"decrypt with app", "/decrypt/app", appCT, 0},
			{"rewrap with app", "/rewrap/app", appCT, 0},
			{"encrypt with app", "/encrypt/app", pt, 403},
			{"decrypt another key's ciphertext", "/decrypt/other", map[string]interface{}{"ciphertext": other}, 403},
		},
		"cmk-key-admin.hcl": {
			{"create a key", "/keys/admin-made", nil, 0},
			{"rotate", "/keys/app/rotate", nil, 0},
			{"configure", "/keys/app/config", map[string]interface{}{"deletion_allowed": false}, 0},
			{"decrypt", "/decrypt/app", appCT, 403},
			{"encrypt", "/encrypt/app", pt, 403},
			{"data key", "/datakey/plaintext/app", nil, 403},
			{"reconfigure the HSM", "/config/hsm", map[string]interface{}{"pin": "x"}, 403},
			{"change the mount's key defaults (deletion grace period)", "/config/keys", map[string]interface{}{"deletion_grace_period": 0}, 403},
			{"adopt what a storage restore lost, key by key", "/keys/app/reconcile", map[string]interface{}{"adopt": true}, 0},
			{"adopt on the operator's word", "/reconcile/adopt-unverified/app", nil, 403},
		},
		"cmk-mount-admin.hcl": {
			{"change the deletion grace period", "/config/keys", map[string]interface{}{"deletion_grace_period": "168h"}, 0},
			{"rotate", "/keys/app/rotate", nil, 403},
			{"create a key", "/keys/mount-admin-made", nil, 403},
			{"encrypt", "/encrypt/app", pt, 403},
			{"reconcile the mount and adopt", "/reconcile", map[string]interface{}{"adopt": true}, 0},
			{"adopt on the operator's word (sudo)", "/reconcile/adopt-unverified", nil, 0},
			{"adopt one key on the operator's word (sudo)", "/reconcile/adopt-unverified/app", nil, 0},
			{"rotate the audit key", "/audit_key/rotate", nil, 0},
		},
		"cmk-key-owner.hcl": {
			{"set the key's access conditions", "/keys/app/access", map[string]interface{}{"allowed_cidrs": "127.0.0.0/8"}, 0},
			{"grant an entity decryption for an hour", "/keys/app/grants", map[string]interface{}{"entity_id": "ent-contractor", "operations": "decrypt", "ttl": "1h"}, 0},
			{"set another key's access conditions", "/keys/other/access", map[string]interface{}{"allowed_cidrs": "127.0.0.0/8"}, 403},
			{"grant on another key", "/keys/other/grants", map[string]interface{}{"entity_id": "ent-contractor", "ttl": "1h"}, 403},
			{"encrypt", "/encrypt/app", pt, 403},
			{"decrypt", "/decrypt/app", appCT, 403},
			{"rotate", "/keys/app/rotate", nil, 403},
			{"destroy a version", "/keys/app/versions/1/destroy", nil, 403},
		},
		"cmk-auditor.hcl": {
			{"rotate", "/keys/app/rotate", nil, 403},
			{"encrypt", "/encrypt/app", pt, 403},
			{"decrypt", "/decrypt/app", appCT, 403},
			{"adopt", "/keys/app/reconcile", map[string]interface{}{"adopt": true}, 403},
			{"adopt mount-wide", "/reconcile", map[string]interface{}{"adopt": true}, 403},
			{"reconfigure the HSM", "/config/hsm", map[string]interface{}{"pool_size": 2}, 403},
			{"rotate the audit key", "/audit_key/rotate", nil, 403},
		},
	}
	for file, calls := range cases {
		c := policyToken(t, m, file)
		for _, call := range calls {
			t.Run(strings.TrimSuffix(file, ".hcl")+"/"+call.name, func(t *testing.T) {
				_, err := c.Logical().Write(m.Path+call.path, call.data)
				if got := statusOf(err); got != call.status {
					t.Fatalf("status %d, want %d (%v)", got, call.status, err)
				}
			})
		}
	}
	// Reads the auditor may and the encrypter may not make.
	auditor := policyToken(t, m, "cmk-auditor.hcl")
	if s, err := auditor.Logical().Read(m.Path + "/keys/app"); err != nil || s.Data["protection_level"] != "hsm" {
		t.Fatalf("auditor reads the key: %v", err)
	}
	if s, err := auditor.Logical().Read(m.Path + "/config/hsm"); err != nil || s.Data["connected"] != true {
		t.Fatalf("auditor reads the HSM state: %v", err)
	}
	if s, err := auditor.Logical().Read(m.Path + "/reconcile"); err != nil || s.Data["keys"] == nil {
		t.Fatalf("auditor reads the reconciliation report: %v", err)
	}
	if _, err := auditor.Logical().List(m.Path + "/keys"); err != nil {
		t.Fatalf("auditor lists keys: %v", err)
	}
	if s, err := auditor.Logical().Read(m.Path + "/keys/app/history/verify"); err != nil || s.Data["verified"] != true {
		t.Fatalf("auditor verifies a key's history: %v %v", s, err)
	}
	if s, err := auditor.Logical().Read(m.Path + "/audit_key"); err != nil || s.Data["versions"] == nil {
		t.Fatalf("auditor reads the audit key: %v", err)
	}
	// The key administrator can read the wrapping key, so vault transit import works with its token.
	admin := policyToken(t, m, "cmk-key-admin.hcl")
	if s, err := admin.Logical().Read(m.Path + "/wrapping_key"); err != nil || s == nil || s.Data["public_key"] == "" {
		t.Fatalf("key admin reads the wrapping key: %v", err)
	}
	mustWrite(t, root, m.Path+"/config/hsm", map[string]interface{}{"raw_rsa_oaep_fallback": true}) // SoftHSM 2.6
	material := base64.StdEncoding.EncodeToString(make([]byte, 32))
	if out, err := dev.CLI(admin.Token(), "transit", "import", m.Path+"/keys/admin-imported", material, "type=aes256-gcm96"); err != nil {
		t.Fatalf("vault transit import with the key admin's token: %v\n%s", err, out)
	}
}

// Issue 19 item 13: config/hsm and adoption on an operator's word are sudo paths. A policy with update (and
// create) on them but no sudo is refused with 403 by Vault itself; the same policy with sudo is served. Reconcile
// with adopt=true stays an ordinary path.
func TestSudoPaths(t *testing.T) {
	m := newMount(t, dev)
	mustWrite(t, dev.Client, m.Path+"/keys/app", nil)
	token := func(capabilities string) *api.Client {
		name := m.Path + "-sudo-" + strings.ReplaceAll(strings.Trim(capabilities, `"`), `", "`, "-")
		var rules strings.Builder
		for _, p := range []string{"config/hsm", "reconcile/adopt-unverified", "reconcile/adopt-unverified/*", "keys/*"} {
			fmt.Fprintf(&rules, "path %q {\n  capabilities = [%s]\n}\n", m.Path+"/"+p, capabilities)
		}
		if err := dev.Client.Sys().PutPolicy(name, rules.String()); err != nil {
			t.Fatal(err)
		}
		secret, err := dev.Client.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{name}, NoDefaultPolicy: true})
		if err != nil {
			t.Fatal(err)
		}
		c, err := dev.Client.Clone()
		if err != nil {
			t.Fatal(err)
		}
		c.SetToken(secret.Auth.ClientToken)
		return c
	}
	without, with := token(`"create", "read", "update"`), token(`"create", "read", "update", "sudo"`)
	for _, call := range []struct {
		path string
		data map[string]interface{}
	}{
		{"/config/hsm", map[string]interface{}{"pool_size": 2}},
		{"/reconcile/adopt-unverified", nil},
		{"/reconcile/adopt-unverified/app", nil},
	} {
		if _, err := without.Logical().Write(m.Path+call.path, call.data); statusOf(err) != 403 {
			t.Errorf("%s with update and without sudo: %d (%v), want 403", call.path, statusOf(err), err)
		}
		if _, err := with.Logical().Write(m.Path+call.path, call.data); err != nil {
			t.Errorf("%s with update and sudo: %v", call.path, err)
		}
	}
	if _, err := without.Logical().Write(m.Path+"/keys/app/reconcile", map[string]interface{}{"adopt": true}); err != nil {
		t.Errorf("reconcile with adopt=true needs no sudo: %v", err)
	}
}
