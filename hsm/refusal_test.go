package hsm

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// A batch of refused operations (bad ciphertexts, a PSS salt the token does not take) re-initialises nothing, on
// every token: a module re-initialisation resets the connection of every mount using it. On tpm2-pkcs11, where a
// refusal leaves the key undestroyable until the module is re-initialised, the key still works and is still
// destroyed, at the cost of a bounded number of re-initialisations made by the destruction itself.
func TestRefusalsReinitializeNothing(t *testing.T) {
	onEveryToken(t, 1, func(t *testing.T, tk tokentest.Token, tok *Token) {
		ctx := context.Background()
		caps, err := tok.Capabilities(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ok, missing := caps.Serves(RSA2048); !ok {
			t.Skipf("no RSA-2048 keys: %v", missing)
		}
		id := randomID(t)
		label := "cmk/refusals/k/v1"
		pub, err := tok.GenerateVersion(ctx, RSA2048, id, label, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _, _ = tok.DestroyKeys(ctx, id) })
		digest := sha256.Sum256([]byte("refusals"))

		before := tok.mod.generation.Load()
		const refusals = 40
		for i := 0; i < refusals; i++ {
			bad := make([]byte, 256)
			bad[5], bad[200] = byte(i+1), 7 // below the modulus: the token itself refuses the padding
			if i%2 == 1 {
				for j := range bad {
					bad[j] = 0xff // above the modulus
				}
			}
			// Above the modulus, NSS answers CKR_ARGUMENTS_BAD (a 400 too).
			if _, err := tok.DecryptRSA(ctx, id, crypto.SHA256, bad); !errors.Is(err, ErrInvalidCiphertext) && !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("bad ciphertext %d: %v, want ErrInvalidCiphertext or ErrInvalidArgument", i, err)
			}
		}
		if caps.Offers(pkcs11.CKM_RSA_PKCS_PSS) {
			maxSalt := 256 - 32 - 2 // Transit's default: the largest salt the key allows
			for i := 0; i < 5; i++ {
				_, _ = tok.SignPSS(ctx, id, crypto.SHA256, digest[:], maxSalt)
			}
		}
		if n := tok.mod.generation.Load() - before; n != 0 {
			t.Fatalf("%d refused operations re-initialised the module %d times; want none", refusals, n)
		}
		sig, err := tok.SignPKCS1v15(ctx, id, crypto.SHA256, digest[:])
		if err != nil || rsa.VerifyPKCS1v15(pub.(*rsa.PublicKey), crypto.SHA256, digest[:], sig) != nil {
			t.Fatalf("the key after refusals: %v", err)
		}

		if n, err := tok.DestroyKeys(ctx, id); err != nil || n == 0 {
			t.Fatalf("destroy after refusals: %d objects, %v", n, err)
		}
		if objs, err := tok.ListObjects(ctx, label); err != nil || len(objs) != 0 {
			t.Fatalf("after destruction: %d objects left, %v", len(objs), err)
		}
		// A destruction re-initialises tpm2-pkcs11 once (reinitAfterDestroy), and once more when a refusal's
		// leftover failed it; other modules never.
		want := uint64(0)
		if tok.quirks().reinitAfterDestroy {
			want = 2
		}
		if n := tok.mod.generation.Load() - before; n > want {
			t.Fatalf("the destruction re-initialised the module %d times; want at most %d", n, want)
		}
	})
}
