package cmk

import (
	"context"
	"crypto"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// Concurrent encrypts, decrypts and rotations (Transit's TestPolicyFuzzing pattern): every ciphertext decrypts,
// versions are contiguous.
func TestConcurrentUseAndRotation(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 40; i++ {
				if g == 0 && i%8 == 0 {
					if _, err := e.write("keys/k/rotate", nil); err != nil {
						errs <- err
						return
					}
				}
				msg := fmt.Sprintf("%d/%d", g, i)
				resp, err := e.write("encrypt/k", map[string]interface{}{"plaintext": b64(msg)})
				if err != nil {
					errs <- err
					return
				}
				resp, err = e.write("decrypt/k", map[string]interface{}{"ciphertext": resp.Data["ciphertext"]})
				if err != nil || resp.Data["plaintext"] != b64(msg) {
					errs <- fmt.Errorf("round trip %s: %v", msg, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	p, _ := keys.Load(context.Background(), e.storage, "k")
	for v := 1; v <= p.LatestVersion; v++ {
		if p.Versions[v] == nil {
			t.Fatalf("version %d missing of %d", v, p.LatestVersion)
		}
	}
	if p.LatestVersion != 6 || len(e.tokenObjects()) != 6 {
		t.Fatalf("latest %d, %d objects", p.LatestVersion, len(e.tokenObjects()))
	}
}

// Vault retries a request once, unchanged, when the plugin process dies under it: a retried rotation or import
// that had completed adds no second version, and repeating a state change answers with the state.
func TestRetriedRequestsChangeNothingTwice(t *testing.T) {
	e := newImportBackend(t)
	e.ok(e.write("keys/k", nil))
	retry := func(path string, data map[string]interface{}) {
		t.Helper()
		for i := 0; i < 2; i++ {
			e.ok(e.b.HandleRequest(context.Background(), &logical.Request{
				ID: "req-" + path, Operation: logical.UpdateOperation, Path: path, Data: data, Storage: e.storage,
			}))
		}
	}
	retry("keys/k/rotate", nil)
	if r := e.ok(e.read("keys/k")); r.Data["latest_version"] != 2 {
		t.Fatalf("a retried rotation made version %v", r.Data["latest_version"])
	}
	e.ok(e.write("keys/k/rotate", nil)) // another request rotates again
	if r := e.ok(e.read("keys/k")); r.Data["latest_version"] != 3 {
		t.Fatalf("a new request did not rotate: %v", r.Data["latest_version"])
	}
	material := make([]byte, 32)
	retry("keys/imp/import", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, material)})
	retry("keys/imp/import_version", map[string]interface{}{"ciphertext": wrapFor(t, e, crypto.SHA256, material)})
	if r := e.ok(e.read("keys/imp")); r.Data["latest_version"] != 2 {
		t.Fatalf("retried imports made version %v", r.Data["latest_version"])
	}
	e.ok(e.write("config/keys", map[string]interface{}{"deletion_grace_period": "1h"}))
	retry("keys/k/versions/1/destroy", nil)
	retry("keys/k/versions/2/disable", nil)
	if s := e.ok(e.read("keys/k/versions/1")).Data["state"]; s != "destroy_scheduled" {
		t.Fatalf("state %v", s)
	}
	n := 0
	for _, o := range e.tokenObjects() {
		if strings.Contains(o.Label, "/imp/") {
			n++
		}
	}
	if n != 4 { // two versions × (AES + HMAC): no orphan of the retried imports
		t.Fatalf("%d objects for the imported key", n)
	}
}

func TestRotateAndVersionBounds(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	ct1 := encryptOK(t, e, "k", "one")
	resp := e.ok(e.write("keys/k/rotate", nil))
	if resp.Data["latest_version"] != 2 {
		t.Fatalf("rotate: %v", resp.Data)
	}
	e.ok(e.write("keys/k/rotate", nil))
	ct3 := encryptOK(t, e, "k", "three")
	if !strings.HasPrefix(ct3, "vault:v3:") {
		t.Fatalf("new encryptions use the latest version: %s", ct3)
	}
	if decryptOK(t, e, "k", ct1) != "one" {
		t.Fatal("old version no longer decrypts after rotation")
	}

	bad := []struct {
		name string
		data map[string]interface{}
	}{
		{"min_decryption above latest", map[string]interface{}{"min_decryption_version": 4}},
		{"min_encryption above latest", map[string]interface{}{"min_encryption_version": 4}},
		{"min_encryption below min_decryption", map[string]interface{}{"min_decryption_version": 3, "min_encryption_version": 2}},
		{"exportable", map[string]interface{}{"exportable": true}},
	}
	for _, c := range bad {
		if got := status(e.write("keys/k/config", c.data)); got != 400 {
			t.Errorf("%s: status %d", c.name, got)
		}
	}
	resp = e.ok(e.write("keys/k/config", map[string]interface{}{"min_decryption_version": 2, "min_encryption_version": 3}))
	vs := resp.Data["versions"].(map[string]interface{})
	states := []string{vs["1"].(map[string]interface{})["state"].(string), vs["2"].(map[string]interface{})["state"].(string), vs["3"].(map[string]interface{})["state"].(string)}
	if strings.Join(states, ",") != "disabled,decrypt_only,active" {
		t.Fatalf("states: %v", states)
	}
	resp, err := e.write("decrypt/k", map[string]interface{}{"ciphertext": ct1})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "min_decryption_version") {
		t.Fatalf("decrypt below min_decryption_version: %d %s", status(resp, err), respText(resp))
	}
	resp, err = e.write("encrypt/k", map[string]interface{}{"plaintext": b64("x"), "key_version": 2})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "min_encryption_version") {
		t.Fatalf("encrypt below min_encryption_version: %d %s", status(resp, err), respText(resp))
	}
	if got := status(e.write("keys/missing/rotate", nil)); got != 400 {
		t.Fatalf("rotate unknown key: %d", got)
	}
}

// A failed storage write leaves neither a new version in memory nor an orphan object on the token.
func TestRotateWithFailingStorage(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	before := len(e.tokenObjects())
	e.inmem.Underlying().FailPut(true)
	resp, err := e.write("keys/k/rotate", nil)
	e.inmem.Underlying().FailPut(false)
	if err == nil && !resp.IsError() {
		t.Fatal("rotate succeeded with failing storage")
	}
	if resp := e.ok(e.read("keys/k")); resp.Data["latest_version"] != 1 {
		t.Fatalf("in-memory key changed by a failed rotation: %v", resp.Data["latest_version"])
	}
	if after := len(e.tokenObjects()); after != before {
		t.Fatalf("token objects %d → %d after a failed rotation", before, after)
	}
	e.ok(e.write("keys/k/rotate", nil))
	if resp := e.ok(e.read("keys/k")); resp.Data["latest_version"] != 2 {
		t.Fatalf("rotation after recovery: %v", resp.Data["latest_version"])
	}
}

// Defect a: a rotation whose key write reports an error after it was stored used to destroy the new version's
// objects, so every later encryption under the stored version failed (500). Now nothing is destroyed: the request
// fails, the next read sees what storage holds, encryption and decryption work, and the WAL rollback (which reads
// storage first) keeps the version's objects.
func TestRotationWhoseWriteFailedAfterStoring(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.storage.failAfterStoring(keys.PolicyPrefix + "k")
	if resp, err := e.write("keys/k/rotate", nil); err == nil && (resp == nil || !resp.IsError()) {
		t.Fatal("the failed write was not reported")
	}
	if r := e.ok(e.read("keys/k")); r.Data["latest_version"] != 2 {
		t.Fatalf("storage holds version 2; the key reads %v", r.Data["latest_version"])
	}
	ct := encryptOK(t, e, "k", "after the failed write")
	if !strings.HasPrefix(ct, "vault:v2:") || decryptOK(t, e, "k", ct) != "after the failed write" {
		t.Fatalf("encrypt under the stored version: %s", ct)
	}
	resp, err := e.b.HandleRequest(context.Background(), &logical.Request{
		Operation: logical.RollbackOperation, Storage: e.storage, Data: map[string]interface{}{"immediate": true},
	})
	if err != nil || (resp != nil && resp.IsError()) {
		t.Fatalf("rollback: %v", err)
	}
	if decryptOK(t, e, "k", ct) != "after the failed write" {
		t.Fatal("the rollback destroyed a stored version")
	}
}
