//go:build cmkfaults

package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"maps"
	"math/big"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// rawRSAEncrypt is em^e mod n: a ciphertext whose decryption block is em, valid padding or not.
func rawRSAEncrypt(pub *rsa.PublicKey, em []byte) []byte {
	c := new(big.Int).Exp(new(big.Int).SetBytes(em), big.NewInt(int64(pub.E)), pub.N)
	return c.FillBytes(make([]byte, pub.Size()))
}

// badPaddingBlocks are decryption blocks that PKCS#1 v1.5 refuses, one per rule: the first byte, the block type,
// a padding string shorter than 8 bytes, no zero separator.
func badPaddingBlocks(k int) map[string][]byte {
	filled := func(first, second byte) []byte {
		em := make([]byte, k)
		em[0], em[1] = first, second
		for i := 2; i < k; i++ {
			em[i] = byte(i%250) + 1
		}
		return em
	}
	wrongFirst := filled(1, 2) // below any modulus of k bytes, whose top byte is at least 0x80
	wrongFirst[k-6] = 0
	wrongType := filled(0, 1)
	wrongType[k-6] = 0
	shortPS := filled(0, 2)
	shortPS[9] = 0 // 7 padding bytes
	noSeparator := filled(0, 2)
	return map[string][]byte{"first byte 01": wrongFirst, "block type 01": wrongType, "padding string of 7 bytes": shortPS, "no separator": noSeparator}
}

// pkcs1v15UnpadOr agrees with the standard library on every rule of the padding, at its edges: the shortest
// padding string (8 bytes) and one byte shorter, an empty message, the longest message.
func TestPKCS1v15UnpadAgreesWithTheStandardLibrary(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	k := key.Size()
	rejection := []byte("rejected")
	blocks := badPaddingBlocks(k)
	for _, psLen := range []int{8, 9, 100, k - 3} {
		em := make([]byte, k)
		em[1] = 2
		for i := 2; i < 2+psLen; i++ {
			em[i] = byte(i%200) + 1
		}
		for i := 3 + psLen; i < k; i++ {
			em[i] = byte(i) // the message may hold zeros
		}
		blocks[fmt.Sprintf("valid, padding string of %d bytes", psLen)] = em
	}
	for name, em := range blocks {
		ct := rawRSAEncrypt(&key.PublicKey, em)
		want, err := rsa.DecryptPKCS1v15(nil, key, ct)
		if err != nil {
			want = rejection
		}
		if got := pkcs1v15UnpadOr(append([]byte(nil), em...), rejection); !bytes.Equal(got, want) {
			t.Fatalf("%s: %x, the standard library %x (%v)", name, got, want, err)
		}
	}
}

// calls is a copy of the calls f has seen, by function.
func (f *faultyCalls) snapshot() map[string]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.calls)
}

func callsSince(before, after map[string]int) map[string]int {
	d := map[string]int{}
	for fn, n := range after {
		if n != before[fn] {
			d[fn] = n - before[fn]
		}
	}
	return d
}

// Issue 19 item 10: PKCS#1 v1.5 decryption with implicit rejection must cost the token the same for valid and
// invalid padding. Tokens refuse bad padding with codes that also mean faults (SoftHSM CKR_GENERAL_ERROR,
// opencryptoki CKR_FUNCTION_FAILED), which the recovery rules ask again on another session: a second RSA private
// operation and a session closed and opened, seen by timing one request. So the decryption is one raw RSA
// C_Decrypt whatever the padding, and the padding is removed in the plugin.
func TestPKCS1v15DecryptionMakesTheSameCallsWhateverThePadding(t *testing.T) {
	onEveryToken(t, 2, func(t *testing.T, tk tokentest.Token, tok *Token) {
		ctx := context.Background()
		id := randomID(t)
		pub, err := tok.GenerateVersion(ctx, RSA2048, id, "cmk/test/pkcs1v15/v1", 0) // no HMAC secret: tpm2-pkcs11 has none
		if err != nil {
			t.Fatal(err)
		}
		rpub := pub.(*rsa.PublicKey)
		msg := []byte("session key")
		valid, err := rsa.EncryptPKCS1v15(rand.Reader, rpub, msg)
		if err != nil {
			t.Fatal(err)
		}
		rejection := []byte("the synthetic message")
		f := injectFaults(t, tok)
		decrypt := func(ct []byte) ([]byte, map[string]int) {
			t.Helper()
			before := f.snapshot()
			pt, err := decryptPKCS1v15ForTest(ctx, tok, id, ct, rejection)
			if err != nil {
				t.Fatalf("decrypt: %v", err)
			}
			return pt, callsSince(before, f.snapshot())
		}
		decrypt(valid) // the key's handle is looked up and cached once
		pt, want := decrypt(valid)
		if !bytes.Equal(pt, msg) {
			t.Fatalf("valid padding decrypts to %q", pt)
		}
		if want["Decrypt"] != 1 || want["DecryptInit"] != 1 {
			t.Fatalf("valid padding: calls %v, want one C_DecryptInit and one C_Decrypt", want)
		}
		for name, em := range badPaddingBlocks(rpub.Size()) {
			pt, got := decrypt(rawRSAEncrypt(rpub, em))
			if !bytes.Equal(pt, rejection) {
				t.Fatalf("%s: decrypts to %q, not the rejection message", name, pt)
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("%s on %s: calls %v, valid padding made %v", name, tk.Kind, got, want)
			}
		}
	})
}

// decryptPKCS1v15ForTest is the implicit-rejection decryption as the engine makes it.
func decryptPKCS1v15ForTest(ctx context.Context, tok *Token, id, ct, rejection []byte) ([]byte, error) {
	return tok.DecryptPKCS1v15(ctx, id, ct, rejection)
}

// A key whose allowed mechanisms lack raw RSA (made, on a token that stores them, before raw RSA was listed
// wherever the token offers it) cannot decrypt PKCS#1 v1.5: the token refuses the mechanism at C_DecryptInit,
// before it sees the ciphertext, and the error says so (ErrMechanismUnsupported) for valid and invalid padding.
func TestPKCS1v15DecryptionWithoutRawRSAOnTheKey(t *testing.T) {
	tok, _ := newToken(t, 1)
	ctx := context.Background()
	caps, err := tok.Capabilities(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !caps.AllowedMechanisms {
		t.Fatal("SoftHSM stores CKA_ALLOWED_MECHANISMS: the test needs it")
	}
	id := randomID(t)
	var rpub *rsa.PublicKey
	err = tok.generatePairWith(ctx, caps, "C_GenerateKeyPair without raw RSA", id, false,
		func(o templateOptions) (uint, []*pkcs11.Attribute, []*pkcs11.Attribute) {
			pubT, privT := rsaKeyTemplates(o, false, 2048, id, "cmk/test/no-raw-rsa/v1")
			return pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, pubT, privT
		},
		func(c pkcs11API, s session, pubH, _ pkcs11.ObjectHandle) error {
			pub, err := readPublicKey(c, s.h, pubH, RSA2048)
			rpub, _ = pub.(*rsa.PublicKey)
			return err
		})
	if err != nil {
		t.Fatal(err)
	}
	valid, err := rsa.EncryptPKCS1v15(rand.Reader, rpub, []byte("m"))
	if err != nil {
		t.Fatal(err)
	}
	for name, ct := range map[string][]byte{"valid": valid, "invalid": rawRSAEncrypt(rpub, badPaddingBlocks(rpub.Size())["no separator"])} {
		if _, err := tok.DecryptPKCS1v15(ctx, id, ct, []byte("rejected")); !errors.Is(err, ErrMechanismUnsupported) {
			t.Fatalf("%s padding with a key that does not allow raw RSA: %v", name, err)
		}
	}
}
