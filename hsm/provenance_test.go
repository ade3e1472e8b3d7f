package hsm

import (
	"context"
	"crypto"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"unsafe"

	"github.com/miekg/pkcs11"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// Someone holding the PIN plants a secret of a value they know where a version's HMAC secret goes (its CKA_ID and
// label), before the version's first HMAC: the engine must refuse it, never compute an HMAC under it, and never
// report it as the version's secret when adopting. Planted with C_CreateObject on every token that holds generic
// secrets, and on NSS also generated from a known password (CKM_PBA_SHA1_WITH_SHA1_HMAC), which NSS reads back as
// always sensitive and never extractable, like a key it generated. tpm2-pkcs11 has no secret keys: skipped there.
func TestPlantedHMACSecretIsRefused(t *testing.T) {
	onEveryToken(t, 2, func(t *testing.T, tk tokentest.Token, tok *Token) {
		ctx := context.Background()
		caps, err := tok.Capabilities(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ok, _ := caps.Serves(HMACOnly); !ok {
			t.Skipf("%s holds no generic secrets (tpm2-pkcs11 has no C_GenerateKey): nothing can be planted", tk.Kind)
		}
		alg := AES256
		if ok, _ := caps.Serves(alg); !ok {
			alg = RSA2048 // opencryptoki: no AES-GCM
		}
		newVersion := func(label string) []byte {
			id := randomID(t)
			if _, err := tok.GenerateVersion(ctx, alg, id, label, 0); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _, _ = tok.DestroyKeys(context.Background(), id) })
			return id
		}
		known := make([]byte, 32)
		_, _ = rand.Read(known)
		created := func(id []byte, label string) {
			err := tok.do(ctx, "plant", func(c pkcs11API, s session) error {
				var tmpl []*pkcs11.Attribute
				for _, a := range hmacKeyTemplate(templateOptions{allowedMechanisms: caps.AllowedMechanisms}, 32, hmacSecretID(id), label+"/hmac") {
					if a.Type != pkcs11.CKA_VALUE_LEN {
						tmpl = append(tmpl, a)
					}
				}
				_, err := c.CreateObject(s.h, append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_VALUE, known)))
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		plants := map[string]func(id []byte, label string) []byte{
			"created with a known value": func(id []byte, label string) []byte { created(id, label); return knownHMAC(known) },
		}
		if caps.passwordKeyGen() {
			plants["generated from a known password"] = func(id []byte, label string) []byte { return plantFromPassword(t, tok, id, label) }
		}
		for name, plant := range plants {
			t.Run(strings.ReplaceAll(name, " ", "-"), func(t *testing.T) {
				label := "cmk/test/planted-" + string(tk.Kind) + "/" + strings.Fields(name)[0] + "/v1"
				id := newVersion(label)
				plantedMAC := plant(id, label)

				err := tok.EnsureHMACKey(ctx, id, label, 32, false)
				if err == nil {
					mac, herr := tok.HMAC(ctx, id, crypto.SHA256, []byte("data"))
					t.Fatalf("the version's first HMAC took the planted secret (HMAC under the planted value: %v, %v)", herr == nil && hmac.Equal(mac, plantedMAC), herr)
				}
				var untrusted *UntrustedObjectError
				if !errors.Is(err, ErrUntrustedObject) || !errors.As(err, &untrusted) || untrusted.Label != label+"/hmac" || !strings.Contains(err.Error(), "removes it from the token") {
					t.Fatalf("EnsureHMACKey: %v, want an untrusted-object error naming %q and what to do", err, label+"/hmac")
				}
				t.Logf("%s: refused: %s", tk.Kind, untrusted.Reason)
				if err := tok.CheckHMACSecret(ctx, id, 32, false); !errors.Is(err, ErrUntrustedObject) {
					t.Fatalf("CheckHMACSecret (reconcile's check): %v", err)
				}
				found, err := tok.FindVersion(ctx, alg, label, 32)
				if err != nil || len(found) != 1 || found[0].HMACSecret {
					t.Fatalf("a version adopted from the token would take the planted secret as its own: %+v %v", found, err)
				}
			})
		}

		// The engine's own secret, found again by a later first use (the one that made it ended before storage
		// recorded it), is taken without the engine's record only where the token proves it generated it, and
		// refused where nothing can be proven (NSS). With the record it is taken everywhere
		// (TestVouchedHMACSecretIsTakenOnEveryToken).
		label := "cmk/test/own-" + string(tk.Kind) + "/v1"
		id := newVersion(label)
		if err := tok.EnsureHMACKey(ctx, id, label, 32, false); err != nil {
			t.Fatalf("first HMAC secret: %v", err)
		}
		err = tok.EnsureHMACKey(ctx, id, label, 32, false)
		provable := tk.Kind != tokentest.NSS
		if provable && err != nil || !provable && !errors.Is(err, ErrUntrustedObject) {
			t.Fatalf("the engine's own HMAC secret found again on %s: %v (proven there: %v)", tk.Kind, err, provable)
		}
		if found, err := tok.FindVersion(ctx, alg, label, 32); err != nil || len(found) != 1 || found[0].HMACSecret != provable {
			t.Fatalf("adoption's view of the engine's own secret: %+v %v", found, err)
		}
	})
}

// The engine's own HMAC secret, found again by a first use that the engine's record vouches for (internal/keys
// writes the record before it makes the secret: TestOwnHMACSecretSurvivesAnUnrecordedFirstUse), is taken on every
// token, NSS included, and computes the HMACs it did. A record never makes the engine take a secret whose material
// can be read or extracted, or one of another size.
func TestVouchedHMACSecretIsTakenOnEveryToken(t *testing.T) {
	onEveryToken(t, 2, func(t *testing.T, tk tokentest.Token, tok *Token) {
		ctx := context.Background()
		caps, err := tok.Capabilities(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ok, _ := caps.Serves(HMACOnly); !ok {
			t.Skipf("%s holds no generic secrets (tpm2-pkcs11 has no C_GenerateKey)", tk.Kind)
		}
		alg := AES256
		if ok, _ := caps.Serves(alg); !ok {
			alg = RSA2048 // opencryptoki: no AES-GCM
		}
		newVersion := func(label string) []byte {
			id := randomID(t)
			if _, err := tok.GenerateVersion(ctx, alg, id, label, 0); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _, _ = tok.DestroyKeys(context.Background(), id) })
			return id
		}

		label := "cmk/test/vouched-" + string(tk.Kind) + "/v1"
		id := newVersion(label)
		if err := tok.EnsureHMACKey(ctx, id, label, 32, true); err != nil {
			t.Fatalf("first HMAC secret: %v", err)
		}
		before, err := tok.HMAC(ctx, id, crypto.SHA256, []byte("data"))
		if err != nil {
			t.Fatal(err)
		}
		if err := tok.CheckHMACSecret(ctx, id, 32, true); err != nil {
			t.Fatalf("reconcile's check of a vouched-for secret on %s: %v", tk.Kind, err)
		}
		if err := tok.EnsureHMACKey(ctx, id, label, 32, true); err != nil {
			t.Fatalf("the engine's own HMAC secret, vouched for, found again on %s: %v", tk.Kind, err)
		}
		if after, err := tok.HMAC(ctx, id, crypto.SHA256, []byte("data")); err != nil || !hmac.Equal(after, before) {
			t.Fatalf("the HMAC after the secret was found again differs (%v)", err)
		}

		plant := func(id []byte, label string, value []byte, readable bool) {
			err := tok.do(ctx, "plant", func(c pkcs11API, s session) error {
				var tmpl []*pkcs11.Attribute
				for _, a := range hmacKeyTemplate(templateOptions{allowedMechanisms: caps.AllowedMechanisms}, len(value), hmacSecretID(id), label+"/hmac") {
					switch {
					case a.Type == pkcs11.CKA_VALUE_LEN:
					case readable && a.Type == pkcs11.CKA_SENSITIVE:
						tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false))
					case readable && a.Type == pkcs11.CKA_EXTRACTABLE:
						tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true))
					default:
						tmpl = append(tmpl, a)
					}
				}
				_, err := c.CreateObject(s.h, append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_VALUE, value)))
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		for name, p := range map[string]struct {
			size     int
			readable bool
		}{"readable": {32, true}, "of-another-size": {16, false}} {
			t.Run(name, func(t *testing.T) {
				label := "cmk/test/vouched-" + name + "-" + string(tk.Kind) + "/v1"
				id := newVersion(label)
				value := make([]byte, p.size)
				_, _ = rand.Read(value)
				plant(id, label, value, p.readable)
				if err := tok.EnsureHMACKey(ctx, id, label, 32, true); !errors.Is(err, ErrUntrustedObject) {
					t.Fatalf("a vouched-for secret %s was taken on %s: %v", name, tk.Kind, err)
				}
			})
		}
	})
}

func knownHMAC(key []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("data"))
	return m.Sum(nil)
}

// plantFromPassword generates, under version id's HMAC secret CKA_ID and label, a 32-byte generic secret from a
// password with PBKDF2 (CKM_PKCS5_PBKD2 through C_GenerateKey): whoever knows the password knows its value. It
// returns the HMAC-SHA256 of "data" under that value, computed in software.
func plantFromPassword(t *testing.T, tok *Token, id []byte, label string) []byte {
	t.Helper()
	const password, salt, iterations = "known password", "known salt", 1
	cPassword, cSalt, cPasswordLen := newCString(password), newCString(salt), newCString("lenbytes")
	defer cPassword.free()
	defer cSalt.free()
	defer cPasswordLen.free()
	binary.NativeEndian.PutUint64(unsafe.Slice((*byte)(cPasswordLen.ptr()), 8), uint64(len(password)))
	// CK_PKCS5_PBKD2_PARAMS: saltSource (CKZ_SALT_SPECIFIED), pSaltSourceData, ulSaltSourceDataLen, iterations,
	// prf (CKP_PKCS5_PBKD2_HMAC_SHA1), pPrfData, ulPrfDataLen, pPassword, ulPasswordLen (a pointer before v2.40).
	params := make([]byte, 72)
	for i, v := range []uint64{1, uint64(uintptr(cSalt.ptr())), uint64(len(salt)), iterations, 1, 0, 0, uint64(uintptr(cPassword.ptr())), uint64(uintptr(cPasswordLen.ptr()))} {
		binary.NativeEndian.PutUint64(params[8*i:], v)
	}
	err := tok.do(context.Background(), "plant from a password", func(c pkcs11API, s session) error {
		_, err := c.GenerateKey(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_PKCS5_PBKD2, params)}, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32), pkcs11.NewAttribute(pkcs11.CKA_ID, hmacSecretID(id)),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label+"/hmac"), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, true), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	key, err := pbkdf2.Key(sha1.New, password, []byte(salt), iterations, 32)
	if err != nil {
		t.Fatal(err)
	}
	return knownHMAC(key)
}
