package cmk

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// Owner, description, tags and data assets are set at creation (keys/<name> and import), changed on
// keys/<name>/config with a history event naming what changed, shown on the key read, and bounded.
func TestKeyOwnership(t *testing.T) {
	e := newImportBackend(t)
	e.ok(e.write("keys/payments", map[string]interface{}{
		"owner": "team-payments", "description": "card numbers at rest",
		"tags": map[string]interface{}{"env": "prod", "cost-center": "42"}, "data_assets": "db/cards,s3://receipts",
	}))
	resp := e.ok(e.read("keys/payments"))
	if resp.Data["owner"] != "team-payments" || resp.Data["description"] != "card numbers at rest" ||
		fmt.Sprint(resp.Data["tags"]) != "map[cost-center:42 env:prod]" || fmt.Sprint(resp.Data["data_assets"]) != "[db/cards s3://receipts]" {
		t.Fatalf("key read after creation: %v", resp.Data)
	}

	e.ok(e.write("keys/payments/config", map[string]interface{}{"owner": "entity-alice", "tags": []string{"env=staging"}}))
	resp = e.ok(e.read("keys/payments"))
	if resp.Data["owner"] != "entity-alice" || fmt.Sprint(resp.Data["tags"]) != "map[env:staging]" || resp.Data["description"] != "card numbers at rest" {
		t.Fatalf("key read after config: %v", resp.Data)
	}
	ev := lastEvent(e.history("payments"))
	if details := fmt.Sprint(ev["details"]); ev["event"] != "config_changed" || !strings.Contains(details, `owner "team-payments" → "entity-alice"`) ||
		!strings.Contains(details, "tags [cost-center=42 env=prod] → [env=staging]") || strings.Contains(details, "description") {
		t.Fatalf("history: %v", ev)
	}

	tooMany := map[string]interface{}{}
	for i := 0; i <= 50; i++ {
		tooMany[fmt.Sprint("t", i)] = "v"
	}
	for _, bad := range []map[string]interface{}{
		{"owner": strings.Repeat("o", 257)},
		{"description": strings.Repeat("d", 1025)},
		{"tags": tooMany},
		{"tags": map[string]interface{}{"k": strings.Repeat("v", 257)}},
		{"tags": map[string]interface{}{strings.Repeat("k", 129): "v"}},
		{"data_assets": strings.Repeat("a,", 33)},
	} {
		if code := status(e.write("keys/payments/config", bad)); code != 400 {
			t.Errorf("config %.60v: %d, want 400", bad, code)
		}
		if code := status(e.write("keys/other", bad)); code != 400 {
			t.Errorf("create with %.60v: %d, want 400", bad, code)
		}
	}

	// An imported key takes them at its creation too.
	customer, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pubDER, _ := x509.MarshalPKIXPublicKey(&customer.PublicKey)
	pubPEM := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}))
	wrappingPublicKey(t, e)
	e.ok(e.write("keys/partner/import", map[string]interface{}{"public_key": pubPEM, "type": "ecdsa-p256", "owner": "team-partners", "tags": "partner=acme"}))
	resp = e.ok(e.read("keys/partner"))
	if resp.Data["owner"] != "team-partners" || fmt.Sprint(resp.Data["tags"]) != "map[partner:acme]" {
		t.Fatalf("imported key: %v", resp.Data)
	}
}

// copyKey stores copies of key from under the names given, with owner and tags set by shape, straight into
// storage: many keys without an HSM call each (their versions name the same token objects, which inventory never
// touches).
func copyKey(t *testing.T, e *testEnv, from string, names []string, shape func(i int) (owner string, tags map[string]string)) {
	t.Helper()
	ctx := context.Background()
	policy, err := e.inmem.Get(ctx, keys.PolicyPrefix+from)
	if err != nil || policy == nil {
		t.Fatal(err)
	}
	versions, err := e.inmem.Get(ctx, keys.VersionsKey(from, 0))
	if err != nil || versions == nil {
		t.Fatal(err)
	}
	for i, name := range names {
		var k map[string]interface{}
		if err := json.Unmarshal(policy.Value, &k); err != nil {
			t.Fatal(err)
		}
		k["name"] = name
		k["owner"], k["tags"] = shape(i)
		entry, err := logical.StorageEntryJSON(keys.PolicyPrefix+name, k)
		if err != nil {
			t.Fatal(err)
		}
		if err := e.inmem.Put(ctx, entry); err != nil {
			t.Fatal(err)
		}
		if err := e.inmem.Put(ctx, &logical.StorageEntry{Key: keys.VersionsKey(name, 0), Value: versions.Value}); err != nil {
			t.Fatal(err)
		}
	}
}

// inventoryPages walks every page of inventory with the query given and returns the names in order.
func inventoryPages(t *testing.T, e *testEnv, query map[string]interface{}) []string {
	t.Helper()
	var names []string
	after := ""
	for {
		q := map[string]interface{}{"after": after}
		for k, v := range query {
			q[k] = v
		}
		resp := e.ok(e.request(logical.ListOperation, "inventory/", q))
		page, _ := resp.Data["keys"].([]string)
		names = append(names, page...)
		next, _ := resp.Data["next_after"].(string)
		if next == "" {
			return names
		}
		after = next
	}
}

// With 10,000 keys, inventory filters and pages in name order, and once the keys' snapshots are cached (the
// default cache holds them all) it reads no key from storage: one LIST of the names per request.
func TestInventoryOfManyKeysReadsNoKeyStorage(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/template", nil))
	names := make([]string, 10000)
	for i := range names {
		names[i] = fmt.Sprintf("k%05d", i)
	}
	copyKey(t, e, "template", names, func(i int) (string, map[string]string) {
		tags := map[string]string{"env": "staging"}
		if i%2 == 0 {
			tags["env"] = "prod"
		}
		return fmt.Sprint("team-", i%10), tags
	})

	query := map[string]interface{}{"owner": "team-3", "tag": []string{"env=staging"}, "limit": 300}
	first := inventoryPages(t, e, query)
	gets, lists := e.storage.gets.Load(), e.storage.lists.Load()
	second := inventoryPages(t, e, query)
	if reads := e.storage.gets.Load() - gets; reads != 0 {
		t.Fatalf("the second inventory read storage %d times", reads)
	}
	if n := e.storage.lists.Load() - lists; n != 4 {
		t.Fatalf("the second inventory (4 pages) listed storage %d times, want one LIST of the names per page", n)
	}
	if len(first) != 1000 || !slices.IsSorted(first) || !slices.Equal(first, second) || first[0] != "k00003" || first[999] != "k09993" {
		t.Fatalf("team-3's staging keys: %d, from %v to %v", len(first), first[:1], first[len(first)-1:])
	}
	resp := e.ok(e.request(logical.ReadOperation, "inventory", map[string]interface{}{"limit": 2, "after": "k00003", "tag": "env=prod"}))
	info := resp.Data["key_info"].(map[string]interface{})
	k4 := info["k00004"].(map[string]interface{})
	if fmt.Sprint(resp.Data["keys"]) != "[k00004 k00006]" || resp.Data["next_after"] != "k00006" ||
		k4["owner"] != "team-4" || fmt.Sprint(k4["tags"]) != "map[env:prod]" || k4["state"] != "active" || k4["latest_version"] != 1 {
		t.Fatalf("READ with query fields: %v", resp.Data)
	}
	for _, bad := range []map[string]interface{}{{"tag": "env"}, {"state": "gone"}, {"limit": 0}, {"limit": 1001}, {"type": "des"}} {
		if code := status(e.request(logical.ListOperation, "inventory/", bad)); code != 400 {
			t.Errorf("inventory %v: %d, want 400", bad, code)
		}
	}
}

// Each inventory filter keeps the keys that have its property (and false those that do not), and
// reports/compliance names each key needing attention with why.
func TestInventoryFiltersAndComplianceReport(t *testing.T) {
	e, now := newDualControlBackend(t, nil)
	daily := map[string]interface{}{"auto_rotate_period": "24h", "owner": "team-b"}
	e.ok(e.write("keys/plain", map[string]interface{}{"type": "aes128-gcm96"}))
	e.ok(e.write("keys/owned", map[string]interface{}{"auto_rotate_period": "24h", "owner": "team-a"}))
	e.ok(e.write("keys/owned/access", map[string]interface{}{"allowed_cidrs": "10.0.0.0/8"}))
	e.ok(e.write("keys/owned/grants", map[string]interface{}{"entity_id": "contractor", "ttl": "1h"}))
	e.ok(e.write("keys/overdue", map[string]interface{}{"owner": "team-a"}))
	e.ok(e.write("keys/overdue/config", map[string]interface{}{"next_rotation_time": now.Add(-time.Hour).UTC().Format(time.RFC3339)}))
	for _, name := range []string{"disabled", "deleting", "versioned", "held", "busy"} {
		e.ok(e.write("keys/"+name, daily))
	}
	e.ok(e.write("keys/disabled/disable", nil))
	e.ok(e.write("keys/deleting/config", map[string]interface{}{"deletion_allowed": true}))
	e.ok(e.request(logical.DeleteOperation, "keys/deleting", nil))
	e.ok(e.write("keys/versioned/rotate", nil))
	e.ok(e.write("keys/versioned/versions/1/destroy", nil))
	e.ok(e.write("keys/held/rotate", nil))
	e.ok(e.write("keys/held/config", map[string]interface{}{"approvals_required": 1}))
	approvalID := e.held(e.as("alice", "", logical.UpdateOperation, "keys/held/versions/1/destroy", nil))["approval_id"]
	e.ok(e.write("keys/busy/config", map[string]interface{}{"max_encryptions_per_version": 10}))
	for i := 0; i < 9; i++ {
		encryptOK(t, e, "busy", "x")
	}

	for query, want := range map[string]string{
		"owner=team-a":               "overdue owned",
		"type=aes128-gcm96":          "plain",
		"state=active":               "busy held overdue owned plain versioned",
		"state=disabled":             "disabled",
		"state=deletion_scheduled":   "deleting",
		"rotation_overdue=true":      "overdue",
		"near_usage_limit=true":      "busy",
		"pending_deletion=true":      "deleting versioned",
		"pending_approvals=true":     "held",
		"no_rotation_schedule=true":  "plain",
		"no_access_conditions=false": "owned",
		"pending_deletion=false&no_rotation_schedule=false&state=active": "busy held overdue owned",
	} {
		q := map[string]interface{}{}
		for _, pair := range strings.Split(query, "&") {
			field, value, _ := strings.Cut(pair, "=")
			q[field] = value
		}
		if got := strings.Join(inventoryPages(t, e, q), " "); got != want {
			t.Errorf("inventory %s: %s, want %s", query, got, want)
		}
	}
	info := e.ok(e.request(logical.ListOperation, "inventory/", nil)).Data["key_info"].(map[string]interface{})
	busy, held := info["busy"].(map[string]interface{}), info["held"].(map[string]interface{})
	if busy["encryptions"] != uint64(9) || busy["max_encryptions_per_version"] != uint64(10) || held["pending_approvals"] != 1 ||
		info["owned"].(map[string]interface{})["access"] == "none" || info["deleting"].(map[string]interface{})["deletion_scheduled_time"] == "" {
		t.Fatalf("summaries: busy %v, held %v", busy, held)
	}

	report := e.ok(e.read("reports/compliance")).Data
	findings := func(report map[string]interface{}, section string) string {
		var out []string
		for _, f := range report[section].([]map[string]interface{}) {
			if f["reason"] == "" {
				t.Errorf("%s finding without a reason: %v", section, f)
			}
			out = append(out, fmt.Sprint(f["key"]))
		}
		slices.Sort(out)
		return strings.Join(out, " ")
	}
	for section, want := range map[string]string{
		"no_rotation_schedule":    "plain",
		"no_owner":                "plain",
		"rotation_overdue":        "overdue",
		"near_usage_limit":        "busy",
		"pending_deletions":       "deleting versioned",
		"pending_approvals":       "held",
		"grants_outstanding":      "owned",
		"old_versions_encrypting": "",
	} {
		if got := findings(report, section); got != want {
			t.Errorf("report %s: %q, want %q", section, got, want)
		}
	}
	if p := report["pending_approvals"].([]map[string]interface{})[0]; p["approval_id"] != approvalID {
		t.Errorf("pending approval: %v, want id %v", p, approvalID)
	}

	// The count follows the approvals as they are stored: withdrawn, the request is pending no more, without a read.
	e.ok(e.as("alice", "", logical.UpdateOperation, fmt.Sprint("approvals/", approvalID, "/reject"), nil))
	gets := e.storage.gets.Load()
	if got := inventoryPages(t, e, map[string]interface{}{"pending_approvals": true}); len(got) != 0 {
		t.Errorf("pending approvals after the request was withdrawn: %v", got)
	}
	if reads := e.storage.gets.Load() - gets; reads != 0 {
		t.Errorf("inventory read storage %d times for pending approvals it had counted", reads)
	}

	// Two hours on, every enabled AES key whose latest version is older than an hour is found.
	*now = now.Add(2 * time.Hour)
	report = e.ok(e.request(logical.ReadOperation, "reports/compliance", map[string]interface{}{"max_version_age": "1h"})).Data
	if got := findings(report, "old_versions_encrypting"); got != "busy held overdue owned plain versioned" {
		t.Errorf("old versions encrypting: %q", got)
	}
}
