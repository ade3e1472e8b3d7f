package cmk

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"strings"
	"testing"
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
