//go:build cmkfaults

package hsm

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// One key's objects are found by their labels without visiting the token's other objects, on every token that
// searches by CKA_LABEL.
func TestObjectsLabelledVisitsNoOtherObject(t *testing.T) {
	onEveryToken(t, 2, func(t *testing.T, tk tokentest.Token, tok *Token) {
		ctx := context.Background()
		caps, err := tok.Capabilities(ctx)
		if err != nil {
			t.Fatal(err)
		}
		alg, hmacBytes := AES256, 0
		if ok, _ := caps.Serves(alg); !ok {
			alg, hmacBytes = HMACOnly, 64 // opencryptoki has no AES-GCM
		}
		if ok, _ := caps.Serves(alg); !ok {
			alg, hmacBytes = ECDSAP256, 0 // tpm2-pkcs11 holds no secret keys
		}
		const others = 12 // tpm2-pkcs11 runs out of object contexts after about 14 key pairs
		for i := 0; i < others; i++ {
			id := randomID(t)
			if _, err := tok.GenerateVersion(ctx, alg, id, fmt.Sprintf("cmk/scan-other/k%d/v1", i), hmacBytes); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _, _ = tok.DestroyKeys(context.Background(), id) })
		}
		id := randomID(t)
		label := "cmk/scan/k/v1"
		if _, err := tok.GenerateVersion(ctx, alg, id, label, hmacBytes); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _, _ = tok.DestroyKeys(context.Background(), id) })
		if bySearch, err := tok.labelSearch(ctx); err != nil || !bySearch {
			t.Skipf("the token does not search by CKA_LABEL (%v): its labels are read one by one", err)
		}

		f := injectFaults(t, tok)
		objs, err := tok.ObjectsLabelled(ctx, []string{label, label + "/hmac", "cmk/scan/k/v2", "cmk/scan/k/v2/hmac"})
		if err != nil {
			t.Fatal(err)
		}
		if len(objs) == 0 || len(objs) > 2 {
			t.Fatalf("found %d objects under the key's labels: %+v", len(objs), objs)
		}
		if visited := f.count("FindObjects objects"); visited > len(objs) {
			t.Fatalf("finding the key's %d objects visited %d objects on a token holding %d others", len(objs), visited, others)
		}
	})
}

// A whole-token scan holds none of the data plane's sessions: with the scan paused inside its own session (in
// C_FindObjectsInit), an encryption on a pool of one session goes through.
func TestScanHoldsNoPooledSession(t *testing.T) {
	tok, _ := newToken(t, 1)
	ctx := context.Background()
	id := newVersion(t, tok, 256)
	nonce := make([]byte, GCMNonceSize)
	if _, _, err := tok.EncryptGCM(ctx, id, nonce, nil, []byte("handle cached")); err != nil {
		t.Fatal(err)
	}
	f := injectFaults(t, tok)
	release := f.hold("FindObjectsInit")
	scanned := make(chan error, 1)
	go func() {
		_, err := tok.ListObjects(ctx, "cmk/")
		scanned <- err
	}()
	for f.waiting("FindObjectsInit") == 0 {
		select {
		case err := <-scanned:
			t.Fatalf("the scan ended without reaching its search: %v", err)
		case <-time.After(time.Millisecond):
		}
	}
	// A guard against a hang on the old code, not a timing: the encryption needs no wait at all.
	guard, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, _, err := tok.EncryptGCM(guard, id, nonce, []byte("aad"), []byte("while the token is scanned"))
	release()
	if err != nil {
		t.Fatalf("an encryption during a whole-token scan: %v", err)
	}
	if err := <-scanned; err != nil {
		t.Fatal(err)
	}
}
