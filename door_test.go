package cmk

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
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

		// A signature is verified with the public key: no material, no condition.
		{logical.UpdateOperation, "verify/s", map[string]interface{}{"input": b64("door"), "signature": sig}, false},
		{logical.ReadOperation, "config/hsm", nil, false},
		{logical.UpdateOperation, "config/hsm", map[string]interface{}{"pool_size": 2}, false},
		{logical.CreateOperation, "config/hsm", map[string]interface{}{"pool_size": 2}, false},
		{logical.ReadOperation, "config/keys", nil, false},
		{logical.UpdateOperation, "config/keys", map[string]interface{}{"max_batch_size": 500}, false},
		{logical.ReadOperation, "cache-config", nil, false},
		{logical.UpdateOperation, "cache-config", map[string]interface{}{"size": 0}, false},
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
		switch {
		case c.material && (got != 403 || !strings.Contains(fmt.Sprint(err, respText(resp)), "allowed_cidrs")):
			t.Errorf("%s %s uses key material and passed the door: %d %v %s", c.op, c.path, got, err, respText(resp))
		case !c.material && got == 403:
			t.Errorf("%s %s uses no key material and was refused by the key's conditions: %v %s", c.op, c.path, err, respText(resp))
		}
	}
}

// patternOwns says whether a backend path's pattern matches path, whole.
func patternOwns(pattern, path string) bool {
	re, err := regexp.Compile("^" + strings.TrimSuffix(strings.TrimPrefix(pattern, "^"), "$") + "$")
	return err == nil && re.MatchString(path)
}
