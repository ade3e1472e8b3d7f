package cmk

import (
	"encoding/base64"
	"fmt"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

func TestEncryptDecryptRoundTrip(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k256", nil))
	e.ok(e.write("keys/k128", map[string]interface{}{"type": "aes128-gcm96"}))
	for _, key := range []string{"k256", "k128"} {
		for _, pt := range []string{"", "hello", strings.Repeat("long ", 50000)} {
			t.Run(fmt.Sprintf("%s/%d", key, len(pt)), func(t *testing.T) {
				ct := encryptOK(t, e, key, pt)
				raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(ct, "vault:v1:"))
				if err != nil || len(raw) != 12+len(pt)+16 {
					t.Fatalf("ciphertext layout: %s (%d bytes, err %v)", ct[:20], len(raw), err)
				}
				if got := decryptOK(t, e, key, ct); got != pt {
					t.Fatalf("round trip gave %q", got)
				}
			})
		}
	}
	// Two encryptions of one plaintext differ (random nonces).
	first, second := encryptOK(t, e, "k256", "same"), encryptOK(t, e, "k256", "same")
	if first == second {
		t.Fatal("identical ciphertexts for one plaintext")
	}
}

func TestAssociatedData(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	aad := b64("tenant=42")
	resp := e.ok(e.write("encrypt/k", map[string]interface{}{"plaintext": b64("secret"), "associated_data": aad}))
	ct := resp.Data["ciphertext"].(string)
	resp = e.ok(e.write("decrypt/k", map[string]interface{}{"ciphertext": ct, "associated_data": aad}))
	if resp.Data["plaintext"] != b64("secret") {
		t.Fatalf("decrypt with aad: %v", resp.Data)
	}
	for _, bad := range []map[string]interface{}{
		{"ciphertext": ct},
		{"ciphertext": ct, "associated_data": b64("tenant=43")},
	} {
		resp, err := e.write("decrypt/k", bad)
		if status(resp, err) != 400 || !strings.Contains(respText(resp), "tampered") {
			t.Fatalf("wrong associated data: %d %s", status(resp, err), respText(resp))
		}
	}
	// Rewrap keeps the associated data binding.
	e.ok(e.write("keys/k/rotate", nil))
	resp = e.ok(e.write("rewrap/k", map[string]interface{}{"ciphertext": ct, "associated_data": aad}))
	if resp.Data["key_version"] != 2 {
		t.Fatalf("rewrap: %v", resp.Data)
	}
	resp = e.ok(e.write("decrypt/k", map[string]interface{}{"ciphertext": resp.Data["ciphertext"], "associated_data": aad}))
	if resp.Data["plaintext"] != b64("secret") {
		t.Fatal("rewrapped ciphertext does not decrypt to the original")
	}
}

func TestUpsert(t *testing.T) {
	e := newTestBackend(t)
	resp := e.ok(e.request(logical.CreateOperation, "encrypt/new", map[string]interface{}{"plaintext": b64("x"), "type": "aes128-gcm96"}))
	if resp.Data["key_version"] != 1 {
		t.Fatalf("upsert encrypt: %v", resp.Data)
	}
	if r := e.ok(e.read("keys/new")); r.Data["type"] != "aes128-gcm96" {
		t.Fatalf("upserted key: %v", r.Data)
	}
	e.ok(e.write("config/keys", map[string]interface{}{"disable_upsert": true}))
	resp, err := e.request(logical.CreateOperation, "encrypt/other", map[string]interface{}{"plaintext": b64("x")})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "not found") {
		t.Fatalf("upsert disabled: %d %s", status(resp, err), respText(resp))
	}
	// Without create capability Vault sends update: a missing key is then simply not found.
	resp, err = e.write("encrypt/third", map[string]interface{}{"plaintext": b64("x")})
	if status(resp, err) != 400 {
		t.Fatalf("update on missing key: %d", status(resp, err))
	}
}

func TestUsageLimitRotates(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", map[string]interface{}{"max_encryptions_per_version": 10}))
	for i := 1; i <= 10; i++ {
		if ct := encryptOK(t, e, "k", "x"); !strings.HasPrefix(ct, "vault:v1:") {
			t.Fatalf("encryption %d used %s", i, ct[:9])
		}
	}
	if ct := encryptOK(t, e, "k", "x"); !strings.HasPrefix(ct, "vault:v2:") {
		t.Fatalf("the 11th encryption used %s", ct[:9])
	}
	ev := lastEvent(e.history("k"))
	if ev["event"] != "rotated" || ev["cause"] != "usage" || ev["version"] != 2 || ev["display_name"] != "token-test" {
		t.Fatalf("history: %v", ev)
	}
	v1 := e.ok(e.read("keys/k/versions/1")).Data
	if v1["encryptions"] != uint64(10) {
		t.Fatalf("version 1 counted %v", v1["encryptions"])
	}
	// Batch items count one each.
	in := make([]interface{}, 25)
	for i := range in {
		in[i] = map[string]interface{}{"plaintext": b64("x")}
	}
	resp := e.ok(e.write("encrypt/k", map[string]interface{}{"batch_input": in}))
	perVersion := map[int]int{}
	for _, r := range batchResults(t, resp) {
		perVersion[r.KeyVersion]++
	}
	if perVersion[2] != 9 || perVersion[3] != 10 || perVersion[4] != 6 {
		t.Fatalf("batch spread over versions: %v", perVersion)
	}
	// An explicitly requested exhausted version is refused.
	resp, err := e.write("encrypt/k", map[string]interface{}{"plaintext": b64("x"), "key_version": 1})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "encryption limit") {
		t.Fatalf("exhausted version: %d %s", status(resp, err), respText(resp))
	}
}

// Counts are reserved ahead of use, a block at a time: after a restart a version resumes at least where it was,
// and at most a block further.
func TestUsageSurvivesRestart(t *testing.T) {
	e := newTestBackend(t)
	const limit, before, block = 100, 4, 16
	e.ok(e.write("keys/k", map[string]interface{}{"max_encryptions_per_version": limit}))
	for i := 0; i < before; i++ {
		encryptOK(t, e, "k", "x")
	}
	again := e.reopen()
	again.ok(again.write("config/hsm", map[string]interface{}{"token_label": e.label, "pin": testPIN}))
	after := 0
	for ; after <= limit; after++ {
		if ct := encryptOK(t, again, "k", "x"); !strings.HasPrefix(ct, "vault:v1:") {
			break
		}
	}
	if after > limit-before || after < limit-before-block {
		t.Fatalf("after a restart version 1 made %d more encryptions; %d of its %d were made before, reserved %d at a time", after, before, limit, block)
	}
	// The default limit is the GCM nonce bound.
	if r := e.ok(e.write("keys/big", nil)); r.Data["max_encryptions_per_version"] != uint64(1)<<32 {
		t.Fatalf("default limit %v", r.Data["max_encryptions_per_version"])
	}
}

// Defect d: one batch may cross several usage rotations. With two encryptions per version, a batch of seven
// returns seven ciphertexts over four versions, none failing, and each decrypts.
func TestBatchCrossesSeveralUsageRotations(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", map[string]interface{}{"max_encryptions_per_version": 2}))
	items := make([]interface{}, 7)
	for i := range items {
		items[i] = map[string]interface{}{"plaintext": b64(fmt.Sprint("item ", i))}
	}
	resp := e.ok(e.write("encrypt/k", map[string]interface{}{"batch_input": items}))
	versions := map[int]int{}
	for i, r := range batchResults(t, resp) {
		if r.Error != "" {
			t.Fatalf("item %d: %s", i, r.Error)
		}
		versions[r.KeyVersion]++
		if decryptOK(t, e, "k", r.Ciphertext) != fmt.Sprint("item ", i) {
			t.Fatalf("item %d does not decrypt", i)
		}
	}
	if len(versions) != 4 || versions[1] != 2 || versions[4] != 1 {
		t.Fatalf("ciphertexts by version %v, want 2, 2, 2, 1 over versions 1 to 4", versions)
	}
}

// Issue 19 item 8: upsert makes only the types encrypt's type field lists (AES); anyone with create on encrypt/*
// must not tie up the token with RSA-4096 generations.
func TestUpsertMakesOnlyAESTypes(t *testing.T) {
	e := newTestBackend(t)
	for _, typ := range []string{"rsa-4096", "rsa-2048", "ecdsa-p256", "hmac"} {
		resp, err := e.request(logical.CreateOperation, "encrypt/up-"+typ, map[string]interface{}{"plaintext": b64("x"), "type": typ})
		if status(resp, err) != 400 || !strings.Contains(respText(resp), "aes256-gcm96, aes128-gcm96") {
			t.Fatalf("upsert of %s: %d %s", typ, status(resp, err), respText(resp))
		}
		if r, _ := e.read("keys/up-" + typ); r != nil {
			t.Fatalf("upsert of %s created the key: %v", typ, r.Data)
		}
	}
	if len(e.tokenObjects()) != 0 {
		t.Fatalf("refused upserts left objects on the token: %v", e.tokenObjects())
	}
}
