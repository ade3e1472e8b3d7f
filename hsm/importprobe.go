package hsm

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"fmt"

	"github.com/miekg/pkcs11"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/byoktest"
)

// Imports reports whether the token can take versions of alg by import (BYOK), and if not, why. Making and using
// keys of a type (Serves) does not imply it: SoftHSM 2.6 generates and uses Ed25519 keys but cannot unwrap one.
func (c *Capabilities) Imports(alg Algorithm) (bool, string) {
	if c.KeyWrap == 0 {
		return false, "the token offers no AES key wrap with padding (RFC 5649: CKM_AES_KEY_WRAP_KWP) to unwrap imported keys"
	}
	if why, ok := c.importRefused[alg]; ok {
		return false, why
	}
	return true, ""
}

// probeEd25519Import unwraps a throwaway Ed25519 private key (PKCS#8, wrapped as `vault transit import` wraps
// it) into a session object, and says why not if the token refuses. Nothing reaches the token's store.
func (t *Token) probeEd25519Import(ctx context.Context, c *Capabilities) (string, error) {
	_, throwaway, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", err
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(throwaway)
	if err != nil {
		return "", err
	}
	kek := make([]byte, 32)
	if _, err := rand.Read(kek); err != nil {
		return "", err
	}
	defer clear(kek)
	wrapped, err := byoktest.WrapKWP(kek, pkcs8)
	if err != nil {
		return "", err
	}
	o := templateOptions{allowedMechanisms: c.AllowedMechanisms}
	tmpl := importTemplate(o, false, false, ImportRequest{Algorithm: Ed25519, ID: []byte("cmk-import-probe"), Label: "cmk-import-probe"})
	for i, a := range tmpl {
		if a.Type == pkcs11.CKA_TOKEN {
			tmpl[i] = pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false) // a session object
		}
	}
	refused := ""
	err = t.do(ctx, "probe Ed25519 import", func(p pkcs11API, s session) error {
		refused = ""
		unwrapKey, err := p.CreateObject(s.h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false), pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, kek),
		})
		if err != nil {
			if classify(err) != classOther {
				return err
			}
			return nil // cannot ask: the import itself will say what the token answers
		}
		defer func() { _ = p.DestroyObject(s.h, unwrapKey) }()
		h, err := p.UnwrapKey(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(c.KeyWrap, nil)}, unwrapKey, wrapped, tmpl)
		if err != nil {
			if classify(err) != classOther {
				return err
			}
			refused = fmt.Sprintf("the token cannot unwrap Ed25519 private keys (a valid PKCS#8 key was refused: %v): it generates and uses them, but cannot import them", err)
			return nil
		}
		_ = p.DestroyObject(s.h, h)
		return nil
	})
	return refused, err
}
