package tests

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"
)

// On a real server, two userpass users holding the custodian policy (examples/policies/cmk-custodian.hcl) approve a
// key administrator's destruction of a version on a key that needs two approvals: the request answers 202 and
// waits; the requester cannot approve its own request even with the custodian policy; a custodian can use no key;
// the second custodian's approval executes the destruction, once, recorded on the key's history with each step's
// entity.
func TestCustodiansApproveVersionDestruction(t *testing.T) {
	m := newMount(t, dev)
	root := dev.Client
	rules := func(file string) string {
		body, err := os.ReadFile(filepath.Join("..", "examples", "policies", file))
		if err != nil {
			t.Fatal(err)
		}
		name := m.Path + "-" + strings.TrimSuffix(file, ".hcl")
		if err := root.Sys().PutPolicy(name, strings.ReplaceAll(string(body), `"cmk/`, `"`+m.Path+`/`)); err != nil {
			t.Fatal(err)
		}
		return name
	}
	custodian, keyAdmin := rules("cmk-custodian.hcl"), rules("cmk-key-admin.hcl")
	auth := "userpass-" + m.Path
	if err := root.Sys().EnableAuthWithOptions(auth, &api.EnableAuthOptions{Type: "userpass"}); err != nil {
		t.Fatal(err)
	}
	defer root.Sys().DisableAuth(auth)
	// login makes a user with policies and logs in: a token with an entity of the user's own.
	login := func(user string, policies ...string) (*api.Client, string) {
		t.Helper()
		mustWrite(t, root, "auth/"+auth+"/users/"+user, map[string]interface{}{"password": "pw-" + user, "token_policies": strings.Join(policies, ",")})
		s := mustWrite(t, root, "auth/"+auth+"/login/"+user, map[string]interface{}{"password": "pw-" + user})
		c, err := root.Clone()
		if err != nil {
			t.Fatal(err)
		}
		c.SetToken(s.Auth.ClientToken)
		if s.Auth.EntityID == "" {
			t.Fatalf("user %s logged in without an entity", user)
		}
		return c, s.Auth.EntityID
	}
	alice, aliceEntity := login("alice", keyAdmin, custodian)
	bob, bobEntity := login("bob", custodian)
	carol, carolEntity := login("carol", custodian)

	mustWrite(t, alice, m.Path+"/keys/guarded", map[string]interface{}{"approvals_required": 2})
	mustWrite(t, alice, m.Path+"/keys/guarded/rotate", nil)
	ct := encrypt(t, root, m, "guarded", "under dual control")

	id := heldRequest(t, alice, m.Path+"/keys/guarded/versions/1/destroy")
	version := func() string {
		t.Helper()
		s, err := root.Logical().Read(m.Path + "/keys/guarded/versions/1")
		if err != nil {
			t.Fatal(err)
		}
		return s.Data["state"].(string)
	}
	if version() != "active" || decrypt(t, root, m, "guarded", ct) != "under dual control" {
		t.Fatal("version 1 changed before any approval")
	}

	approve := m.Path + "/approvals/" + id + "/approve"
	if _, err := alice.Logical().Write(approve, nil); statusOf(err) != 403 {
		t.Fatalf("the requester approving its own request: %v", err)
	}
	if _, err := bob.Logical().Write(m.Path+"/encrypt/guarded", map[string]interface{}{"plaintext": b64("x")}); statusOf(err) != 403 {
		t.Fatalf("a custodian encrypting: %v", err)
	}
	if s := mustWrite(t, bob, approve, nil); s.Data["state"] != "pending" {
		t.Fatalf("after bob's approval: %v", s.Data)
	}
	if version() != "active" {
		t.Fatal("version 1 changed after one approval of two")
	}
	s := mustWrite(t, carol, approve, nil)
	if s.Data["state"] != "executed" {
		t.Fatalf("after carol's approval: %v", s.Data)
	}
	if version() != "destroy_scheduled" {
		t.Fatalf("version 1 is %s after two approvals", version())
	}
	// Approving again returns the recorded result and runs nothing.
	if s := mustWrite(t, bob, approve, nil); s.Data["state"] != "executed" || len(s.Warnings) == 0 {
		t.Fatalf("approving an executed request: %v %v", s.Data, s.Warnings)
	}

	history, err := bob.Logical().Read(m.Path + "/keys/guarded/history")
	if err != nil {
		t.Fatal(err)
	}
	who := map[string][]string{}
	for _, raw := range history.Data["events"].([]interface{}) {
		ev := raw.(map[string]interface{})
		entity, _ := ev["entity_id"].(string)
		who[ev["event"].(string)] = append(who[ev["event"].(string)], entity)
	}
	for event, want := range map[string][]string{
		"approval_requested":        {aliceEntity},
		"approval_granted":          {bobEntity, carolEntity},
		"version_destroy_scheduled": {aliceEntity}, // the requester's request, executed once
		"approval_executed":         {carolEntity},
	} {
		if strings.Join(who[event], ",") != strings.Join(want, ",") {
			t.Errorf("history %s by %v, want %v", event, who[event], want)
		}
	}
}
