package cmk

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/xks/xkstest"
)

// doorCall is one request of TestEveryUseOfKeyMaterialPassesTheDoor: a path of the backend's, with its operation,
// and whether it uses key material (and so must be refused by a key condition that denies the caller).
type doorCall struct {
	op       logical.Operation
	path     string
	data     map[string]interface{}
	material bool
}

// TestEveryUseOfKeyMaterialPassesTheDoor walks the backend's own list of paths: with a condition that denies the
// caller on the keys, every path that uses key material is refused with 403 naming the condition, and every other
// path works as without it. A path added later without an entry here fails the test, so it must be classified.
func TestEveryUseOfKeyMaterialPassesTheDoor(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ecdsa-p256"}))
	ct := encryptOK(t, e, "k", "door")
	mac := e.ok(e.write("hmac/k", map[string]interface{}{"input": b64("door")})).Data["hmac"].(string)
	sig := e.ok(e.write("sign/s", map[string]interface{}{"input": b64("door")})).Data["signature"].(string)
	dk := e.ok(e.write("datakey/wrapped/k", nil)).Data["ciphertext"].(string)
	// AWS's External Key Store: an encryption with k, signed as AWS KMS signs it.
	xc := newXKSStore(t, e, "door", nil)
	e.ok(e.write("xks/stores/door/keys/ext", map[string]interface{}{"key": "k"}))
	xksEncrypt := xksRequestData(xkstest.NewRequest("xks.example.com", xc.uriPath+"/keys/ext/encrypt",
		[]byte(`{"requestMetadata":{"awsPrincipalArn":"a","kmsKeyArn":"k","kmsOperation":"Encrypt","kmsRequestId":"r"},"plaintext":"AAAA","encryptionAlgorithm":"AES_GCM"}`),
		xc.akid, xc.key, "us-east-1", time.Now()))
	for _, k := range []string{"k", "s"} {
		e.ok(e.write("keys/"+k+"/access", map[string]interface{}{"allowed_cidrs": "10.0.0.0/8"}))
	}
	pt := map[string]interface{}{"plaintext": b64("door")}
	batch := map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"plaintext": b64("a")}, map[string]interface{}{"plaintext": b64("b")}}}
	calls := []doorCall{
		{logical.UpdateOperation, "encrypt/k", pt, true},
		{logical.UpdateOperation, "encrypt/k", batch, true},
		{logical.CreateOperation, "encrypt/k", pt, true},
		{logical.UpdateOperation, "decrypt/k", map[string]interface{}{"ciphertext": ct}, true},
		{logical.UpdateOperation, "decrypt/k", map[string]interface{}{"ciphertext": dk}, true},
		{logical.UpdateOperation, "rewrap/k", map[string]interface{}{"ciphertext": ct}, true},
		{logical.UpdateOperation, "datakey/plaintext/k", nil, true},
		{logical.UpdateOperation, "datakey/wrapped/k", nil, true},
		{logical.UpdateOperation, "sign/s", map[string]interface{}{"input": b64("door")}, true},
		{logical.UpdateOperation, "sign/s/sha2-384", map[string]interface{}{"input": b64("door")}, true},
		{logical.UpdateOperation, "hmac/k", map[string]interface{}{"input": b64("door")}, true},
		{logical.UpdateOperation, "verify/k", map[string]interface{}{"input": b64("door"), "hmac": mac}, true},
		{logical.UpdateOperation, "keys/s/csr", nil, true},
		{logical.UpdateOperation, "xks/request", xksEncrypt, true}, // its answer's status, 403, is the XKS status

		// A signature is verified with the public key: no material, no condition.
		{logical.UpdateOperation, "verify/s", map[string]interface{}{"input": b64("door"), "signature": sig}, false},
		{logical.ReadOperation, "config/hsm", nil, false},
		{logical.UpdateOperation, "config/hsm", map[string]interface{}{"pool_size": 2}, false},
		{logical.CreateOperation, "config/hsm", map[string]interface{}{"pool_size": 2}, false},
		{logical.ReadOperation, "config/keys", nil, false},
		{logical.UpdateOperation, "config/keys", map[string]interface{}{"max_batch_size": 500}, false},
		{logical.ReadOperation, "cache-config", nil, false},
		{logical.UpdateOperation, "cache-config", map[string]interface{}{"size": 0}, false},
		{logical.ReadOperation, "config/metrics", nil, false},
		{logical.UpdateOperation, "config/metrics", map[string]interface{}{"per_key_labels": true}, false},
		{logical.ReadOperation, "metrics", nil, false},
		{logical.ReadOperation, "health", nil, false},
		{logical.ListOperation, "keys/", nil, false},
		{logical.ReadOperation, "keys/k", nil, false},
		{logical.UpdateOperation, "keys/k", nil, false},
		{logical.UpdateOperation, "keys/k/config", map[string]interface{}{"auto_rotate_period": "0"}, false},
		{logical.UpdateOperation, "keys/k/rotate", nil, false},
		{logical.ReadOperation, "wrapping_key", nil, false},
		{logical.UpdateOperation, "keys/k/import", map[string]interface{}{"ciphertext": "x"}, false},
		{logical.UpdateOperation, "keys/k/import_version", map[string]interface{}{"ciphertext": "x"}, false},
		{logical.ReadOperation, "keys/k/versions/1", nil, false},
		{logical.UpdateOperation, "keys/k/versions/1/disable", nil, false},
		{logical.UpdateOperation, "keys/k/versions/1/enable", nil, false},
		{logical.UpdateOperation, "keys/s/disable", nil, false},
		{logical.UpdateOperation, "keys/s/enable", nil, false},
		{logical.UpdateOperation, "keys/k/cancel-deletion", nil, false},
		{logical.UpdateOperation, "keys/k/trim", map[string]interface{}{"min_available_version": 0}, false},
		{logical.ReadOperation, "keys/k/history", nil, false},
		{logical.ReadOperation, "keys/k/migration", nil, false}, // counts from the usage analytics, no material
		// The audit key signs history heads, never with a key's material.
		{logical.ReadOperation, "keys/k/history/verify", nil, false},
		{logical.ReadOperation, "audit_key", nil, false},
		{logical.ReadOperation, "keys/k/evidence", nil, false}, // signed by the mount's audit key, not the key
		{logical.UpdateOperation, "audit_key/rotate", nil, false},
		{logical.ReadOperation, "keys/k/access", nil, false},
		{logical.UpdateOperation, "random/16", nil, false},
		{logical.UpdateOperation, "hash", map[string]interface{}{"input": b64("door")}, false},
		{logical.ReadOperation, "export/public-key/s", nil, false},
		{logical.UpdateOperation, "keys/s/set-certificate", map[string]interface{}{"certificate_chain": "x"}, false},
		{logical.ReadOperation, "backup/k", nil, false},
		{logical.UpdateOperation, "restore", nil, false},
		{logical.ReadOperation, "keys/k/reconcile", nil, false},
		{logical.UpdateOperation, "keys/k/reconcile", nil, false},
		{logical.ReadOperation, "reconcile", nil, false},
		{logical.UpdateOperation, "reconcile", nil, false},
		{logical.UpdateOperation, "reconcile/adopt-unverified", nil, false},
		{logical.UpdateOperation, "reconcile/adopt-unverified/k", nil, false},
		{logical.UpdateOperation, "keys/k/grants", map[string]interface{}{"entity_id": "ent-1", "ttl": "1h"}, false},
		{logical.ListOperation, "keys/k/grants/", nil, false},
		{logical.ReadOperation, "keys/k/grants/nosuchgrant", nil, false},
		{logical.DeleteOperation, "keys/k/grants/nosuchgrant", nil, false},
		{logical.ListOperation, "approvals/", nil, false},
		{logical.ReadOperation, "approvals/nosuchapproval", nil, false},
		{logical.UpdateOperation, "approvals/nosuchapproval/approve", nil, false},
		{logical.UpdateOperation, "approvals/nosuchapproval/reject", nil, false},
		{logical.ReadOperation, "config/analytics", nil, false},
		{logical.UpdateOperation, "config/analytics", map[string]interface{}{"enabled": true}, false},
		// Usage and anomalies are counts the door made of the keys' uses, not uses.
		{logical.ReadOperation, "keys/k/usage", nil, false},
		{logical.ReadOperation, "keys/k/anomalies", nil, false},
		{logical.UpdateOperation, "keys/k/anomalies/lift", map[string]interface{}{"caller": "token:token-test"}, false},
		// Inventory and reports read the keys' metadata, never their material.
		{logical.ListOperation, "inventory/", nil, false},
		{logical.ReadOperation, "inventory", map[string]interface{}{"no_access_conditions": false}, false},
		{logical.ReadOperation, "reports/compliance", nil, false},
		// AWS External Key Store settings: stores, credentials, which keys AWS may use.
		{logical.ListOperation, "xks/stores/", nil, false},
		{logical.CreateOperation, "xks/stores/door2", nil, false},
		{logical.UpdateOperation, "xks/stores/door", map[string]interface{}{"requests_per_second": 100}, false},
		{logical.ReadOperation, "xks/stores/door", nil, false},
		{logical.UpdateOperation, "xks/stores/door2/credentials", nil, false},
		{logical.ListOperation, "xks/stores/door/credentials/", nil, false},
		{logical.ReadOperation, "xks/stores/door/credentials/" + xc.akid, nil, false},
		{logical.ListOperation, "xks/stores/door/keys/", nil, false},
		{logical.CreateOperation, "xks/stores/door2/keys/x2", map[string]interface{}{"key": "k"}, false},
		{logical.UpdateOperation, "xks/stores/door/keys/ext", map[string]interface{}{"key_usage": "ENCRYPT"}, false},
		{logical.ReadOperation, "xks/stores/door/keys/ext", nil, false},
		{logical.DeleteOperation, "xks/stores/door/keys/ext", nil, false},
		{logical.DeleteOperation, "xks/stores/door/credentials/" + xc.akid, nil, false},
		{logical.DeleteOperation, "xks/stores/door2", nil, false},
		// Last: what ends the keys' use.
		{logical.UpdateOperation, "keys/k/access", map[string]interface{}{"time_zone": ""}, false},
		{logical.DeleteOperation, "keys/k", nil, false},
		{logical.DeleteOperation, "keys/s/access", nil, false},
	}

	// Every path and operation of the backend has a call: none is left unclassified.
	for _, p := range e.b.Backend.Paths {
		for op := range p.Operations {
			if !slices.ContainsFunc(calls, func(c doorCall) bool { return c.op == op && patternOwns(p.Pattern, c.path) }) {
				t.Errorf("path %s (%s) has no call in this test: say whether it uses key material", p.Pattern, op)
			}
		}
	}
	for _, c := range calls {
		resp, err := e.b.HandleRequest(context.Background(), &logical.Request{
			ID: fmt.Sprint("door-", requestCount.Add(1)), Operation: c.op, Path: c.path, Data: c.data, Storage: e.storage,
			DisplayName: "token-test", ClientTokenAccessor: "accessor-test",
		})
		got := status(resp, err)
		if c.path == "xks/request" && resp != nil && resp.Data["status"] != nil {
			xksStatus, _ := resp.Data["status"].(int)
			got = xksStatus
		}
		switch {
		case c.material && (got != 403 || !strings.Contains(fmt.Sprint(err, respText(resp)), "allowed_cidrs")):
			t.Errorf("%s %s uses key material and passed the door: %d %v %s", c.op, c.path, got, err, respText(resp))
		case !c.material && got == 403 && strings.Contains(fmt.Sprint(err, respText(resp)), "allowed_cidrs"):
			t.Errorf("%s %s uses no key material and was refused by the key's conditions: %v %s", c.op, c.path, err, respText(resp))
		}
	}
}

// patternOwns says whether a backend path's pattern matches path, whole.
func patternOwns(pattern, path string) bool {
	re, err := regexp.Compile("^" + strings.TrimSuffix(strings.TrimPrefix(pattern, "^"), "$") + "$")
	return err == nil && re.MatchString(path)
}

// A use is admitted for one operation, and serves that operation only: a use admitted to decrypt cannot encrypt,
// sign or compute an HMAC with the key, so that what the door judged is what the key is used for. Rewrap's use
// decrypts and encrypts; an HMAC's verification's use verifies HMACs and computes none for the caller.
func TestUseServesOnlyTheOperationItWasAdmittedFor(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ecdsa-p256"}))
	ct := encryptOK(t, e, "k", "payload")
	ctx := context.Background()
	use := func(name string, op keys.Operation) *keys.Use {
		t.Helper()
		u, err := e.b.keys.Use(ctx, e.storage, name, keys.Caller{}, op, 1)
		if err != nil {
			t.Fatalf("%s on %s: %v", op, name, err)
		}
		return u
	}
	refused := func(what string, err error) {
		t.Helper()
		if err == nil || !strings.Contains(err.Error(), "a use admitted for") {
			t.Fatalf("%s: %v, want a refusal naming the admitted operation", what, err)
		}
	}

	dec := use("k", keys.OpDecrypt)
	if pt, err := dec.Decrypt(ctx, ct, nil, ""); err != nil || string(pt) != "payload" {
		t.Fatalf("decrypt with a decrypt use: %q %v", pt, err)
	}
	_, _, err := dec.Encrypt(ctx, []byte("x"), nil, 0, "")
	refused("encrypt with a decrypt use", err)
	_, _, err = dec.Rewrap(ctx, ct, nil, 0, "", "")
	refused("rewrap with a decrypt use", err)
	_, err = dec.HMAC(ctx, []byte("x"), 0, "sha2-256")
	refused("hmac with a decrypt use", err)
	_, _, _, err = dec.Datakey(ctx, 256, nil, 0, "")
	refused("datakey with a decrypt use", err)

	rewrap := use("k", keys.OpRewrap)
	if _, v, err := rewrap.Rewrap(ctx, ct, nil, 0, "", ""); err != nil || v != 1 {
		t.Fatalf("rewrap with a rewrap use: v%d %v", v, err)
	}

	verify := use("k", keys.OpVerify)
	_, err = verify.HMAC(ctx, []byte("x"), 0, "sha2-256")
	refused("hmac with a verify use", err)
	mac, err := use("k", keys.OpHMAC).HMAC(ctx, []byte("x"), 0, "sha2-256")
	if err != nil {
		t.Fatal(err)
	}
	if valid, err := verify.VerifyHMAC(ctx, mac, []byte("x"), "sha2-256"); err != nil || !valid {
		t.Fatalf("verify an HMAC with a verify use: %v %v", valid, err)
	}

	sign := use("s", keys.OpSign)
	_, err = sign.SignCSR(ctx, 0, &x509.CertificateRequest{})
	refused("CSR with a sign use", err)
	if _, err := use("s", keys.OpCSR).SignCSR(ctx, 0, &x509.CertificateRequest{}); err != nil {
		t.Fatalf("CSR with a CSR use: %v", err)
	}
	_, _, err = use("s", keys.OpCSR).Sign(ctx, []byte("x"), 0, keys.SignOptions{})
	refused("sign with a CSR use", err)
}

// A use the door refuses is a 403 with the refusal's message, as Vault answers a denied request; never a 500.
func TestDeniedUseIs403(t *testing.T) {
	denied := fmt.Errorf("encrypt: %w", &keys.DeniedError{Key: "k", Operation: keys.OpEncrypt, Condition: "allowed_cidrs"})
	status, msg := classify(denied)
	if status != http.StatusForbidden || !strings.Contains(msg, `permission denied: encrypt on key "k"`) {
		t.Fatalf("classify: %d %q", status, msg)
	}
	resp, err := respond(denied)
	var coded logical.HTTPCodedError
	if resp != nil || !errors.As(err, &coded) || coded.Code() != http.StatusForbidden {
		t.Fatalf("respond: %v %v", resp, err)
	}
}
