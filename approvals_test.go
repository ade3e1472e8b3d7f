package cmk

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// groupsView is Vault's system view with an identity store: the groups of each entity, as userpass users' entities
// would have them.
type groupsView struct {
	logical.StaticSystemView
	groups map[string][]*logical.Group
}

func (v groupsView) GroupsForEntity(entityID string) ([]*logical.Group, error) {
	return v.groups[entityID], nil
}

// newDualControlBackend mounts a backend whose system view knows entities' groups, on a token of its own, with a
// clock the test moves.
func newDualControlBackend(t *testing.T, groups map[string][]*logical.Group) (*testEnv, *time.Time) {
	t.Helper()
	e := newTestBackendWith(t, groupsView{StaticSystemView: logical.StaticSystemView{DefaultLeaseTTLVal: time.Hour, MaxLeaseTTLVal: time.Hour}, groups: groups})
	now := time.Now()
	e.b.now = func() time.Time { return now }
	return e, &now
}

// as makes a request as a userpass user would: entity and token of its own. id "" gives the request a new id.
func (e *testEnv) as(entity, id string, op logical.Operation, path string, data map[string]interface{}) (*logical.Response, error) {
	if id == "" {
		id = fmt.Sprint("req-", requestCount.Add(1))
	}
	req := &logical.Request{ID: id, Operation: op, Path: path, Data: data, Storage: e.storage, MountPoint: "cmk/"}
	if entity != "" {
		req.EntityID, req.DisplayName, req.ClientTokenAccessor = "entity-"+entity, "userpass-"+entity, "accessor-"+entity
	} else {
		req.DisplayName, req.ClientTokenAccessor = "root", "accessor-root"
	}
	return e.b.HandleRequest(context.Background(), req)
}

// held checks that a request was held for approval (HTTP 202) and returns what it answered.
func (e *testEnv) held(resp *logical.Response, err error) map[string]interface{} {
	t := e.t
	t.Helper()
	if got := status(resp, err); got != 202 {
		t.Fatalf("status %d, want 202 (held): %v %s", got, err, respText(resp))
	}
	var body struct {
		Data map[string]interface{} `json:"data"`
	}
	if err := json.Unmarshal([]byte(resp.Data[logical.HTTPRawBody].(string)), &body); err != nil {
		t.Fatal(err)
	}
	if body.Data["approval_id"] == "" || body.Data["state"] != "pending" {
		t.Fatalf("held response: %v", body.Data)
	}
	return body.Data
}

// countEvents counts the key's history events of a kind.
func (e *testEnv) countEvents(name, kind string) int {
	n := 0
	for _, ev := range e.history(name) {
		if ev["event"] == kind {
			n++
		}
	}
	return n
}

func (e *testEnv) versionState(name string, v int) string {
	e.t.Helper()
	return e.ok(e.read(fmt.Sprintf("keys/%s/versions/%d", name, v))).Data["state"].(string)
}

// A version's destruction on a key needing two approvals waits; the requester, a token without an entity and a
// second token of an entity that approved do not count; the second distinct entity's approval executes it once,
// as the requester's request, and a retry of that approval returns the recorded result without running it again.
func TestDualControlDestroyApprovedByTwoExecutesOnce(t *testing.T) {
	e, _ := newDualControlBackend(t, nil)
	e.ok(e.write("keys/k", map[string]interface{}{"approvals_required": 2}))
	e.ok(e.write("keys/k/rotate", nil))

	h := e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/versions/1/destroy", nil))
	id := h["approval_id"].(string)
	if h["approvals_required"] != float64(2) || h["requested_by"].(map[string]interface{})["entity_id"] != "entity-alice" || h["expires_at"] == "" {
		t.Fatalf("held response: %v", h)
	}
	if s := e.versionState("k", 1); s != "active" {
		t.Fatalf("version 1 is %s while its destruction waits for approval", s)
	}
	if ev := lastEvent(e.history("k")); ev["event"] != "approval_requested" || ev["entity_id"] != "entity-alice" {
		t.Fatalf("history after the hold: %v", ev)
	}
	approve := "approvals/" + id + "/approve"
	if got := status(e.as("alice", "", logical.UpdateOperation, approve, nil)); got != 403 {
		t.Fatalf("the requester approving: %d, want 403", got)
	}
	if got := status(e.as("", "", logical.UpdateOperation, approve, nil)); got != 403 {
		t.Fatalf("a token without an entity approving: %d, want 403", got)
	}
	if r := e.ok(e.as("bob", "", logical.UpdateOperation, approve, nil)); r.Data["state"] != "pending" || len(r.Data["approvals"].([]map[string]interface{})) != 1 {
		t.Fatalf("after one approval: %v", r.Data)
	}
	// Another token of bob's entity: still one approval.
	bobAgain, err := e.b.HandleRequest(context.Background(), &logical.Request{ID: "req-bob-2", Operation: logical.UpdateOperation, Path: approve,
		Storage: e.storage, EntityID: "entity-bob", DisplayName: "oidc-bob", ClientTokenAccessor: "accessor-bob-2"})
	if err != nil || bobAgain.Data["state"] != "pending" || len(bobAgain.Data["approvals"].([]map[string]interface{})) != 1 {
		t.Fatalf("bob approving twice: %v %v", err, respText(bobAgain))
	}
	if s := e.versionState("k", 1); s != "active" {
		t.Fatalf("version 1 is %s after one approval of two", s)
	}

	r := e.ok(e.as("carol", "req-carol", logical.UpdateOperation, approve, nil))
	result, _ := r.Data["result"].(map[string]interface{})
	if r.Data["state"] != "executed" || result == nil || result["status"] != 200 {
		t.Fatalf("the second approval: %v", r.Data)
	}
	if s := e.versionState("k", 1); s != "destroy_scheduled" {
		t.Fatalf("version 1 is %s after the approvals", s)
	}
	scheduled := func() int { return e.countEvents("k", "version_destroy_scheduled") }
	if scheduled() != 1 || e.countEvents("k", "approval_granted") != 2 || e.countEvents("k", "approval_executed") != 1 {
		t.Fatalf("history: %v", e.history("k"))
	}
	for _, ev := range e.history("k") {
		if ev["event"] == "version_destroy_scheduled" && ev["entity_id"] != "entity-alice" {
			t.Fatalf("the executed destruction is not recorded as the requester's: %v", ev)
		}
		if ev["event"] == "approval_executed" && (ev["entity_id"] != "entity-carol" || !strings.Contains(ev["details"].(string), "userpass-bob")) {
			t.Fatalf("the execution's event does not name its approvers: %v", ev)
		}
	}

	// Vault retrying carol's approval (same request), and a later approver: the recorded result, nothing run again.
	for _, again := range []struct{ who, id string }{{"carol", "req-carol"}, {"dave", ""}} {
		r := e.ok(e.as(again.who, again.id, logical.UpdateOperation, approve, nil))
		if r.Data["state"] != "executed" || r.Data["result"] == nil || len(r.Warnings) == 0 {
			t.Fatalf("approving an executed approval: %v %v", r.Data, r.Warnings)
		}
	}
	if scheduled() != 1 || e.countEvents("k", "approval_executed") != 1 {
		t.Fatalf("executed again: %v", e.history("k"))
	}
	list := e.ok(e.request(logical.ListOperation, "approvals/", nil))
	if info := list.Data["key_info"].(map[string]interface{})[id].(map[string]interface{}); info["state"] != "executed" || info["key"] != "k" {
		t.Fatalf("listed: %v", info)
	}
}

// An emergency stop (disabling a key or a version) never waits; returning them to use does.
func TestDualControlEmergencyStopIsNeverHeld(t *testing.T) {
	e, _ := newDualControlBackend(t, nil)
	e.ok(e.write("config/keys", map[string]interface{}{"min_approvals_required": 1}))
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/k/rotate", nil))
	if r := e.ok(e.as("alice", "", logical.UpdateOperation, "keys/k/versions/1/disable", nil)); r.Data["state"] != "disabled" {
		t.Fatalf("version disable: %v", r.Data)
	}
	if r := e.ok(e.as("alice", "", logical.UpdateOperation, "keys/k/disable", nil)); r.Data["disabled"] != true {
		t.Fatalf("key disable: %v", r.Data)
	}
	e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/enable", nil))
	e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/versions/1/enable", nil))
	if r := e.ok(e.read("keys/k")); r.Data["disabled"] != true || e.versionState("k", 1) != "disabled" {
		t.Fatalf("re-enabled without approval: %v", r.Data)
	}
}

// Each request that cannot be undone is held, and only when it would change something; the rest run.
func TestDualControlHeldRequests(t *testing.T) {
	e, _ := newDualControlBackend(t, nil)
	e.ok(e.write("keys/k", map[string]interface{}{"approvals_required": 1}))
	e.ok(e.write("keys/k/config", map[string]interface{}{"deletion_allowed": true}))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/config", map[string]interface{}{"min_encryption_version": 2, "min_decryption_version": 2}))
	for _, c := range []struct {
		name string
		op   logical.Operation
		path string
		data map[string]interface{}
	}{
		{"delete the key", logical.DeleteOperation, "keys/k", nil},
		{"trim", logical.UpdateOperation, "keys/k/trim", map[string]interface{}{"min_available_version": 2}},
		{"lower approvals_required", logical.UpdateOperation, "keys/k/config", map[string]interface{}{"approvals_required": 0}},
		{"set approver_groups", logical.UpdateOperation, "keys/k/config", map[string]interface{}{"approver_groups": "custodians"}},
	} {
		e.held(e.as("alice", "", c.op, c.path, c.data))
	}
	// Raising the requirement, other settings, and requests the lifecycle refuses are not held.
	if r := e.ok(e.as("alice", "", logical.UpdateOperation, "keys/k/config", map[string]interface{}{"approvals_required": 3})); r.Data["approvals_required"] != 3 {
		t.Fatalf("raising approvals_required: %v", r.Data)
	}
	if got := status(e.as("alice", "", logical.UpdateOperation, "keys/k/versions/2/destroy", nil)); got != 400 {
		t.Fatalf("destroying the latest version: %d, want 400 at once", got)
	}
	if got := status(e.as("alice", "", logical.UpdateOperation, "keys/k/trim", map[string]interface{}{"min_available_version": 3})); got != 400 {
		t.Fatalf("a trim beyond min_decryption_version: %d, want 400 at once", got)
	}
	if r := e.ok(e.read("keys/k")); r.Data["approvals_required"] != 3 || r.Data["min_available_version"] != 0 || r.Data["deletion_scheduled_time"] != "" {
		t.Fatalf("after the held requests: %v", r.Data)
	}
	list := e.ok(e.request(logical.ListOperation, "approvals/", nil))
	if n := len(list.Data["keys"].([]string)); n != 4 {
		t.Fatalf("%d approvals listed, want 4", n)
	}
	// A page at a time: each listed approval is a storage read.
	page := e.ok(e.request(logical.ListOperation, "approvals/", map[string]interface{}{"limit": 3}))
	rest := e.ok(e.request(logical.ListOperation, "approvals/", map[string]interface{}{"limit": 3, "after": page.Data["next_after"]}))
	if len(page.Data["keys"].([]string)) != 3 || len(rest.Data["keys"].([]string)) != 1 || rest.Data["next_after"] != nil ||
		len(rest.Data["key_info"].(map[string]interface{})) != 1 {
		t.Fatalf("pages of 3: %v then %v", page.Data, rest.Data)
	}
}

// An import_version is held, its wrapped key shown to approvers only as its hash and length; approved, it imports
// one version.
func TestDualControlImportVersion(t *testing.T) {
	e, _ := newDualControlBackend(t, nil)
	e.ok(e.write("config/hsm", map[string]interface{}{"raw_rsa_oaep_fallback": true}))
	material := make([]byte, 32)
	rand.Read(material)
	e.ok(e.write("keys/imp/import", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, material)}))
	e.ok(e.write("keys/imp/config", map[string]interface{}{"approvals_required": 1}))
	rand.Read(material)
	wrapped := wrapFor(t, e, crypto.SHA256, material)
	h := e.held(e.as("alice", "", logical.UpdateOperation, "keys/imp/import_version", map[string]interface{}{"ciphertext": wrapped}))
	shown, _ := h["fields"].(map[string]interface{})["ciphertext"].(map[string]interface{})
	sum := sha256.Sum256([]byte(wrapped))
	if shown == nil || shown["sha256"] != hex.EncodeToString(sum[:]) || shown["length"] != float64(len(wrapped)) {
		t.Fatalf("the wrapped key as approvers see it: %v", h["fields"])
	}
	id := h["approval_id"].(string)
	if r := e.ok(e.read("approvals/" + id)); strings.Contains(fmt.Sprint(r.Data), wrapped) {
		t.Fatal("the approval shows the wrapped key")
	}
	if r := e.ok(e.as("bob", "", logical.UpdateOperation, "approvals/"+id+"/approve", nil)); r.Data["state"] != "executed" {
		t.Fatalf("approval: %v", r.Data)
	}
	if r := e.ok(e.read("keys/imp")); r.Data["latest_version"] != 2 {
		t.Fatalf("latest version %v after the approved import", r.Data["latest_version"])
	}
	// Once ended, storage no longer holds the request's fields.
	if entry, err := e.storage.Get(context.Background(), approvalRequestsPrefix+id); err != nil || entry != nil {
		t.Fatalf("the ended approval's request is still stored: %v", err)
	}
}

// The M-th approval stores "executing" before running the request: when the plugin dies at that point (here, the
// write answers an error after storing), Vault's retry of the approval runs it, once. Two approvals racing for the
// last place run it once.
func TestDualControlExecutesOnceAcrossCrashAndRace(t *testing.T) {
	e, _ := newDualControlBackend(t, nil)
	e.ok(e.write("keys/k", map[string]interface{}{"approvals_required": 1}))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.write("keys/k/rotate", nil))
	id := e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/versions/1/destroy", nil))["approval_id"].(string)
	e.storage.failAfterStoring(approvalsPrefix + id)
	if _, err := e.as("bob", "req-bob", logical.UpdateOperation, "approvals/"+id+"/approve", nil); err == nil {
		t.Fatal("the approval's failed write went unnoticed")
	}
	if a, _ := readApproval(context.Background(), e.storage, id); a.State != approvalExecuting || e.versionState("k", 1) != "active" {
		t.Fatalf("after the crash: %s, version %s", a.State, e.versionState("k", 1))
	}
	if r := e.ok(e.as("bob", "req-bob", logical.UpdateOperation, "approvals/"+id+"/approve", nil)); r.Data["state"] != "executed" {
		t.Fatalf("Vault's retry of the approval: %v", r.Data)
	}
	if e.versionState("k", 1) != "destroy_scheduled" || e.countEvents("k", "version_destroy_scheduled") != 1 {
		t.Fatalf("after the retry: %v", e.history("k"))
	}

	id = e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/versions/2/destroy", nil))["approval_id"].(string)
	var wg sync.WaitGroup
	states := make([]interface{}, 4)
	for i := range states {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := e.as(fmt.Sprint("custodian", i), "", logical.UpdateOperation, "approvals/"+id+"/approve", nil)
			if err == nil && r != nil {
				states[i] = r.Data["state"]
			}
		}()
	}
	wg.Wait()
	for _, s := range states {
		if s != "executed" {
			t.Fatalf("racing approvals answered %v", states)
		}
	}
	if n := e.countEvents("k", "approval_executed"); n != 2 {
		t.Fatalf("%d executions for two approvals", n)
	}
	if n := e.countEvents("k", "version_destroy_scheduled"); n != 2 {
		t.Fatalf("%d destructions scheduled for two approved requests", n)
	}
}

// A held request expires unexecuted after approval_ttl: approving it then is refused, the periodic function records
// its expiry, and later removes it.
func TestDualControlExpiry(t *testing.T) {
	e, now := newDualControlBackend(t, nil)
	e.ok(e.write("config/keys", map[string]interface{}{"approval_ttl": "1h"}))
	e.ok(e.write("keys/k", map[string]interface{}{"approvals_required": 1}))
	e.ok(e.write("keys/k/rotate", nil))
	h := e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/versions/1/destroy", nil))
	id := h["approval_id"].(string)
	e.tick() // nothing due yet
	if r := e.ok(e.read("approvals/" + id)); r.Data["state"] != "pending" {
		t.Fatalf("before its time: %v", r.Data["state"])
	}
	*now = now.Add(61 * time.Minute)
	if r := e.ok(e.read("approvals/" + id)); r.Data["state"] != "expired" {
		t.Fatalf("after approval_ttl: %v", r.Data["state"])
	}
	e.tick()
	if e.countEvents("k", "approval_expired") != 1 {
		t.Fatalf("history: %v", e.history("k"))
	}
	if got := status(e.as("bob", "", logical.UpdateOperation, "approvals/"+id+"/approve", nil)); got != 400 {
		t.Fatalf("approving an expired request: %d, want 400", got)
	}
	if s := e.versionState("k", 1); s != "active" {
		t.Fatalf("version 1 is %s after its destruction expired", s)
	}
	*now = now.Add(2 * time.Hour)
	e.tick()
	if r, err := e.read("approvals/" + id); err != nil || r != nil {
		t.Fatalf("ended approval kept past approval_ttl: %v %s", err, respText(r))
	}
	if e.countEvents("k", "approval_expired") != 1 {
		t.Fatal("expiry recorded twice")
	}
}

// A rejection ends the request unexecuted; the requester may withdraw, never approve.
func TestDualControlRejection(t *testing.T) {
	e, _ := newDualControlBackend(t, nil)
	e.ok(e.write("keys/k", map[string]interface{}{"approvals_required": 2}))
	e.ok(e.write("keys/k/config", map[string]interface{}{"deletion_allowed": true}))
	id := e.held(e.as("alice", "", logical.DeleteOperation, "keys/k", nil))["approval_id"].(string)
	e.ok(e.as("bob", "", logical.UpdateOperation, "approvals/"+id+"/approve", nil))
	if got := status(e.as("", "", logical.UpdateOperation, "approvals/"+id+"/reject", nil)); got != 403 {
		t.Fatalf("a token without an entity rejecting: %d, want 403", got)
	}
	r := e.ok(e.as("carol", "", logical.UpdateOperation, "approvals/"+id+"/reject", map[string]interface{}{"comment": "not planned"}))
	if r.Data["state"] != "rejected" || r.Data["comment"] != "not planned" {
		t.Fatalf("rejection: %v", r.Data)
	}
	if got := status(e.as("dave", "", logical.UpdateOperation, "approvals/"+id+"/approve", nil)); got != 400 {
		t.Fatalf("approving a rejected request: %d, want 400", got)
	}
	if got := status(e.as("dave", "", logical.UpdateOperation, "approvals/no-such-approval/approve", nil)); got != 404 {
		t.Fatalf("approving what does not exist: %d, want 404", got)
	}
	if r := e.ok(e.read("keys/k")); r.Data["deletion_scheduled_time"] != "" {
		t.Fatal("the key was deleted after a rejection")
	}
	ev := lastEvent(e.history("k"))
	if ev["event"] != "approval_rejected" || ev["entity_id"] != "entity-carol" || !strings.Contains(ev["details"].(string), "not planned") {
		t.Fatalf("history: %v", ev)
	}
	id = e.held(e.as("alice", "", logical.DeleteOperation, "keys/k", nil))["approval_id"].(string)
	if r := e.ok(e.as("alice", "", logical.UpdateOperation, "approvals/"+id+"/reject", nil)); r.Data["state"] != "rejected" {
		t.Fatalf("the requester withdrawing: %v", r.Data)
	}
}

// A pending approval is in storage: a new backend on the same storage (a restart, a failover) completes it.
func TestDualControlSurvivesRestart(t *testing.T) {
	e, _ := newDualControlBackend(t, nil)
	e.ok(e.write("keys/k", map[string]interface{}{"approvals_required": 2}))
	e.ok(e.write("keys/k/rotate", nil))
	id := e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/versions/1/destroy", nil))["approval_id"].(string)
	e.ok(e.as("bob", "", logical.UpdateOperation, "approvals/"+id+"/approve", nil))
	fresh := e.reopen()
	if r := fresh.ok(fresh.as("carol", "", logical.UpdateOperation, "approvals/"+id+"/approve", nil)); r.Data["state"] != "executed" {
		t.Fatalf("approval after a restart: %v", r.Data)
	}
	if s := fresh.versionState("k", 1); s != "destroy_scheduled" {
		t.Fatalf("version 1 is %s", s)
	}
}

// The mount's floor only goes up, raises every key's requirement, and holds lowering the mount's grace period.
func TestDualControlFloorOnlyRaised(t *testing.T) {
	e, _ := newDualControlBackend(t, nil)
	e.ok(e.write("config/keys", map[string]interface{}{"min_approvals_required": 2, "default_approvals_required": 1}))
	if got := status(e.write("config/keys", map[string]interface{}{"min_approvals_required": 1})); got != 400 {
		t.Fatalf("lowering the floor: %d, want 400", got)
	}
	if got := status(e.write("config/keys", map[string]interface{}{"min_approvals_required": 0})); got != 400 {
		t.Fatalf("clearing the floor: %d, want 400", got)
	}
	r := e.ok(e.write("config/keys", map[string]interface{}{"min_approvals_required": 3}))
	if r.Data["min_approvals_required"] != 3 || r.Data["default_approvals_required"] != 1 || r.Data["approval_ttl"] != int64(86400) {
		t.Fatalf("config/keys: %v", r.Data)
	}
	if r := e.ok(e.write("keys/k", map[string]interface{}{"approvals_required": 0})); r.Data["approvals_required"] != 0 {
		t.Fatalf("key: %v", r.Data)
	}
	if r := e.ok(e.write("keys/d", nil)); r.Data["approvals_required"] != 1 {
		t.Fatalf("the mount's default: %v", r.Data["approvals_required"])
	}
	e.ok(e.write("keys/k/rotate", nil))
	if h := e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/versions/1/destroy", nil)); h["approvals_required"] != float64(3) {
		t.Fatalf("a key below the floor: %v", h)
	}
	h := e.held(e.as("alice", "", logical.UpdateOperation, "config/keys", map[string]interface{}{"deletion_grace_period": 0}))
	if h["key"] != "" || h["approvals_required"] != float64(3) {
		t.Fatalf("lowering the grace period: %v", h)
	}
	if r := e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": "720h"})); r.Data["deletion_grace_period"] != int64(720*3600) {
		t.Fatalf("raising the grace period: %v", r.Data)
	}
}

// approver_groups restricts approvers to members of the named Vault groups, by name or id.
func TestDualControlApproverGroups(t *testing.T) {
	custodians := &logical.Group{ID: "group-id-1", Name: "custodians"}
	e, _ := newDualControlBackend(t, map[string][]*logical.Group{
		"entity-bob":   {custodians},
		"entity-carol": {{ID: "group-id-2", Name: "auditors"}},
	})
	if got := status(e.write("keys/long", map[string]interface{}{"approver_groups": strings.Repeat("g", 257)})); got != 400 {
		t.Fatalf("a group name of 257 characters: %d, want 400 (every held request carries the groups)", got)
	}
	e.ok(e.write("keys/k", map[string]interface{}{"approvals_required": 1, "approver_groups": "custodians,auditors"}))
	e.ok(e.write("keys/k/config", map[string]interface{}{"deletion_allowed": true}))
	id := e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/config", map[string]interface{}{"approver_groups": "group-id-1"}))["approval_id"].(string)
	if got := status(e.as("eve", "", logical.UpdateOperation, "approvals/"+id+"/approve", nil)); got != 403 {
		t.Fatalf("an entity outside the approver groups: %d, want 403", got)
	}
	if r := e.ok(e.as("carol", "", logical.UpdateOperation, "approvals/"+id+"/approve", nil)); r.Data["state"] != "executed" {
		t.Fatalf("a member of a group named: %v", r.Data)
	}
	if r := e.ok(e.read("keys/k")); fmt.Sprint(r.Data["approver_groups"]) != "[group-id-1]" {
		t.Fatalf("approver_groups after the approved change: %v", r.Data["approver_groups"])
	}
	id = e.held(e.as("alice", "", logical.DeleteOperation, "keys/k", nil))["approval_id"].(string)
	if got := status(e.as("carol", "", logical.UpdateOperation, "approvals/"+id+"/approve", nil)); got != 403 {
		t.Fatalf("carol, no longer in the approver groups: %d, want 403", got)
	}
	if r := e.ok(e.as("bob", "", logical.UpdateOperation, "approvals/"+id+"/approve", nil)); r.Data["state"] != "executed" {
		t.Fatalf("a member of the group named by id: %v", r.Data)
	}
}

// The side doors a review found around dual control stay shut: lowering min_decryption_version (which returns
// versions to use) is held; keys made by upsert take the mount's default_approvals_required; a deletion already
// scheduled is never brought forward by deleting again under a shorter grace period; a change judged on a snapshot
// that another change replaced before the key's lock was taken is refused, to be judged anew; an approval cut short
// in "executing" long ago is not run again against today's key.
func TestDualControlSideDoorsStayShut(t *testing.T) {
	e, now := newDualControlBackend(t, nil)
	e.ok(e.write("config/keys", map[string]interface{}{"default_approvals_required": 1, "deletion_grace_period": "1h"}))

	// min_decryption_version: raised at once, lowered only with approval.
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/k/rotate", nil))
	e.ok(e.as("alice", "", logical.UpdateOperation, "keys/k/config", map[string]interface{}{"min_decryption_version": 2}))
	h := e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/config", map[string]interface{}{"min_decryption_version": 1}))
	if v := e.ok(e.read("keys/k")).Data["min_decryption_version"]; v != 2 {
		t.Fatalf("min_decryption_version %v while its lowering waits", v)
	}
	e.ok(e.as("bob", "", logical.UpdateOperation, "approvals/"+h["approval_id"].(string)+"/approve", nil))
	if v := e.ok(e.read("keys/k")).Data["min_decryption_version"]; v != 1 {
		t.Fatalf("min_decryption_version %v after approval", v)
	}

	// Upsert makes keys under the mount's default.
	e.ok(e.request(logical.CreateOperation, "encrypt/upserted", map[string]interface{}{"plaintext": b64("x")}))
	if v := e.ok(e.read("keys/upserted")).Data["approvals_required"]; v != 1 {
		t.Fatalf("an upserted key has approvals_required %v, want the mount default 1", v)
	}

	// A scheduled deletion keeps its time.
	e.ok(e.write("keys/d", map[string]interface{}{"approvals_required": 0}))
	e.ok(e.as("alice", "", logical.UpdateOperation, "keys/d/config", map[string]interface{}{"deletion_allowed": true}))
	at := e.ok(e.request(logical.DeleteOperation, "keys/d", nil)).Data["deletion_scheduled_time"]
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": "0s"}))
	again := e.ok(e.request(logical.DeleteOperation, "keys/d", nil))
	if again.Data["deletion_scheduled_time"] != at || !slices.ContainsFunc(e.tokenObjects(), func(o hsm.ObjectInfo) bool { return strings.Contains(o.Label, "/d/v1") }) {
		t.Fatalf("deleting again with a grace period of 0: %v (was %v)", again.Data, at)
	}

	// A judgment on a replaced snapshot is refused.
	judged, _ := e.b.keys.Get(context.Background(), e.storage, "k")
	e.ok(e.write("keys/k/rotate", nil)) // another change lands between the judgment and the lock
	req := &logical.Request{ID: "req-judged", Operation: logical.UpdateOperation, Path: "keys/k/versions/1/destroy", Storage: e.storage}
	change, err := e.b.onJudged(context.Background(), req, judged, func(tx *keys.Tx) error { return tx.SetVersionState(1, "destroy", time.Now().Add(time.Hour), false) })
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.b.keys.Update(context.Background(), e.storage, "k", keys.Actor{}, change); err == nil || !strings.Contains(err.Error(), "send it again") {
		t.Fatalf("a change judged on a replaced snapshot: %v", err)
	}

	// An approval left executing long ago ends failed, unrun.
	h = e.held(e.as("alice", "", logical.UpdateOperation, "keys/k/versions/1/destroy", nil))
	id := h["approval_id"].(string)
	a, err := readApproval(context.Background(), e.storage, id)
	if err != nil || a == nil {
		t.Fatal(err)
	}
	a.State, a.ExecutingSince = approvalExecuting, now.Add(-time.Hour)
	a.Approvals = append(a.Approvals, approvalParty{EntityID: "entity-bob"})
	if err := e.b.storeApproval(context.Background(), e.storage, a); err != nil {
		t.Fatal(err)
	}
	r := e.ok(e.as("carol", "", logical.UpdateOperation, "approvals/"+id+"/approve", nil))
	if r.Data["state"] != "failed" || e.versionState("k", 1) == "destroy_scheduled" {
		t.Fatalf("an execution cut short an hour ago was run again: %v, version 1 %s", r.Data, e.versionState("k", 1))
	}
}
