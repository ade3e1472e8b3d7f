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
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/byoktest"
)

// Every algorithm on every token of the matrix: what the token serves is generated inside it, protected as the
// engine requires, used for each operation, and destroyed; what it cannot serve is refused before anything is
// made, naming what the token lacks.
func TestEveryAlgorithmOnEveryToken(t *testing.T) {
	onEveryToken(t, 2, func(t *testing.T, tk tokentest.Token, tok *Token) {
		ctx := context.Background()
		caps, err := tok.Capabilities(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: allowed mechanisms %v, OAEP-SHA-256 %v, key wrap 0x%x", tk.Kind, caps.AllowedMechanisms, caps.OAEPSHA256, caps.KeyWrap)
		want := expectedCapabilities(t, tk.Kind)
		if caps.AllowedMechanisms != want.AllowedMechanisms || caps.OAEPSHA256 != want.OAEPSHA256 || caps.KeyWrap != want.KeyWrap ||
			caps.Offers(pkcs11.CKM_RSA_PKCS_PSS) != want.PSS {
			t.Errorf("the probe found allowed mechanisms %v, OAEP-SHA-256 %v, key wrap 0x%x, PSS %v; %s is known to have %v, %v, 0x%x, %v",
				caps.AllowedMechanisms, caps.OAEPSHA256, caps.KeyWrap, caps.Offers(pkcs11.CKM_RSA_PKCS_PSS), tk.Kind,
				want.AllowedMechanisms, want.OAEPSHA256, want.KeyWrap, want.PSS)
		}
		record(tk.Kind, "`CKA_ALLOWED_MECHANISMS` stored", yesNo(caps.AllowedMechanisms))
		wrap := "none (no BYOK)"
		if caps.KeyWrap != 0 {
			wrap = fmt.Sprintf("%s (0x%X)", mechanismName(caps.KeyWrap), caps.KeyWrap)
		}
		record(tk.Kind, "RFC 5649 key wrap", wrap)
		for _, alg := range Algorithms {
			t.Run(string(alg), func(t *testing.T) {
				id := randomID(t)
				label := "cmk/matrix/" + string(alg) + "/" + string(tk.Kind)
				hmacBytes := 0
				if alg == HMACOnly {
					hmacBytes = 64
				}
				served, missing := caps.Serves(alg)
				// Before its first generation: an algorithm listed but unusable may be served still, or refused already.
				if known, listed := want.ServesAlgorithm(string(alg), false), want.ServesAlgorithm(string(alg), true); (known && !served) || (!listed && served) {
					t.Fatalf("the probe says served=%v (lacking %v); %s is known to serve it: %v", served, missing, tk.Kind, known)
				}
				pub, err := tok.GenerateVersion(ctx, alg, id, label, hmacBytes)
				defer func() {
					if now, _ := caps.Serves(alg); now != want.ServesAlgorithm(string(alg), false) {
						t.Errorf("after its first generation, served=%v; %s is known to serve it: %v", now, tk.Kind, !now)
					}
				}()
				if served && errors.Is(err, ErrMechanismUnsupported) {
					// Listed, but the token could not make a usable key (tpm2-pkcs11 and P-521): refused from now on.
					if ok, _ := caps.Serves(alg); ok {
						t.Fatalf("refused at generation (%v) but still listed as served", err)
					}
				}
				if ok, missing := caps.Serves(alg); !ok {
					if !errors.Is(err, ErrMechanismUnsupported) || !strings.Contains(err.Error(), missing[0]) {
						t.Fatalf("an algorithm the token lacks (%v): %v", missing, err)
					}
					if objs, _ := tok.ListObjects(ctx, label); len(objs) != 0 {
						t.Fatalf("a refused creation left %d objects", len(objs))
					}
					t.Logf("refused: %v", err)
					record(tk.Kind, string(alg), "refused at creation: "+strings.Join(missing, ", "))
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _, _ = tok.DestroyKeys(ctx, id) })
				checkProtected(t, tok, label, alg)
				useVersion(t, tok, caps, alg, id, pub)
				adoption := checkFoundByLabel(t, tok, alg, id, label, hmacBytes, pub, true)
				if n, err := tok.DestroyKeys(ctx, id); err != nil || n == 0 {
					t.Fatalf("destroy: %d objects, %v", n, err)
				}
				record(tk.Kind, string(alg), "✓ "+operationsOf(alg, caps, tok)+"; "+adoption)
				if objs, _ := tok.ListObjects(ctx, label); len(objs) != 0 {
					t.Fatalf("%d objects left after destruction", len(objs))
				}
			})
		}
		q := tok.quirks()
		var notes []string
		if pairTemplateOptions(tok.pool.tokenState().pairTemplates.Load())&publicOnToken != 0 {
			notes = append(notes, "public halves as token objects")
		}
		if q.oneSession {
			notes = append(notes, "one session at a time")
		}
		if q.reinitAfterDestroy {
			notes = append(notes, "re-initialised after each destruction")
		}
		if q.serialObjectWrites {
			notes = append(notes, "object writes one at a time")
		}
		if len(notes) == 0 {
			notes = []string{"none"}
		}
		record(tk.Kind, "handled quirks", strings.Join(notes, "; "))
		t.Run("random", func(t *testing.T) {
			a, err := tok.GenerateRandom(ctx, 32)
			b, err2 := tok.GenerateRandom(ctx, 32)
			if err != nil || err2 != nil || len(a) != 32 || bytes.Equal(a, b) {
				t.Fatalf("random: %x %x %v %v", a, b, err, err2)
			}
		})
	})
}

// checkFoundByLabel finds the version's material by its label, as the engine does when storage has lost the
// version (a restore from an older snapshot), and checks the verdict: generated material is adoptable with the
// public key it was made with, where the token marks the keys it generates CKA_LOCAL, and on an
// operator's word elsewhere; imported material only on an operator's word. It returns the matrix's note.
func checkFoundByLabel(t *testing.T, tok *Token, alg Algorithm, id []byte, label string, hmacBytes int, pub crypto.PublicKey, generated bool) string {
	t.Helper()
	ctx := context.Background()
	found, err := tok.FindVersion(ctx, alg, label, hmacBytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 || !bytes.Equal(found[0].ID, id) {
		t.Fatalf("found by label %q: %d objects (%+v)", label, len(found), found)
	}
	// NSS softokn 3.87 reads CKA_LOCAL back false even on the keys it generated.
	marksLocal := tok.Info().ManufacturerID != "Mozilla Foundation"
	auto, reason := found[0].Adoptable()
	onWord, wordReason := found[0].AdoptableOnWord()
	if want := generated && marksLocal; auto != want || !onWord {
		t.Fatalf("adoptable %v (%s), on an operator's word %v (%s), for material generated=%v on a token marking CKA_LOCAL: %v",
			auto, reason, onWord, wordReason, generated, marksLocal)
	}
	if pub != nil {
		if eq, isEq := found[0].Public.(interface{ Equal(crypto.PublicKey) bool }); !isEq || !eq.Equal(pub) {
			t.Fatalf("the public key read back for adoption differs from the one made")
		}
	}
	switch {
	case !generated:
		t.Logf("imported material found by label; not adopted automatically: %s", reason)
		return ""
	case auto:
		return "adoptable after a restore"
	}
	return "adopted after a restore on the engine's WAL or an operator's word (the token leaves CKA_LOCAL false)"
}

// checkProtected reads the version's objects back: on the token, private, sensitive since creation, never
// extractable, and with the usage the engine grants (where the token reports it).
func checkProtected(t *testing.T, tok *Token, label string, alg Algorithm) {
	t.Helper()
	objs, err := tok.ListObjects(context.Background(), label)
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) == 0 {
		t.Fatal("no object with the version's label")
	}
	for _, o := range objs {
		if o.Class == "public_key" { // an Ed25519 version keeps its public half: it verifies and does nothing else
			if u := strings.Join(o.Usage, ","); u != "verify" || o.Modifiable {
				t.Errorf("%s (public half) has usage %q, modifiable %v; want verify only, not modifiable", o.Label, u, o.Modifiable)
			}
			continue
		}
		if !o.Token || !o.Private || !o.Sensitive || !o.AlwaysSensitive || o.Extractable || !o.NeverExtractable {
			t.Errorf("%s is not protected as required: %+v", o.Label, o)
		}
		// Flags a private key cannot use (encrypt, verify and wrap are the public half's) and, where the token refuses
		// them set false (tpm2-pkcs11), flags without meaning for the key type, are what the token reports.
		lenient := pairTemplateOptions(tok.pool.tokenState().pairTemplates.Load())&omitMeaningless != 0
		for _, u := range o.Usage {
			switch {
			case o.Class == "private_key" && (u == "encrypt" || u == "verify" || u == "wrap"):
			case lenient && alg.kind() != kindRSA && (u == "decrypt" || u == "unwrap"):
			case alg.kind() == kindAES && u != "encrypt" && u != "decrypt",
				alg.kind() == kindHMAC && u != "sign" && u != "verify",
				alg.kind() == kindRSA && u != "sign" && u != "decrypt",
				(alg.kind() == kindEC || alg.kind() == kindEd25519) && u != "sign":
				t.Errorf("%s has usage %v", o.Label, o.Usage)
			}
		}
	}
}

// useVersion runs every operation the algorithm has, and checks results with the standard library.
func useVersion(t *testing.T, tok *Token, caps *Capabilities, alg Algorithm, id []byte, pub crypto.PublicKey) {
	t.Helper()
	ctx := context.Background()
	digest := sha256.Sum256([]byte("signed on every token"))
	switch alg.kind() {
	case kindAES:
		nonce := make([]byte, GCMNonceSize)
		rand.Read(nonce)
		for _, aad := range [][]byte{nil, []byte("context")} {
			used, sealed, err := tok.EncryptGCM(ctx, id, nonce, aad, []byte("plaintext"))
			if err != nil {
				t.Fatal(err)
			}
			if pt, err := tok.DecryptGCM(ctx, id, used, aad, sealed); err != nil || string(pt) != "plaintext" {
				t.Fatalf("decrypt: %q %v", pt, err)
			}
			sealed[0] ^= 1
			if _, err := tok.DecryptGCM(ctx, id, used, aad, sealed); !errors.Is(err, ErrInvalidCiphertext) {
				t.Fatalf("tampered ciphertext: %v, want ErrInvalidCiphertext", err)
			}
		}
		if ok, _ := caps.Serves(HMACOnly); ok { // the HMAC secret beside the version, made on first use
			if err := tok.EnsureHMACKey(ctx, id, "cmk/matrix/aes-hmac", 64, false); err != nil {
				t.Fatal(err)
			}
			checkHMAC(t, tok, id)
			// The AES key survived its HMAC secret (NSS keeps one secret key per CKA_ID).
			if _, _, err := tok.EncryptGCM(ctx, id, nonce, nil, []byte("x")); err != nil {
				t.Fatalf("AES key after its HMAC secret was made: %v", err)
			}
		}
	case kindHMAC:
		checkHMAC(t, tok, id)
	case kindRSA:
		rpub := pub.(*rsa.PublicKey)
		sig, err := tok.SignPKCS1v15(ctx, id, crypto.SHA256, digest[:])
		if err != nil || rsa.VerifyPKCS1v15(rpub, crypto.SHA256, digest[:], sig) != nil {
			t.Fatalf("PKCS#1 v1.5 signature: %v", err)
		}
		if caps.Offers(pkcs11.CKM_RSA_PKCS_PSS) {
			sig, err := tok.SignPSS(ctx, id, crypto.SHA256, digest[:], 32)
			if err != nil || rsa.VerifyPSS(rpub, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: 32}) != nil {
				t.Fatalf("PSS signature: %v", err)
			}
			// Transit's default salt is the largest the key allows; some tokens take only the digest's length.
			maxSalt := (rpub.N.BitLen()-1+7)/8 - 32 - 2
			if sig, err := tok.SignPSS(ctx, id, crypto.SHA256, digest[:], maxSalt); err == nil {
				if rsa.VerifyPSS(rpub, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: maxSalt}) != nil {
					t.Fatal("PSS signature with the largest salt does not verify")
				}
			} else if errors.Is(err, ErrMechanismUnsupported) {
				pssLargestSaltRefused.Store(tok, true)
			} else {
				t.Fatalf("PSS with the largest salt: %v", err)
			}
		} else if _, err := tok.SignPSS(ctx, id, crypto.SHA256, digest[:], 32); !errors.Is(err, ErrMechanismUnsupported) {
			t.Fatalf("PSS on a token without it: %v", err)
		}
		ct, _ := rsa.EncryptOAEP(sha256.New(), rand.Reader, rpub, []byte("secret"), nil)
		if pt, err := tok.DecryptRSA(ctx, id, crypto.SHA256, ct); err != nil || string(pt) != "secret" {
			t.Fatalf("OAEP-SHA-256 decrypt: %q %v", pt, err)
		}
		ct[len(ct)-1] ^= 1
		if _, err := tok.DecryptRSA(ctx, id, crypto.SHA256, ct); !errors.Is(err, ErrInvalidCiphertext) {
			t.Fatalf("tampered RSA ciphertext: %v, want ErrInvalidCiphertext", err)
		}
	case kindEC:
		sig, err := tok.SignECDSA(ctx, id, digest[:])
		if err != nil {
			t.Fatal(err)
		}
		half := len(sig) / 2
		if !ecdsa.Verify(pub.(*ecdsa.PublicKey), digest[:], new(big.Int).SetBytes(sig[:half]), new(big.Int).SetBytes(sig[half:])) {
			t.Fatal("ECDSA signature does not verify")
		}
	case kindEd25519:
		sig, err := tok.SignEd25519(ctx, id, []byte("message"))
		if err != nil || !ed25519.Verify(pub.(ed25519.PublicKey), []byte("message"), sig) {
			t.Fatalf("Ed25519 signature: %v", err)
		}
	}
}

func checkHMAC(t *testing.T, tok *Token, id []byte) {
	t.Helper()
	ctx := context.Background()
	a, err := tok.HMAC(ctx, id, crypto.SHA256, []byte("data"))
	b, err2 := tok.HMAC(ctx, id, crypto.SHA256, []byte("data"))
	c, err3 := tok.HMAC(ctx, id, crypto.SHA256, []byte("other"))
	if err != nil || err2 != nil || err3 != nil || len(a) != 32 || !bytes.Equal(a, b) || bytes.Equal(a, c) {
		t.Fatalf("HMAC: %v %v %v", err, err2, err3)
	}
}

// BYOK on every token that offers RFC 5649 key wrap: AES, RSA and ECDSA keys wrapped as vault transit import
// wraps them are unwrapped inside the HSM and work like generated ones.
func TestImportOnEveryToken(t *testing.T) {
	onEveryToken(t, 1, func(t *testing.T, tk tokentest.Token, tok *Token) {
		ctx := context.Background()
		caps, err := tok.Capabilities(ctx)
		if err != nil {
			t.Fatal(err)
		}
		wrappingID := randomID(t)
		wrapping, err := tok.GenerateWrappingKey(ctx, wrappingID, "cmk/matrix/wrapping_key")
		if ok, missing := caps.Serves(RSA4096); !ok {
			if !errors.Is(err, ErrMechanismUnsupported) {
				t.Fatalf("wrapping key on a token without RSA-4096 (%v): %v", missing, err)
			}
			record(tk.Kind, "BYOK aes256", "refused (400): no RSA-4096 wrapping key")
			record(tk.Kind, "BYOK rsa2048", "refused (400): no RSA-4096 wrapping key")
			record(tk.Kind, "BYOK ecdsa-p256", "refused (400): no RSA-4096 wrapping key")
			t.Skipf("the token cannot hold the RSA-4096 wrapping key: %v", missing)
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _, _ = tok.DestroyKeys(ctx, wrappingID) })
		ecKey, _ := ecdsa.GenerateKey(ecdsaCurve(ECDSAP256), rand.Reader)
		ecDER, _ := x509.MarshalPKCS8PrivateKey(ecKey)
		rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
		rsaDER, _ := x509.MarshalPKCS8PrivateKey(rsaKey)
		aesKey := make([]byte, 32)
		rand.Read(aesKey)
		for _, c := range []struct {
			alg      Algorithm
			material []byte
		}{{AES256, aesKey}, {RSA2048, rsaDER}, {ECDSAP256, ecDER}} {
			t.Run(string(c.alg), func(t *testing.T) {
				wrapped, err := byoktest.Wrap(wrapping, crypto.SHA256, c.material)
				if err != nil {
					t.Fatal(err)
				}
				id := randomID(t)
				pub, _, err := tok.ImportVersion(ctx, ImportRequest{Algorithm: c.alg, WrappingID: wrappingID, OAEPHash: crypto.SHA256,
					WrappedKey: wrapped, ID: id, Label: "cmk/matrix/imported/" + string(c.alg), HMACBytes: 64})
				ok, _ := caps.Serves(c.alg)
				row := "BYOK " + string(c.alg)
				if want := expectedCapabilities(t, tk.Kind); want.KeyWrap != 0 && want.ServesAlgorithm(string(c.alg), false) && err != nil {
					t.Fatalf("%s is known to import %s keys: %v", tk.Kind, c.alg, err)
				}
				if caps.KeyWrap == 0 || !ok {
					if !errors.Is(err, ErrMechanismUnsupported) {
						t.Fatalf("import on a token without key wrap or %s: %v", c.alg, err)
					}
					record(tk.Kind, row, "refused (400): no key wrap or no such keys")
					t.Skipf("refused as it must be: %v", err)
				}
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _, _ = tok.DestroyKeys(ctx, id) })
				switch c.alg {
				case AES256:
					nonce := make([]byte, 12)
					_, sealed, err := tok.EncryptGCM(ctx, id, nonce, nil, []byte("imported"))
					if err != nil {
						t.Fatal(err)
					}
					block, _ := aes.NewCipher(aesKey)
					gcm, _ := cipher.NewGCM(block)
					if pt, err := gcm.Open(nil, nonce, sealed, nil); err != nil || string(pt) != "imported" {
						t.Fatalf("the imported key is not the one wrapped: %v", err)
					}
				default:
					if !publicKeysEqual(pub, c.alg, rsaKey, ecKey) {
						t.Fatalf("public key of the imported %s differs from the wrapped key's", c.alg)
					}
					useVersion(t, tok, caps, c.alg, id, pub)
				}
				checkFoundByLabel(t, tok, c.alg, id, "cmk/matrix/imported/"+string(c.alg), 64, pub, false)
				record(tk.Kind, row, "✓ unwrapped in the HSM; after a restore adopted only on an operator's word")
			})
		}
	})
}

func ecdsaCurve(alg Algorithm) elliptic.Curve {
	c, _ := alg.curve()
	return c
}

func publicKeysEqual(pub crypto.PublicKey, alg Algorithm, rsaKey *rsa.PrivateKey, ecKey *ecdsa.PrivateKey) bool {
	switch alg.kind() {
	case kindRSA:
		return rsaKey.PublicKey.Equal(pub)
	case kindEC:
		return ecKey.PublicKey.Equal(pub)
	}
	return false
}

// expectedCapabilities is what kind is known to serve (tokentest.Expected).
func expectedCapabilities(t *testing.T, kind tokentest.Kind) tokentest.Capabilities {
	t.Helper()
	want, ok := tokentest.Expected[kind]
	if !ok {
		t.Fatalf("no known capabilities for %s: add them to tokentest.Expected", kind)
	}
	return want
}

// pssLargestSaltRefused notes tokens whose PSS takes no salt longer than the digest.
var pssLargestSaltRefused sync.Map

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no (usage flags alone restrict keys)"
}

// operationsOf names what useVersion ran for alg on this token.
func operationsOf(alg Algorithm, caps *Capabilities, tok *Token) string {
	switch alg.kind() {
	case kindAES:
		if ok, _ := caps.Serves(HMACOnly); ok {
			return "GCM with AAD, tamper refused; HMAC secret beside it"
		}
		return "GCM with AAD, tamper refused"
	case kindHMAC:
		return "HMAC"
	case kindRSA:
		ops := "PKCS#1 v1.5 sign"
		if caps.Offers(pkcs11.CKM_RSA_PKCS_PSS) {
			ops += ", PSS"
			if _, refused := pssLargestSaltRefused.Load(tok); refused {
				ops += " (salt of the digest's length only: Transit's default, the largest, is a 400)"
			}
		}
		ops += ", OAEP-SHA-256 decrypt"
		if !caps.OAEPSHA256 {
			ops += " (raw RSA, padding checked in the plugin)"
		}
		if tok.quirks().reinitAfterRefusal {
			ops += "; a refused operation leaves the key undestroyable until the module is re-initialised (done by the destruction that meets it)"
		}
		return ops
	}
	return "sign"
}
