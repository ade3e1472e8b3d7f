package cmk

import (
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
)

// evidenceOf reads keys/<name>/evidence and the audit keys, and checks the bundle offline as an auditor would.
func (e *testEnv) evidenceOf(name string) (*evidence.Checked, *evidence.Bundle) {
	e.t.Helper()
	resp := e.ok(e.read("keys/" + name + "/evidence"))
	raw, err := json.Marshal(resp.Data)
	if err != nil {
		e.t.Fatal(err)
	}
	var b evidence.Bundle
	if err := json.Unmarshal(raw, &b); err != nil {
		e.t.Fatal(err)
	}
	keys := evidence.AuditKeys{}
	for v, info := range e.ok(e.read("audit_key")).Data["versions"].(map[string]interface{}) {
		pub, err := evidence.ParseAuditKey(info.(map[string]interface{})["public_key"].(string))
		if err != nil {
			e.t.Fatal(err)
		}
		n, err := strconv.Atoi(v)
		if err != nil {
			e.t.Fatal(err)
		}
		keys[n] = pub
	}
	c, err := evidence.Check(raw, keys)
	if err != nil {
		e.t.Fatal(err)
	}
	return c, &b
}

// keys/<name>/evidence is one document signed by the audit key: the key's ownership, versions, access, grants,
// its verified history and its usage; the audit public key alone verifies it, history altered in storage shows as
// broken in it, and a deleted key's evidence is its history.
func TestEvidenceBundleVerifiesOfflineAndShowsTampering(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": 0}))
	e.ok(e.write("keys/pay", map[string]interface{}{"owner": "team-payments", "tags": "env=prod", "data_assets": "cards"}))
	e.ok(e.write("keys/pay/rotate", nil))
	encryptOK(t, e, "pay", "one")
	e.ok(e.write("keys/pay/grants", map[string]interface{}{"entity_id": "ent-1", "ttl": "1h", "reason": "INC-1"}))
	e.ok(e.write("keys/pay/access", map[string]interface{}{"allowed_cidrs": "10.0.0.0/8"}))

	c, b := e.evidenceOf("pay")
	if !c.OK() || b.Format != evidence.BundleFormat {
		t.Fatalf("a fresh bundle does not verify: signature %v, history %+v, engine agrees %v", c.SignatureErr, c.History, c.EngineAgrees)
	}
	d := c.Document
	if d.Key.Owner != "team-payments" || d.Key.Tags["env"] != "prod" || len(d.Key.DataAssets) != 1 || d.Key.State != "active" ||
		d.Key.LatestVersion != 2 || len(d.Versions) != 2 || d.Versions[1].State != "active" || len(d.Grants) != 1 ||
		!strings.Contains(string(d.Access), "10.0.0.0/8") || len(d.AuditKeys) != 1 {
		t.Fatalf("document: %+v", d)
	}
	var usage struct {
		Uses uint64 `json:"uses"`
	}
	if err := json.Unmarshal(d.Usage, &usage); err != nil || usage.Uses != 1 {
		t.Fatalf("usage in the document: %s (%v)", d.Usage, err)
	}
	if !d.History.Verification.Verified || len(d.History.Events) != 4 || d.History.Head == nil {
		t.Fatalf("history in the document: %+v", d.History.Verification)
	}

	// The document is signed as it was given: a change to its text fails the signature.
	tampered := *b
	tampered.Document = strings.Replace(b.Document, "team-payments", "team-other", 1)
	raw, _ := json.Marshal(tampered)
	keys := evidence.AuditKeys{}
	for n, p := range d.AuditKeys {
		keys[n], _ = evidence.ParseAuditKey(p)
	}
	if got, err := evidence.Check(raw, keys); err != nil || got.OK() || got.SignatureErr == nil {
		t.Fatalf("a changed document verifies: %v %+v", err, got)
	}

	// History altered in storage: the engine's bundle is still signed, and says the history is broken where it is.
	page, err := e.inmem.Get(context.Background(), "history/pay/00000000")
	if err != nil || page == nil {
		t.Fatalf("page: %v %v", page, err)
	}
	var events []map[string]interface{}
	if err := json.Unmarshal(page.Value, &events); err != nil {
		t.Fatal(err)
	}
	events[1]["cause"] = "scheduled"
	altered, _ := json.Marshal(events)
	if err := e.inmem.Put(context.Background(), &logical.StorageEntry{Key: page.Key, Value: altered}); err != nil {
		t.Fatal(err)
	}
	c, _ = e.evidenceOf("pay")
	if c.SignatureErr != nil || c.OK() || c.History.Verified || c.History.Broken != 1 || !c.EngineAgrees ||
		c.Document.History.Verification.Broken != 1 {
		t.Fatalf("altered history: signature %v, history %+v, engine %+v", c.SignatureErr, c.History, c.Document.History.Verification)
	}
	if err := e.inmem.Put(context.Background(), page); err != nil {
		t.Fatal(err)
	}

	// A deleted key's evidence is its history, which vouches for its deletion.
	e.ok(e.write("keys/pay/config", map[string]interface{}{"deletion_allowed": true}))
	e.ok(e.request(logical.DeleteOperation, "keys/pay", nil))
	c, _ = e.evidenceOf("pay")
	if !c.OK() || c.Document.Key.State != "deleted" || len(c.Document.Versions) != 0 {
		t.Fatalf("a deleted key's evidence: %+v, %+v", c.History, c.Document.Key)
	}
	if resp, err := e.read("keys/never/evidence"); resp != nil || err != nil {
		t.Fatalf("evidence of a key that never was: %v %v", respText(resp), err)
	}
}
