package cmk

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

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
