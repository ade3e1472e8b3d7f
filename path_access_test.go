package cmk

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

func TestAccessSettingsWriteReadDelete(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	resp := e.ok(e.write("keys/k/access", map[string]interface{}{
		"allowed_cidrs": "10.0.0.0/8,192.0.2.7", "allowed_hours": []interface{}{"mon-fri 08:00-18:00"},
		"time_zone": "Europe/Paris", "allowed_groups": "payments-ops", "required_entity_metadata": map[string]interface{}{"device": "managed"},
		"operations": "decrypt,rewrap",
	}))
	if got := resp.Data["allowed_cidrs"].([]string); strings.Join(got, " ") != "10.0.0.0/8 192.0.2.7/32" {
		t.Fatalf("allowed_cidrs stored as %v", got)
	}
	// A write changes the fields it names and keeps the others.
	e.ok(e.write("keys/k/access", map[string]interface{}{"allowed_groups": "payments-ops,grp-2"}))
	resp = e.ok(e.read("keys/k/access"))
	if resp.Data["time_zone"] != "Europe/Paris" || len(resp.Data["allowed_groups"].([]string)) != 2 || len(resp.Data["operations"].([]string)) != 2 {
		t.Fatalf("read after a partial write: %v", resp.Data)
	}
	if !strings.Contains(e.ok(e.read("keys/k")).Data["access"].(string), "allowed_cidrs=10.0.0.0/8") {
		t.Fatalf("the key's read does not summarise its access conditions: %v", e.ok(e.read("keys/k")).Data["access"])
	}
	if ev := lastEvent(e.history("k")); ev["event"] != "access_changed" || !strings.Contains(ev["details"].(string), "grp-2") {
		t.Fatalf("last history event %v", ev)
	}
	for _, bad := range []map[string]interface{}{
		{"allowed_cidrs": "10.0.0.0/40"}, {"allowed_hours": "someday 9-5"}, {"time_zone": "Nowhere/City"},
		{"operations": "export"}, {"max_grant_ttl": "800h"}, {"allowd_cidrs": "10.0.0.0/8"},
	} {
		if got := status(e.write("keys/k/access", bad)); got != 400 {
			t.Errorf("%v: %d, want 400", bad, got)
		}
	}
	e.ok(e.request("delete", "keys/k/access", nil))
	if resp := e.ok(e.read("keys/k/access")); resp.Data["summary"] != "none" || e.ok(e.read("keys/k")).Data["access"] != "none" {
		t.Fatalf("after delete: %v", resp.Data)
	}
	if ev := lastEvent(e.history("k")); ev["event"] != "access_removed" {
		t.Fatalf("last history event %v", ev)
	}
	if got := status(e.write("keys/missing/access", map[string]interface{}{"allowed_cidrs": "10.0.0.0/8"})); got != 400 {
		t.Fatalf("access of a missing key: %d", got)
	}
}

// A live grant stands in for the identity conditions (allowed_entity_ids, allowed_groups), never for the others;
// with grants_required it is needed besides them, and a batch is n uses of it.
func TestGrantsStandInForIdentityConditionsOnly(t *testing.T) {
	e := newTestBackendWith(t, knownEntities{StaticSystemView: logical.StaticSystemView{DefaultLeaseTTLVal: time.Hour, MaxLeaseTTLVal: time.Hour}, known: []string{"ent-staff", "ent-contractor"}})
	e.ok(e.write("keys/k", nil))
	ct := encryptOK(t, e, "k", "granted")
	as := func(entity, src string, data map[string]interface{}) (*logical.Response, error) {
		req := &logical.Request{ID: fmt.Sprint("req-", requestCount.Add(1)), Operation: logical.UpdateOperation, Path: "decrypt/k",
			Data: data, Storage: e.storage, EntityID: entity, DisplayName: "userpass-" + entity}
		if src != "" {
			req.Connection = &logical.Connection{RemoteAddr: src}
		}
		return e.b.HandleRequest(context.Background(), req)
	}
	one := map[string]interface{}{"ciphertext": ct}
	e.ok(e.write("keys/k/access", map[string]interface{}{"allowed_entity_ids": "ent-staff", "allowed_cidrs": "127.0.0.0/8"}))
	e.ok(as("ent-staff", "127.0.0.1", one))
	if resp, err := as("ent-contractor", "127.0.0.1", one); status(resp, err) != 403 || !strings.Contains(fmt.Sprint(err), "allowed_entity_ids") {
		t.Fatalf("contractor without a grant: %d %v", status(resp, err), err)
	}
	e.ok(e.write("keys/k/grants", map[string]interface{}{"entity_id": "ent-contractor", "operations": "decrypt", "ttl": "2h", "max_uses": 3}))
	e.ok(as("ent-contractor", "127.0.0.1", one))
	// The grant does not lift the network condition.
	if resp, err := as("ent-contractor", "192.0.2.1", one); status(resp, err) != 403 || !strings.Contains(fmt.Sprint(err), "allowed_cidrs") {
		t.Fatalf("contractor from outside the network: %d %v", status(resp, err), err)
	}
	// grants_required: staff needs a grant too now.
	e.ok(e.write("keys/k/access", map[string]interface{}{"grants_required": true}))
	if resp, err := as("ent-staff", "127.0.0.1", one); status(resp, err) != 403 || !strings.Contains(fmt.Sprint(err), "grants_required") {
		t.Fatalf("staff without a grant on a grants_required key: %d %v", status(resp, err), err)
	}
	// Two uses left: a batch of three is refused whole, a batch of two is served.
	items := func(n int) map[string]interface{} {
		var in []interface{}
		for i := 0; i < n; i++ {
			in = append(in, map[string]interface{}{"ciphertext": ct})
		}
		return map[string]interface{}{"batch_input": in}
	}
	if resp, err := as("ent-contractor", "127.0.0.1", items(3)); status(resp, err) != 403 || !strings.Contains(fmt.Sprint(err), "uses left") {
		t.Fatalf("a batch beyond the grant's uses: %d %v", status(resp, err), err)
	}
	e.ok(as("ent-contractor", "127.0.0.1", items(2)))
	if resp, err := as("ent-contractor", "127.0.0.1", one); status(resp, err) != 403 {
		t.Fatalf("a use beyond max_uses: %d %v", status(resp, err), err)
	}
}

// Under dual control, changing or removing a key's access conditions and granting on a grants_required key are
// held; approved by another entity, each runs once (a grant's creation run again makes no second grant).
func TestAccessChangesAndGrantsAreHeldForDualControl(t *testing.T) {
	e, _ := newDualControlBackend(t, nil)
	e.ok(e.write("keys/k", map[string]interface{}{"approvals_required": 1}))
	approve := func(held map[string]interface{}) *logical.Response {
		t.Helper()
		return e.ok(e.as("bob", "", logical.UpdateOperation, "approvals/"+held["approval_id"].(string)+"/approve", nil))
	}
	h := e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/access", map[string]interface{}{"allowed_cidrs": "10.0.0.0/8", "grants_required": true}))
	if r := e.ok(e.read("keys/k/access")); r.Data["summary"] != "none" {
		t.Fatalf("a held change took effect: %v", r.Data)
	}
	approve(h)
	if r := e.ok(e.read("keys/k/access")); r.Data["summary"] != "allowed_cidrs=10.0.0.0/8 grants_required=true" {
		t.Fatalf("after approval: %v", r.Data["summary"])
	}
	// Writing what is already set does nothing and is not held.
	e.ok(e.as("alice", "", logical.UpdateOperation, "keys/k/access", map[string]interface{}{"allowed_cidrs": "10.0.0.0/8"}))

	h = e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/grants", map[string]interface{}{"entity_id": "ent-c", "ttl": "1h"}))
	if list := e.ok(e.request(logical.ListOperation, "keys/k/grants/", nil)); list.Data["keys"] != nil {
		t.Fatalf("a held grant exists: %v", list.Data)
	}
	approve(h)
	// The approval's execution run again (as after a crash in it) finds the grant its first run made.
	ctx := context.WithValue(context.Background(), approvedExecutionKey{}, approvedExecution{op: logical.UpdateOperation, path: "keys/k/grants"})
	again := &logical.Request{ID: "approval:" + h["approval_id"].(string), Operation: logical.UpdateOperation, Path: "keys/k/grants",
		Data: map[string]interface{}{"entity_id": "ent-c", "ttl": "1h"}, Storage: e.storage, EntityID: "entity-alice"}
	if resp, err := e.b.HandleRequest(ctx, again); err != nil || resp.IsError() {
		t.Fatalf("the execution run again: %v %v", err, respText(resp))
	}
	if n := len(e.ok(e.request(logical.ListOperation, "keys/k/grants/", nil)).Data["keys"].([]string)); n != 1 {
		t.Fatalf("%d grants after the approved creation ran twice, want 1", n)
	}

	h = e.held(e.as("alice", "", logical.DeleteOperation, "keys/k/access", nil))
	approve(h)
	if r := e.ok(e.read("keys/k/access")); r.Data["summary"] != "none" {
		t.Fatalf("after the approved removal: %v", r.Data["summary"])
	}
}

// knownEntities is a system view whose identity store knows the entities listed, without metadata or groups.
type knownEntities struct {
	logical.StaticSystemView
	known []string
}

func (v knownEntities) EntityInfo(id string) (*logical.Entity, error) {
	if !slices.Contains(v.known, id) {
		return nil, nil
	}
	return &logical.Entity{ID: id, Name: id}, nil
}

// An entity the identity store no longer knows (deleted) uses nothing through an identity condition or a grant,
// though its token still names it.
func TestUnknownEntityIsDenied(t *testing.T) {
	e := newTestBackendWith(t, knownEntities{StaticSystemView: logical.StaticSystemView{DefaultLeaseTTLVal: time.Hour, MaxLeaseTTLVal: time.Hour}, known: []string{"ent-staff"}})
	e.ok(e.write("keys/k", nil))
	ct := encryptOK(t, e, "k", "x")
	e.ok(e.write("keys/k/access", map[string]interface{}{"allowed_entity_ids": "ent-staff,ent-gone"}))
	for entity, want := range map[string]int{"ent-staff": 200, "ent-gone": 403} {
		resp, err := e.b.HandleRequest(context.Background(), &logical.Request{ID: fmt.Sprint("req-", requestCount.Add(1)), Operation: logical.UpdateOperation,
			Path: "decrypt/k", Data: map[string]interface{}{"ciphertext": ct}, Storage: e.storage, EntityID: entity})
		if got := status(resp, err); got != want || (want == 403 && !strings.Contains(fmt.Sprint(err), "identity store")) {
			t.Errorf("%s: %d %v, want %d", entity, got, err, want)
		}
	}
}
