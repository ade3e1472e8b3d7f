package cmk

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

func TestGrantsCreateListReadRevoke(t *testing.T) {
	e := newTestBackend(t)
	now := time.Date(2026, 12, 6, 9, 0, 0, 0, time.UTC)
	e.b.keys.Clock = func() time.Time { return now }
	e.ok(e.write("keys/k", nil))

	created := e.ok(e.write("keys/k/grants", map[string]interface{}{
		"entity_id": "contractor-entity", "operations": "decrypt,encrypt", "ttl": "2h", "max_uses": 100, "reason": "INC-42",
	})).Data
	id, _ := created["id"].(string)
	if len(id) != 32 {
		t.Fatalf("grant id %q", id)
	}
	for field, want := range map[string]interface{}{
		"entity_id": "contractor-entity", "expires_at": "2026-12-06T11:00:00Z", "max_uses": uint64(100), "uses": uint64(0),
		"remaining_uses": uint64(100), "state": "live", "reason": "INC-42", "created_at": "2026-12-06T09:00:00Z",
	} {
		if created[field] != want {
			t.Errorf("%s: %v (%T), want %v", field, created[field], created[field], want)
		}
	}
	if ops := created["operations"].([]string); strings.Join(ops, ",") != "decrypt,encrypt" {
		t.Errorf("operations %v", ops)
	}
	by := created["created_by"].(map[string]interface{})
	if by["display_name"] != "token-test" || !strings.HasPrefix(by["token_accessor_hmac"].(string), "hmac-sha256:") {
		t.Errorf("created_by %v", by)
	}
	now = now.Add(time.Minute)
	group := e.ok(e.write("keys/k/grants", map[string]interface{}{"group": "ops", "max_uses": 3})).Data
	if group["group"] != "ops" || len(group["operations"].([]string)) != len(keys.Operations) || group["expires_at"] != "2027-01-05T09:01:00Z" {
		t.Errorf("group grant with defaults: %v", group)
	}

	list := e.ok(e.request(logical.ListOperation, "keys/k/grants/", nil)).Data
	if ids := list["keys"].([]string); len(ids) != 2 || ids[0] != id {
		t.Fatalf("list: %v", list)
	}
	if info := list["key_info"].(map[string]interface{})[id].(map[string]interface{}); info["state"] != "live" {
		t.Errorf("list key_info %v", info)
	}

	read := e.ok(e.read("keys/k/grants/" + id)).Data
	if read["state"] != "live" || read["uses"] != uint64(0) {
		t.Errorf("read %v", read)
	}

	revoked := e.ok(e.request(logical.DeleteOperation, "keys/k/grants/"+id, nil)).Data
	if revoked["state"] != "revoked" || revoked["revoked_at"] != "2026-12-06T09:01:00Z" ||
		revoked["revoked_by"].(map[string]interface{})["display_name"] != "token-test" {
		t.Errorf("revoked %v", revoked)
	}
	if read := e.ok(e.read("keys/k/grants/" + id)).Data; read["state"] != "revoked" {
		t.Errorf("read after revocation: %v", read)
	}

	now = now.Add(30 * 24 * time.Hour) // the group grant's default ttl: the 30-day ceiling, exactly
	if read := e.ok(e.read("keys/k/grants/" + group["id"].(string))).Data; read["state"] != "expired" {
		t.Errorf("read after expiry: %v", read)
	}
	e.tick() // records the end of the grant nobody uses again

	var kinds []string
	for _, ev := range e.history("k") {
		if k := ev["event"].(string); strings.HasPrefix(k, "grant_") {
			kinds = append(kinds, k)
			if !strings.Contains(ev["details"].(string), "granted by token-test") {
				t.Errorf("%s event does not name who granted it: %v", k, ev)
			}
		}
	}
	if strings.Join(kinds, " ") != "grant_created grant_created grant_revoked grant_expired" {
		t.Errorf("grant events %v", kinds)
	}

	if resp, err := e.read("keys/k/grants/0123456789abcdef0123456789abcdef"); resp != nil || err != nil {
		t.Errorf("unknown grant: %v, %v, want 404", respText(resp), err)
	}
	if resp, err := e.request(logical.ListOperation, "keys/missing/grants/", nil); resp != nil || err != nil {
		t.Errorf("grants of a missing key: %v, %v, want 404", respText(resp), err)
	}
}

func TestGrantsRefuseWhatTheyCannotGrant(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	if _, err := e.b.keys.Update(t.Context(), e.storage, "k", actorOf(nil), func(tx *keys.Tx) error {
		tx.Key.Access = &keys.Access{MaxGrantTTL: time.Hour}
		tx.Changed()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		path string
		data map[string]interface{}
		want string
	}{
		{"keys/k/grants", map[string]interface{}{"entity_id": "e", "ttl": "61m"}, "exceeds the key's max_grant_ttl"},
		{"keys/k/grants", map[string]interface{}{"entity_id": "e", "ttl": "1h", "operations": "decrypt,launch"}, `unknown operation "launch"`},
		{"keys/k/grants", map[string]interface{}{"entity_id": "e"}, "needs a ttl or max_uses"},
		{"keys/k/grants", map[string]interface{}{"ttl": "1h"}, "one grantee"},
		{"keys/k/grants", map[string]interface{}{"entity_id": "e", "group": "g", "ttl": "1h"}, "one grantee"},
		{"keys/k/grants", map[string]interface{}{"entity_id": "e", "max_uses": -1}, "max_uses must not be negative"},
		{"keys/k/grants", map[string]interface{}{"entity_id": "e", "ttl": "1h", "uses": 3}, "uses"},
		{"keys/missing/grants", map[string]interface{}{"entity_id": "e", "ttl": "1h"}, "not found"},
	} {
		resp, err := e.write(c.path, c.data)
		if status(resp, err) != http.StatusBadRequest || !strings.Contains(respText(resp), c.want) {
			t.Errorf("%s %v: %d %v %v, want 400 with %q", c.path, c.data, status(resp, err), respText(resp), err, c.want)
		}
	}
	if left, _ := e.storage.List(t.Context(), "grants/k/"); len(left) != 0 {
		t.Errorf("refused grants were stored: %v", left)
	}
	e.ok(e.write("keys/k/grants", map[string]interface{}{"entity_id": "e", "ttl": "1h"}))
}

// Grants' ends are recorded by the periodic function from what it keeps in memory: once every key's grants are
// read (the first tick of a process), a tick with no grant ending reads and lists nothing of them.
func TestGrantEndsCostNoStoragePerTick(t *testing.T) {
	e := newTestBackend(t)
	// The grants below end an hour from the wall clock's now: a fixed date would make the test depend on the day
	// it runs (one of 2026-12-06 failed between 08:00 and 09:00 on 2026-12-07, a day later than its grants' end).
	now := time.Now().UTC()
	for i := range 10 {
		name := fmt.Sprintf("k%d", i)
		e.ok(e.write("keys/"+name, nil))
		e.ok(e.write("keys/"+name+"/grants", map[string]interface{}{"entity_id": "e", "ttl": "1h"}))
	}
	fresh := e.reopen()
	fresh.b.keys.Clock = func() time.Time { return now }
	fresh.tick() // reads every key's grants once
	gets, lists := fresh.storage.gets.Load(), fresh.storage.lists.Load()
	for range 5 {
		fresh.tick()
	}
	if reads := fresh.storage.gets.Load() - gets; reads > 5 { // config/hsm, once a tick
		t.Errorf("%d storage reads in 5 ticks with no grant ending", reads)
	}
	if n := fresh.storage.lists.Load() - lists; n != 0 {
		t.Errorf("%d listings in 5 ticks with no grant ending", n)
	}
	now = now.Add(24 * time.Hour)
	fresh.tick()
	for i := range 10 {
		if ended := lastEvent(fresh.history(fmt.Sprintf("k%d", i))); ended["event"] != "grant_expired" {
			t.Errorf("k%d: last event %v, want grant_expired", i, ended)
		}
	}
}
