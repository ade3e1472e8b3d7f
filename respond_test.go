package cmk

import (
	"context"
	"crypto"
	"encoding/base64"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// TestBadInputIsA400 covers every caller mistake of the foundation issue: a 400 naming the problem.
func TestBadInputIsA400(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/other", nil))
	ct := encryptOK(t, e, "k", "payload")
	foreign := encryptOK(t, e, "other", "payload")
	raw, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(ct, "vault:v1:"))
	raw[len(raw)-1] ^= 0x80
	tampered := "vault:v1:" + base64.StdEncoding.EncodeToString(raw)
	short := "vault:v1:" + base64.StdEncoding.EncodeToString(raw[:20])

	cases := []struct {
		name, path string
		data       map[string]interface{}
		want       string
	}{
		{"bad plaintext base64", "encrypt/k", map[string]interface{}{"plaintext": "not base64!"}, "base64"},
		{"missing plaintext", "encrypt/k", map[string]interface{}{}, "missing plaintext"},
		{"bad aad base64", "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "associated_data": "%%"}, "associated_data"},
		{"version above latest", "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "key_version": 2}, "invalid key version"},
		{"negative version", "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "key_version": -1}, "invalid key version"},
		{"context (derivation)", "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "context": b64("c")}, "derivation"},
		{"nonce (convergent)", "encrypt/k", map[string]interface{}{"plaintext": b64("x"), "nonce": b64("123456789012")}, "convergent"},
		{"unknown key", "decrypt/nope", map[string]interface{}{"ciphertext": ct}, `encryption key "nope" not found`},
		{"missing ciphertext", "decrypt/k", map[string]interface{}{}, "missing ciphertext"},
		{"no prefix", "decrypt/k", map[string]interface{}{"ciphertext": "abc"}, "prefix"},
		{"version 0", "decrypt/k", map[string]interface{}{"ciphertext": "vault:v0:" + base64.StdEncoding.EncodeToString(raw)}, "version"},
		{"version above latest", "decrypt/k", map[string]interface{}{"ciphertext": "vault:v9:" + base64.StdEncoding.EncodeToString(raw)}, "does not exist"},
		{"bad ciphertext base64", "decrypt/k", map[string]interface{}{"ciphertext": "vault:v1:!!!"}, "invalid ciphertext"},
		{"too short", "decrypt/k", map[string]interface{}{"ciphertext": short}, "too short"},
		{"tampered", "decrypt/k", map[string]interface{}{"ciphertext": tampered}, "tampered"},
		{"foreign key", "decrypt/k", map[string]interface{}{"ciphertext": foreign}, "tampered"},
		{"rewrap tampered", "rewrap/k", map[string]interface{}{"ciphertext": tampered}, "tampered"},
		{"empty batch", "encrypt/k", map[string]interface{}{"batch_input": []interface{}{}}, "missing batch input"},
		{"batch not a list", "encrypt/k", map[string]interface{}{"batch_input": "x"}, "must be a list"},
		{"datakey bad form", "datakey/raw/k", map[string]interface{}{}, "plaintext"},
		{"datakey bad bits", "datakey/plaintext/k", map[string]interface{}{"bits": 100}, "bits"},
		{"random too many", "random", map[string]interface{}{"bytes": randomMaxBytes + 1}, "bytes"},
		{"random bad url", "random/abc/xyz", map[string]interface{}{}, "byte count"},
		{"random bad source", "random/dice/12", map[string]interface{}{}, "entropy source"},
		{"hash bad algorithm", "hash/md5", map[string]interface{}{"input": b64("x")}, "unsupported algorithm"},
		{"hash bad input", "hash", map[string]interface{}{"input": "??"}, "base64"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, err := e.write(c.path, c.data)
			if got := status(resp, err); got != 400 {
				t.Fatalf("status %d, want 400 (%v %s)", got, err, respText(resp))
			}
			if !strings.Contains(respText(resp), c.want) {
				t.Fatalf("%s does not mention %q", respText(resp), c.want)
			}
		})
	}
}

// faultyToken wraps the real token and fails chosen calls, as a broken HSM would.
type faultyToken struct {
	hsmToken
	mu   sync.Mutex
	fail error
}

func (f *faultyToken) set(err error) {
	f.mu.Lock()
	f.fail = err
	f.mu.Unlock()
}

func (f *faultyToken) err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fail
}

func (f *faultyToken) EncryptGCM(ctx context.Context, id, nonce, aad, pt []byte) ([]byte, []byte, error) {
	if err := f.err(); err != nil {
		return nil, nil, err
	}
	return f.hsmToken.EncryptGCM(ctx, id, nonce, aad, pt)
}

func (f *faultyToken) DecryptGCM(ctx context.Context, id, nonce, aad, ct []byte) ([]byte, error) {
	if err := f.err(); err != nil {
		return nil, err
	}
	return f.hsmToken.DecryptGCM(ctx, id, nonce, aad, ct)
}

func (f *faultyToken) GenerateVersion(ctx context.Context, alg hsm.Algorithm, id []byte, label string, hmacBytes int) (crypto.PublicKey, error) {
	if err := f.err(); err != nil {
		return nil, err
	}
	return f.hsmToken.GenerateVersion(ctx, alg, id, label, hmacBytes)
}

func TestUnavailableHSMIs503AndRecovers(t *testing.T) {
	e := newUnconfiguredBackend(t)
	faulty := &faultyToken{}
	e.b.openToken = func(c hsm.Config, l hclog.Logger) (hsmToken, error) {
		tok, err := hsm.Open(c, l)
		if err != nil {
			return nil, err
		}
		faulty.hsmToken = tok
		return faulty, nil
	}
	e.label = "fault-test"
	if err := softhsm.CreateToken(e.label, testPIN); err != nil {
		t.Fatal(err)
	}
	e.ok(e.write("config/hsm", map[string]interface{}{"token_label": e.label, "pin": testPIN, "iv_source": "os"}))
	e.ok(e.write("keys/k", nil))
	ct := encryptOK(t, e, "k", "x")

	faulty.set(fmt.Errorf("C_Encrypt: %w: CKR_DEVICE_REMOVED", hsm.ErrUnavailable))
	resp, err := e.write("encrypt/k", map[string]interface{}{"plaintext": b64("x")})
	if got := status(resp, err); got != 503 || !strings.Contains(err.Error(), "HSM unavailable") {
		t.Fatalf("single encrypt with the HSM gone: %d %v", got, err)
	}
	resp, err = e.write("decrypt/k", map[string]interface{}{"batch_input": []interface{}{map[string]interface{}{"ciphertext": ct}}})
	if got := status(resp, err); got != 503 {
		t.Fatalf("batch decrypt with the HSM gone: %d", got)
	}
	if got := status(e.write("keys/k/rotate", nil)); got != 503 {
		t.Fatalf("rotate with the HSM gone: %d", got)
	}
	faulty.set(nil)
	if decryptOK(t, e, "k", ct) != "x" {
		t.Fatal("no recovery")
	}
	if r := e.ok(e.read("keys/k")); r.Data["latest_version"] != 1 {
		t.Fatalf("failed rotation left a version: %v", r.Data["latest_version"])
	}
}
