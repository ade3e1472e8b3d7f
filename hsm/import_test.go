package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/byoktest"
)

func importKey(t *testing.T, tok *Token, wrappingID []byte, wrapping *rsa.PublicKey, alg Algorithm, h crypto.Hash, material []byte) ([]byte, crypto.PublicKey, string, error) {
	t.Helper()
	wrapped, err := byoktest.Wrap(wrapping, h, material)
	if err != nil {
		t.Fatal(err)
	}
	id := randomID(t)
	pub, method, err := tok.ImportVersion(context.Background(), ImportRequest{
		Algorithm: alg, WrappingID: wrappingID, OAEPHash: h, WrappedKey: wrapped,
		KeyWrapMech: MechAESKeyWrapPad, ID: id, Label: "cmk/test/imported/" + string(alg), HMACBytes: HMACKeySize,
	})
	return id, pub, method, err
}

// rawRSAOAEPFallback is the operator's choice that SoftHSM 2.6 needs for imports wrapped with RSA-OAEP-SHA-256.
func rawRSAOAEPFallback(c *Config) { c.RawRSAOAEPFallback = true }

func TestImportAESBothPaths(t *testing.T) {
	tok, _ := newToken(t, 1, rawRSAOAEPFallback)
	ctx := context.Background()
	wrappingID := randomID(t)
	wrapping, err := tok.GenerateWrappingKey(ctx, wrappingID, "cmk/test/wrapping_key")
	if err != nil {
		t.Fatal(err)
	}
	if wrapping.N.BitLen() != 4096 {
		t.Fatalf("wrapping key of %d bits", wrapping.N.BitLen())
	}
	material := make([]byte, 32)
	rand.Read(material)
	for _, c := range []struct {
		hash   crypto.Hash
		method string
	}{
		{crypto.SHA1, ImportUnwrappedInHSM},      // SoftHSM's OAEP does SHA-1: the whole unwrap is in the HSM
		{crypto.SHA256, ImportEphemeralInPlugin}, // …but not SHA-256: raw RSA, OAEP decoded in the plugin
	} {
		id, _, method, err := importKey(t, tok, wrappingID, wrapping, AES256, c.hash, material)
		if err != nil {
			t.Fatalf("%v: %v", c.hash, err)
		}
		if method != c.method {
			t.Fatalf("%v: method %s, want %s", c.hash, method, c.method)
		}
		// The HSM's ciphertext opens with the imported material in a standard AES-GCM, and the reverse.
		nonce := make([]byte, 12)
		rand.Read(nonce)
		_, sealed, err := tok.EncryptGCM(ctx, id, nonce, []byte("aad"), []byte("imported"))
		if err != nil {
			t.Fatal(err)
		}
		block, _ := aes.NewCipher(material)
		gcm, _ := cipher.NewGCM(block)
		if pt, err := gcm.Open(nil, nonce, sealed, []byte("aad")); err != nil || string(pt) != "imported" {
			t.Fatalf("%v: standard AES-GCM cannot open the HSM's ciphertext: %v", c.hash, err)
		}
		theirs := gcm.Seal(nil, nonce, []byte("from outside"), nil)
		if pt, err := tok.DecryptGCM(ctx, id, nonce, nil, theirs); err != nil || string(pt) != "from outside" {
			t.Fatalf("%v: HSM cannot open a standard ciphertext: %v", c.hash, err)
		}
	}
	// Every object is protected like a generated one; no ephemeral key is left behind.
	objs, err := tok.ListObjects(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 5 { // wrapping key + 2 × (AES + HMAC)
		t.Fatalf("%d objects", len(objs))
	}
	for _, o := range objs {
		if !o.Token || !o.Sensitive || o.Extractable {
			t.Errorf("%s: %+v", o.Label, o)
		}
	}
}

func TestImportAsymmetricAndHMAC(t *testing.T) {
	tok, _ := newToken(t, 1, rawRSAOAEPFallback)
	ctx := context.Background()
	wrappingID := randomID(t)
	wrapping, err := tok.GenerateWrappingKey(ctx, wrappingID, "cmk/test/wrapping_key")
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("imported signer"))

	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	der, _ := x509.MarshalPKCS8PrivateKey(rsaKey)
	id, pub, _, err := importKey(t, tok, wrappingID, wrapping, RSA2048, crypto.SHA256, der)
	if err != nil {
		t.Fatal(err)
	}
	if !pub.(*rsa.PublicKey).Equal(&rsaKey.PublicKey) {
		t.Fatal("imported RSA public key differs")
	}
	sig, err := tok.SignPKCS1v15(ctx, id, crypto.SHA256, digest[:])
	if err != nil || rsa.VerifyPKCS1v15(&rsaKey.PublicKey, crypto.SHA256, digest[:], sig) != nil {
		t.Fatalf("imported RSA key signs: %v", err)
	}

	for _, alg := range []Algorithm{ECDSAP256, ECDSAP384, ECDSAP521} {
		curve, _ := alg.curve()
		ecKey, _ := ecdsa.GenerateKey(curve, rand.Reader)
		der, _ := x509.MarshalPKCS8PrivateKey(ecKey)
		id, pub, _, err := importKey(t, tok, wrappingID, wrapping, alg, crypto.SHA256, der)
		if err != nil {
			t.Fatalf("%s: %v", alg, err)
		}
		if !pub.(*ecdsa.PublicKey).Equal(&ecKey.PublicKey) {
			t.Fatalf("%s: recovered public key differs", alg)
		}
		sig, err := tok.SignECDSA(ctx, id, digest[:])
		if err != nil {
			t.Fatal(err)
		}
		if len(recoverECDSA(curve, digest[:], sig)) == 0 {
			t.Fatalf("%s: no candidates", alg)
		}
	}
	// A key on another curve than the type says is refused.
	ecKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	der, _ = x509.MarshalPKCS8PrivateKey(ecKey)
	if _, _, _, err := importKey(t, tok, wrappingID, wrapping, ECDSAP256, crypto.SHA256, der); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("P-384 key as ecdsa-p256: %v", err)
	}

	_, edPriv, _ := ed25519.GenerateKey(rand.Reader)
	der, _ = x509.MarshalPKCS8PrivateKey(edPriv)
	if _, pub, _, err := importKey(t, tok, wrappingID, wrapping, Ed25519, crypto.SHA256, der); err == nil {
		if !bytes.Equal(pub.(ed25519.PublicKey), edPriv.Public().(ed25519.PublicKey)) {
			t.Fatal("imported Ed25519 public key differs")
		}
	} else if !errors.Is(err, ErrMechanismUnsupported) && !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("Ed25519 import: %v", err)
	} else {
		t.Logf("Ed25519 import on this token: %v", err)
	}

	secret := bytes.Repeat([]byte{0x42}, 64)
	id, _, _, err = importKey(t, tok, wrappingID, wrapping, HMACOnly, crypto.SHA256, secret)
	if err != nil {
		t.Fatal(err)
	}
	mac, err := tok.HMAC(ctx, id, crypto.SHA256, []byte("data"))
	if err != nil {
		t.Fatal(err)
	}
	if want := hmacSHA256(secret, []byte("data")); !bytes.Equal(mac, want) {
		t.Fatal("HMAC with the imported secret differs from a standard HMAC")
	}
}

func TestImportRefusesBadInput(t *testing.T) {
	tok, _ := newToken(t, 1, rawRSAOAEPFallback)
	ctx := context.Background()
	wrappingID := randomID(t)
	wrapping, _ := tok.GenerateWrappingKey(ctx, wrappingID, "cmk/test/wrapping_key")
	other, _ := rsa.GenerateKey(rand.Reader, 4096)
	material := make([]byte, 32)
	for name, c := range map[string]struct {
		alg     Algorithm
		pub     *rsa.PublicKey
		hash    crypto.Hash
		payload []byte
	}{
		"wrong size for aes256":     {AES256, wrapping, crypto.SHA256, material[:16]},
		"other wrapping key":        {AES256, &other.PublicKey, crypto.SHA256, material},
		"other wrapping key in HSM": {AES256, &other.PublicKey, crypto.SHA1, material},
		"garbage as an RSA key":     {RSA2048, wrapping, crypto.SHA256, material},
	} {
		if _, _, _, err := importKey(t, tok, wrappingID, c.pub, c.alg, c.hash, c.payload); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s: %v, want ErrInvalidArgument", name, err)
		}
	}
	_, _, err := tok.ImportVersion(ctx, ImportRequest{Algorithm: AES256, WrappingID: wrappingID, OAEPHash: crypto.SHA256,
		WrappedKey: []byte("short"), KeyWrapMech: MechAESKeyWrapPad, ID: randomID(t), Label: "x", HMACBytes: 64})
	if !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("short ciphertext: %v", err)
	}
	objs, _ := tok.ListObjects(ctx, "")
	if len(objs) != 1 {
		t.Fatalf("failed imports left %d objects beside the wrapping key", len(objs)-1)
	}
}

// Without the operator's choice, an import the token's OAEP cannot unwrap is refused with what to do; with it, the
// same wrapping key takes the import. On a token whose OAEP takes SHA-256 the wrapping key could never decrypt
// with raw RSA (TestEveryAlgorithmOnEveryToken, TestImportOnEveryToken).
func TestRawRSAImportFallbackIsTheOperatorsChoice(t *testing.T) {
	tok, cfg := newToken(t, 1)
	ctx := context.Background()
	wrappingID := randomID(t)
	wrapping, err := tok.GenerateWrappingKey(ctx, wrappingID, "cmk/test/wrapping_key")
	if err != nil {
		t.Fatal(err)
	}
	material := make([]byte, 32)
	rand.Read(material)
	_, _, _, err = importKey(t, tok, wrappingID, wrapping, AES256, crypto.SHA256, material)
	if !errors.Is(err, ErrMechanismUnsupported) || !strings.Contains(err.Error(), "raw_rsa_oaep_fallback") {
		t.Fatalf("SHA-256 import without the fallback: %v", err)
	}
	if _, _, method, err := importKey(t, tok, wrappingID, wrapping, AES256, crypto.SHA1, material); err != nil || method != ImportUnwrappedInHSM {
		t.Fatalf("SHA-1 import, which the token's OAEP takes: %s, %v", method, err)
	}
	cfg.RawRSAOAEPFallback = true // the operator chooses it: config/hsm reconnects
	chosen, err := Open(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer chosen.Close()
	if _, _, method, err := importKey(t, chosen, wrappingID, wrapping, AES256, crypto.SHA256, material); err != nil || method != ImportEphemeralInPlugin {
		t.Fatalf("SHA-256 import with the fallback chosen: %s, %v", method, err)
	}
}

func hmacSHA256(key, data []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(data)
	return m.Sum(nil)
}

// The raw-RSA fallback leaves no copy of the ephemeral key it can reach: its Go copies (the raw decryption, the
// padded block, the decoded key) are zero once the import returns, and the C copy of the CKA_VALUE that made the
// session key is zeroed before it is freed.
func TestRawOAEPFallbackWipesEphemeralKey(t *testing.T) {
	tok, _ := newToken(t, 1, rawRSAOAEPFallback)
	ctx := context.Background()
	wrappingID := randomID(t)
	wrapping, err := tok.GenerateWrappingKey(ctx, wrappingID, "cmk/test/wrapping_key")
	if err != nil {
		t.Fatal(err)
	}
	var goCopies [][]byte
	ephemeralCopies = func(copies ...[]byte) {
		for _, c := range copies {
			if allZero(c) {
				t.Errorf("a copy of %d bytes is zero while in use: not the key's", len(c))
			}
		}
		goCopies = append(goCopies, copies...)
	}
	type wiped struct {
		size int
		zero bool
	}
	var cValues []wiped
	cValueWiped = func(attr uint, v []byte) {
		if attr == pkcs11.CKA_VALUE {
			cValues = append(cValues, wiped{len(v), allZero(v)})
		}
	}
	t.Cleanup(func() { ephemeralCopies, cValueWiped = nil, nil })

	material := make([]byte, 32)
	rand.Read(material)
	_, _, method, err := importKey(t, tok, wrappingID, wrapping, AES256, crypto.SHA256, material)
	if err != nil || method != ImportEphemeralInPlugin {
		t.Fatalf("import through the raw-RSA fallback: method %q, %v", method, err)
	}
	if len(goCopies) != 3 || len(goCopies[2]) != 32 {
		t.Fatalf("saw %d Go copies; want the raw decryption, the padded block and the 32-byte key", len(goCopies))
	}
	for i, c := range goCopies {
		if !allZero(c) {
			t.Errorf("Go copy %d (%d bytes) of the ephemeral key was not zeroed after the import", i, len(c))
		}
	}
	if len(cValues) != 1 || cValues[0].size != 32 || !cValues[0].zero {
		t.Fatalf("C copies of CKA_VALUE: %+v; want one of 32 bytes, zeroed before it was freed", cValues)
	}
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}
