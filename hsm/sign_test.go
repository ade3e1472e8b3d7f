package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"math/big"
	"strings"
	"testing"
)

func generate(t *testing.T, tok *Token, alg Algorithm) ([]byte, crypto.PublicKey) {
	t.Helper()
	id := randomID(t)
	pub, err := tok.GenerateVersion(context.Background(), alg, id, "cmk/test/"+string(alg)+"/v1", HMACKeySize)
	if err != nil {
		t.Fatalf("generate %s: %v", alg, err)
	}
	return id, pub
}

// Signatures made in the HSM verify with Go's standard library and the public key alone.
func TestSignaturesVerifyWithTheStandardLibrary(t *testing.T) {
	tok, _ := newToken(t, 2)
	ctx := context.Background()
	msg := []byte("message to sign")
	digest := sha256.Sum256(msg)

	for _, alg := range []Algorithm{RSA2048, RSA3072} {
		id, pub := generate(t, tok, alg)
		rpub := pub.(*rsa.PublicKey)
		if rpub.N.BitLen() != alg.rsaBits() || rpub.E != 65537 {
			t.Fatalf("%s public key: %d bits, e=%d", alg, rpub.N.BitLen(), rpub.E)
		}
		sig, err := tok.SignPKCS1v15(ctx, id, crypto.SHA256, digest[:])
		if err != nil {
			t.Fatal(err)
		}
		if err := rsa.VerifyPKCS1v15(rpub, crypto.SHA256, digest[:], sig); err != nil {
			t.Fatalf("%s PKCS#1 v1.5: %v", alg, err)
		}
		for _, salt := range []int{32, rpub.Size() - 32 - 2} {
			sig, err := tok.SignPSS(ctx, id, crypto.SHA256, digest[:], salt)
			if err != nil {
				t.Fatal(err)
			}
			if err := rsa.VerifyPSS(rpub, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: salt}); err != nil {
				t.Fatalf("%s PSS salt %d: %v", alg, salt, err)
			}
		}
	}
	for _, alg := range []Algorithm{ECDSAP256, ECDSAP384, ECDSAP521} {
		id, pub := generate(t, tok, alg)
		epub := pub.(*ecdsa.PublicKey)
		sig, err := tok.SignECDSA(ctx, id, digest[:])
		if err != nil {
			t.Fatal(err)
		}
		size := (epub.Curve.Params().BitSize + 7) / 8
		if len(sig) != 2*size {
			t.Fatalf("%s signature of %d bytes", alg, len(sig))
		}
		r, s := new(big.Int).SetBytes(sig[:size]), new(big.Int).SetBytes(sig[size:])
		if !ecdsa.Verify(epub, digest[:], r, s) {
			t.Fatalf("%s signature does not verify", alg)
		}
	}
	id, pub := generate(t, tok, Ed25519)
	sig, err := tok.SignEd25519(ctx, id, msg)
	if err != nil {
		t.Fatal(err)
	}
	if !ed25519.Verify(pub.(ed25519.PublicKey), msg, sig) {
		t.Fatal("Ed25519 signature does not verify")
	}
}

func TestRSADecryptOAEPAndPKCS1(t *testing.T) {
	tok, _ := newToken(t, 1)
	ctx := context.Background()
	id, pub := generate(t, tok, RSA2048)
	rpub := pub.(*rsa.PublicKey)
	msg := []byte("wrapped secret")
	for _, h := range []crypto.Hash{crypto.SHA1, crypto.SHA256, crypto.SHA512} {
		ct, err := rsa.EncryptOAEP(h.New(), rand.Reader, rpub, msg, nil)
		if err != nil {
			t.Fatal(err)
		}
		pt, err := tok.DecryptRSA(ctx, id, h, ct)
		if err != nil || !bytes.Equal(pt, msg) {
			t.Fatalf("OAEP %v: %q %v", h, pt, err)
		}
		ct[len(ct)/2] ^= 1
		if _, err := tok.DecryptRSA(ctx, id, h, ct); !errors.Is(err, ErrInvalidCiphertext) {
			t.Fatalf("tampered OAEP %v: %v", h, err)
		}
	}
	ct, err := rsa.EncryptPKCS1v15(rand.Reader, rpub, msg)
	if err != nil {
		t.Fatal(err)
	}
	if pt, err := tok.DecryptPKCS1v15(ctx, id, ct, []byte("rejected")); err != nil || !bytes.Equal(pt, msg) {
		t.Fatalf("PKCS#1 v1.5: %q %v", pt, err)
	}
}

func TestOAEPUnpadRejectsEveryMalformedBlock(t *testing.T) {
	// Build a valid encoded block with Go's OAEP via a raw RSA round trip on a software key.
	key, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	ct, _ := rsa.EncryptOAEP(sha256.New(), rand.Reader, &key.PublicKey, []byte("hi"), nil)
	em := new(big.Int).Exp(new(big.Int).SetBytes(ct), key.D, key.N).FillBytes(make([]byte, key.Size()))
	if pt, err := oaepUnpad(sha256.New(), append([]byte{}, em...)); err != nil || string(pt) != "hi" {
		t.Fatalf("valid block: %q %v", pt, err)
	}
	for i := range em {
		bad := append([]byte{}, em...)
		bad[i] ^= 0x01
		if pt, err := oaepUnpad(sha256.New(), bad); err == nil && string(pt) == "hi" {
			t.Fatalf("flipped byte %d still unpads", i)
		}
	}
	if _, err := oaepUnpad(sha256.New(), em[:40]); err == nil {
		t.Fatal("short block accepted")
	}
}

func TestHMACInTheHSM(t *testing.T) {
	tok, _ := newToken(t, 1)
	ctx := context.Background()
	a, _ := generate(t, tok, HMACOnly)
	b := newVersion(t, tok, 256) // AES versions carry an HMAC secret too
	for _, h := range []crypto.Hash{crypto.SHA224, crypto.SHA256, crypto.SHA384, crypto.SHA512} {
		m1, err := tok.HMAC(ctx, a, h, []byte("data"))
		if err != nil || len(m1) != h.Size() {
			t.Fatalf("%v: %d bytes, %v", h, len(m1), err)
		}
		m2, _ := tok.HMAC(ctx, a, h, []byte("data"))
		m3, _ := tok.HMAC(ctx, b, h, []byte("data"))
		m4, _ := tok.HMAC(ctx, a, h, []byte("datA"))
		if !bytes.Equal(m1, m2) || bytes.Equal(m1, m3) || bytes.Equal(m1, m4) {
			t.Fatalf("%v: HMAC not a function of key and data", h)
		}
	}
	short := randomID(t)
	if _, err := tok.GenerateVersion(ctx, HMACOnly, short, "cmk/test/short/v1", 32); err != nil {
		t.Fatal(err)
	}
	if _, err := tok.HMAC(ctx, short, crypto.SHA512, []byte("data")); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("32-byte key with SHA-512: %v", err)
	}
}

func TestKeyPairObjectsAreProtected(t *testing.T) {
	tok, _ := newToken(t, 1)
	for _, alg := range []Algorithm{RSA2048, ECDSAP256, Ed25519, HMACOnly} {
		generate(t, tok, alg)
	}
	objs, err := tok.ListObjects(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	// Private keys and HMAC secrets, and Ed25519's public half, verify-only (see generatePair); the other public
	// halves are not kept on the token.
	if len(objs) != 8 {
		t.Fatalf("%d objects, want 8", len(objs))
	}
	wantUsage := map[string]string{"rsa": "decrypt,sign", "ec": "sign", "ec_edwards": "sign", "generic_secret": "sign,verify"}
	for _, o := range objs {
		if o.Class == "public_key" {
			if o.KeyType != "ec_edwards" || strings.Join(o.Usage, ",") != "verify" || o.Modifiable || !o.Token {
				t.Errorf("public half kept: %+v", o)
			}
			continue
		}
		if !o.Token || !o.Private || !o.Sensitive || !o.AlwaysSensitive || o.Extractable || !o.NeverExtractable || o.Modifiable {
			t.Errorf("%s: %+v", o.Label, o)
		}
		if got := strings.Join(o.Usage, ","); got != wantUsage[o.KeyType] {
			t.Errorf("%s (%s): usage %s, want %s", o.Label, o.KeyType, got, wantUsage[o.KeyType])
		}
	}
}
