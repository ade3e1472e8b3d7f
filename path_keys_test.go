package cmk

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

func TestKeyCreateReadListDelete(t *testing.T) {
	e := newTestBackend(t)
	resp := e.ok(e.write("keys/default", nil))
	if resp.Data["type"] != "aes256-gcm96" || resp.Data["latest_version"] != 1 {
		t.Fatalf("create: %v", resp.Data)
	}
	e.ok(e.write("keys/small", map[string]interface{}{"type": "aes128-gcm96"}))

	resp = e.ok(e.read("keys/default"))
	want := map[string]interface{}{
		"name": "default", "type": "aes256-gcm96", "derived": false, "exportable": false,
		"allow_plaintext_backup": false, "deletion_allowed": false, "min_decryption_version": 1,
		"min_encryption_version": 0, "latest_version": 1, "supports_encryption": true,
		"supports_decryption": true, "supports_signing": false, "supports_derivation": false,
		"protection_level": "hsm", "imported_key": false, "auto_rotate_period": int64(0), "min_available_version": 0,
	}
	for k, v := range want {
		if resp.Data[k] != v {
			t.Errorf("%s = %v, want %v", k, resp.Data[k], v)
		}
	}
	if keys := resp.Data["keys"].(map[string]int64); len(keys) != 1 || keys["1"] == 0 {
		t.Errorf("keys: %v", keys)
	}
	v1 := resp.Data["versions"].(map[string]interface{})["1"].(map[string]interface{})
	if v1["state"] != "active" || len(v1["hsm_id"].(string)) != 32 ||
		v1["label"] != "cmk/"+e.b.mountID+"/default/v1" || !strings.Contains(v1["created_by"].(string), "hmac-sha256:") || strings.Contains(v1["created_by"].(string), "accessor-test") {
		t.Errorf("version 1: %v", v1)
	}

	// Creating again changes nothing and says so.
	resp = e.ok(e.write("keys/default", nil))
	if resp.Data["latest_version"] != 1 || len(resp.Warnings) != 1 {
		t.Fatalf("second create: %v %v", resp.Data, resp.Warnings)
	}

	resp = e.ok(e.request(logical.ListOperation, "keys/", nil))
	names := resp.Data["keys"].([]string)
	sort.Strings(names)
	if strings.Join(names, ",") != "default,small" {
		t.Fatalf("list: %v", names)
	}
	if n := len(e.tokenObjects()); n != 2 {
		t.Fatalf("%d objects on the token, want 2 (HMAC secrets come with the first HMAC)", n)
	}

	// Deletion needs deletion_allowed, then (with no grace period, as Transit) destroys the objects on the token.
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": 0}))
	if got := status(e.request(logical.DeleteOperation, "keys/default", nil)); got != 400 {
		t.Fatalf("delete without deletion_allowed: %d", got)
	}
	e.ok(e.write("keys/default/config", map[string]interface{}{"deletion_allowed": true}))
	e.ok(e.request(logical.DeleteOperation, "keys/default", nil))
	if resp, _ := e.read("keys/default"); resp != nil {
		t.Fatalf("read after delete: %v", resp.Data)
	}
	for _, o := range e.tokenObjects() {
		if strings.Contains(o.Label, "/default/") {
			t.Fatalf("object %q left on the token after delete", o.Label)
		}
	}
	// Deleting what is gone is not an error (Vault may retry a request after a plugin crash).
	e.ok(e.request(logical.DeleteOperation, "keys/default", nil))
}

func TestKeyCreateRefusesWhatTheHSMCannotDo(t *testing.T) {
	e := newTestBackend(t)
	cases := []struct {
		name string
		data map[string]interface{}
		want string
	}{
		{"unknown type", map[string]interface{}{"type": "chacha20-poly1305"}, "unsupported key type"},
		{"exportable", map[string]interface{}{"exportable": true}, "never leaves the HSM"},
		{"plaintext backup", map[string]interface{}{"allow_plaintext_backup": true}, "never leaves the HSM"},
		{"derived", map[string]interface{}{"derived": true}, "derivation"},
		{"convergent", map[string]interface{}{"convergent_encryption": true}, "convergent"},
		{"auto rotate under an hour", map[string]interface{}{"auto_rotate_period": "30m"}, "at least an hour"},
		{"usage limit on a signing key", map[string]interface{}{"type": "ecdsa-p256", "max_encryptions_per_version": 10}, "AES keys"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, err := e.write("keys/refused", c.data)
			if status(resp, err) != 400 || !strings.Contains(respText(resp), c.want) {
				t.Fatalf("got %d %s, want 400 mentioning %q", status(resp, err), respText(resp), c.want)
			}
		})
	}
	if resp, _ := e.read("keys/refused"); resp != nil {
		t.Fatal("a refused create left a key")
	}
	if n := len(e.tokenObjects()); n != 0 {
		t.Fatalf("a refused create left %d objects on the token", n)
	}
	for _, path := range []string{"export/encryption-key/k", "export/hmac-key/k/1", "backup/k"} {
		resp, err := e.read(path)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), "non-extractable") {
			t.Errorf("%s: %d %s", path, status(resp, err), respText(resp))
		}
	}
	if got := status(e.write("restore/k", map[string]interface{}{"backup": "x"})); got != 400 {
		t.Errorf("restore: %d", got)
	}
}

func TestKeyCacheAndInvalidate(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	encryptOK(t, e, "k", "warm")
	before := e.storage.gets.Load()
	for i := 0; i < 20; i++ {
		decryptOK(t, e, "k", encryptOK(t, e, "k", "x"))
	}
	// Only config/keys is read per request until cached; key metadata never.
	if reads := e.storage.gets.Load() - before; reads != 0 {
		t.Fatalf("%d storage reads on the encrypt/decrypt hot path", reads)
	}
	// Another node rotated the key: storage changes, Invalidate drops the cached copy.
	ctx := context.Background()
	p, _ := keys.Load(ctx, e.storage, "k")
	p.MinEncryptionVersion = 1
	entry, _ := logical.StorageEntryJSON(keys.PolicyPrefix+"k", p)
	if err := e.inmem.Put(ctx, entry); err != nil {
		t.Fatal(err)
	}
	if resp := e.ok(e.read("keys/k")); resp.Data["min_encryption_version"] != 0 {
		t.Fatal("cache bypassed before invalidation")
	}
	e.b.invalidate(ctx, keys.PolicyPrefix+"k")
	if resp := e.ok(e.read("keys/k")); resp.Data["min_encryption_version"] != 1 {
		t.Fatalf("invalidate did not reload: %v", resp.Data["min_encryption_version"])
	}
}

// Every object the engine creates is sensitive and never extractable, as the token reports it.
func TestTokenObjectsAreSensitiveAndNeverExtractable(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/a", nil))
	e.ok(e.write("keys/b", map[string]interface{}{"type": "aes128-gcm96"}))
	e.ok(e.write("keys/a/rotate", nil))
	encryptOK(t, e, "upserted", "x")
	for _, k := range []string{"a", "b", "upserted"} { // every version's HMAC secret is made on its first HMAC
		e.ok(e.write("hmac/"+k, map[string]interface{}{"input": b64("x")}))
	}
	e.ok(e.write("hmac/a", map[string]interface{}{"input": b64("x"), "key_version": 1}))
	objs := e.tokenObjects()
	if len(objs) != 8 {
		t.Fatalf("%d objects, want 8", len(objs))
	}
	for _, o := range objs {
		if !o.Token || !o.Private || !o.Sensitive || !o.AlwaysSensitive || o.Extractable || !o.NeverExtractable {
			t.Errorf("%s: %+v", o.Label, o)
		}
	}
}

// A version whose object is deleted from the token behind the engine's back (here by another process, OpenSC's
// pkcs11-tool): its operations fail with a message that says so and the key reports it, while the key's other
// versions and other keys keep working.
func TestObjectDeletedBehindOurBack(t *testing.T) {
	tool, err := exec.LookPath("pkcs11-tool")
	if err != nil {
		t.Fatalf("pkcs11-tool (Debian's opensc, installed by make deps): %v", err)
	}
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/other", nil))
	ct1 := encryptOK(t, e, "k", "v1 data")
	e.ok(e.write("keys/k/rotate", nil))
	ct2 := encryptOK(t, e, "k", "v2 data")
	other := encryptOK(t, e, "other", "other data")

	p, _ := e.b.keys.Get(context.Background(), e.storage, "k")
	cmd := exec.Command(tool, "--module", softhsm.Library, "--token-label", e.label, "--login", "--pin", testPIN,
		"--delete-object", "--type", "secrkey", "--id", p.Versions[1].HSMID)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+softhsm.Conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pkcs11-tool --delete-object: %v: %s", err, out)
	}

	resp, err := e.write("decrypt/k", map[string]interface{}{"ciphertext": ct1})
	if status(resp, err) != 500 || !strings.Contains(fmt.Sprint(err), "missing from the HSM token") {
		t.Fatalf("decrypt with the deleted version: %d %v %s", status(resp, err), err, respText(resp))
	}
	v1 := e.ok(e.read("keys/k")).Data["versions"].(map[string]interface{})["1"].(map[string]interface{})
	if missing, ok := v1["hsm_objects_missing"].(map[string]interface{}); !ok || missing["AES key"] == "" {
		t.Fatalf("version 1 does not report its missing object: %v", v1)
	}
	v2 := e.ok(e.read("keys/k/versions/2")).Data
	if _, reported := v2["hsm_objects_missing"]; reported {
		t.Fatalf("version 2 reported missing: %v", v2)
	}
	if decryptOK(t, e, "k", ct2) != "v2 data" || decryptOK(t, e, "other", other) != "other data" {
		t.Fatal("other versions or keys stopped working")
	}
	if decryptOK(t, e, "k", encryptOK(t, e, "k", "still")) != "still" {
		t.Fatal("encryption with the latest version stopped working")
	}
	// A batch keeps its other items.
	rs := batchResults(t, e.ok(e.write("decrypt/k", map[string]interface{}{
		"batch_input":                   []interface{}{map[string]interface{}{"ciphertext": ct1}, map[string]interface{}{"ciphertext": ct2}},
		"partial_failure_response_code": 207,
	})))
	if !strings.Contains(rs[0].Error, "missing from the HSM token") || rs[1].Error != "" || rs[1].Plaintext != b64("v2 data") {
		t.Fatalf("batch: %+v", rs)
	}
}

// Versions are stored in chunks, so that no storage entry grows with the key's life.
func TestVersionsAreStoredInChunks(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	first := encryptOK(t, e, "k", "first")
	for i := 0; i < keys.VersionChunk+4; i++ {
		e.ok(e.write("keys/k/rotate", nil))
	}
	ctx := context.Background()
	for _, key := range []string{keys.PolicyPrefix + "k", keys.VersionsKey("k", 0), keys.VersionsKey("k", 1)} {
		entry, err := e.inmem.Get(ctx, key)
		if err != nil || entry == nil {
			t.Fatalf("%s: %v", key, err)
		}
		if len(entry.Value) > 256*1024 {
			t.Fatalf("%s is %d bytes", key, len(entry.Value))
		}
	}
	var policy map[string]interface{}
	entry, _ := e.inmem.Get(ctx, keys.PolicyPrefix+"k")
	_ = json.Unmarshal(entry.Value, &policy)
	if _, has := policy["versions"]; has {
		t.Fatal("versions stored in the policy entry")
	}
	again := e.reopen()
	again.ok(again.write("config/hsm", map[string]interface{}{"token_label": e.label, "pin": testPIN}))
	if decryptOK(t, again, "k", first) != "first" {
		t.Fatal("version 1 lost across chunks")
	}
	if r := again.ok(again.read("keys/k")); r.Data["latest_version"] != keys.VersionChunk+5 {
		t.Fatalf("latest %v", r.Data["latest_version"])
	}
}

// Defect g: key_size=0 is "unset" for every type, as in Transit: Terraform's vault_transit_secret_backend_key
// always sends it.
func TestKeySizeZeroForEveryType(t *testing.T) {
	e := newTestBackend(t)
	for _, typ := range keys.TypeNames {
		resp := e.ok(e.write("keys/zero-"+typ, map[string]interface{}{"type": typ, "key_size": 0}))
		if resp.Data["type"] != typ {
			t.Fatalf("%s: %v", typ, resp.Data)
		}
	}
	if got := status(e.write("keys/sized", map[string]interface{}{"type": "aes256-gcm96", "key_size": 32})); got != 400 {
		t.Fatalf("key_size on an AES key: %d", got)
	}
}

// Defect h: fields neither this engine nor Transit knows are refused with a 400 naming them (a typo must not
// silently create an AES key or change nothing); the fields Transit knows keep their handling.
func TestUnknownFieldsAreRefused(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	for _, c := range []struct {
		path  string
		data  map[string]interface{}
		names string
	}{
		{"keys/typo", map[string]interface{}{"typ": "rsa-2048"}, "typ"},
		{"keys/k/config", map[string]interface{}{"allow_deletion": true}, "allow_deletion"},
		{"config/keys", map[string]interface{}{"deletion_grace": "0s"}, "deletion_grace"},
		{"config/hsm", map[string]interface{}{"tokenlabel": "x"}, "tokenlabel"},
		{"config/hsm", map[string]interface{}{"library": "/tmp/evil.so"}, "CMK_PKCS11_LIBRARY"},
	} {
		resp, err := e.write(c.path, c.data)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), c.names) {
			t.Errorf("%s %v: %d %s", c.path, c.data, status(resp, err), respText(resp))
		}
	}
	if k, _ := e.b.keys.Get(context.Background(), e.storage, "typo"); k != nil {
		t.Fatal("the typo made a key")
	}
	// Transit's own fields: accepted as Transit accepts them.
	e.ok(e.write("keys/transit-fields", map[string]interface{}{"type": "aes256-gcm96", "context": "", "managed_key_name": ""}))
	if r := e.ok(e.read("keys/k")); r.Data["deletion_allowed"] != false {
		t.Fatal("a refused config write changed the key")
	}
	// Terraform's Vault provider misspells min_encryption_version on every key it creates; Transit ignores it.
	resp := e.ok(e.write("keys/k/config", map[string]interface{}{"min_encryption_versoin": 0, "deletion_allowed": true}))
	if len(resp.Warnings) == 0 || !strings.Contains(resp.Warnings[0], "min_encryption_versoin") || resp.Data["deletion_allowed"] != true {
		t.Fatalf("the provider's misspelt field: %v %v", resp.Warnings, resp.Data["deletion_allowed"])
	}
}
