package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/big"
	"testing"

	"github.com/miekg/pkcs11"
)

// servedOp is an operation with a key version of some algorithm the token serves, whose result shows which key
// made it: so that tests of the recovery rules run on every token, whatever it offers (opencryptoki has no
// AES-GCM, tpm2-pkcs11 no secret keys).
type servedOp struct {
	alg Algorithm
	tok *Token
	pub map[string]crypto.PublicKey
}

var testData = []byte("made by which key?")

// anyServedOp picks the first of AES-256, HMAC and ECDSA P-256 the token serves.
func anyServedOp(t *testing.T, tok *Token) *servedOp {
	t.Helper()
	caps, err := tok.Capabilities(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, alg := range []Algorithm{AES256, HMACOnly, ECDSAP256} {
		if ok, _ := caps.Serves(alg); ok {
			return &servedOp{alg: alg, tok: tok, pub: map[string]crypto.PublicKey{}}
		}
	}
	t.Fatal("the token serves none of AES-256, HMAC and ECDSA P-256")
	return nil
}

// version makes a version and returns its CKA_ID.
func (o *servedOp) version(t *testing.T) []byte {
	t.Helper()
	id := randomID(t)
	hmacBytes := 0
	if o.alg == HMACOnly {
		hmacBytes = 64
	}
	pub, err := o.tok.GenerateVersion(context.Background(), o.alg, id, "cmk/test/served/"+string(o.alg), hmacBytes)
	if err != nil {
		t.Fatal(err)
	}
	o.pub[string(id)] = pub
	t.Cleanup(func() { _, _ = o.tok.DestroyKeys(context.Background(), id) })
	return id
}

// use runs the operation with version id through the Token.
func (o *servedOp) use(id []byte) ([]byte, error) {
	ctx := context.Background()
	switch o.alg {
	case AES256:
		_, sealed, err := o.tok.EncryptGCM(ctx, id, make([]byte, GCMNonceSize), nil, testData)
		return sealed, err
	case HMACOnly:
		return o.tok.HMAC(ctx, id, crypto.SHA256, testData)
	}
	d := sha256.Sum256(testData)
	return o.tok.SignECDSA(ctx, id, d[:])
}

// raw makes the operation's calls on a session as the Token does, with object handle h.
func (o *servedOp) raw(c pkcs11API, s session, h pkcs11.ObjectHandle) ([]byte, error) {
	switch o.alg {
	case AES256:
		params := pkcs11.NewGCMParams(make([]byte, GCMNonceSize), nil, GCMTagSize*8)
		defer params.Free()
		if err := c.EncryptInit(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, h); err != nil {
			return nil, err
		}
		return c.EncryptSized(s.h, testData, len(testData)+GCMTagSize)
	case HMACOnly:
		if err := c.SignInit(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA256_HMAC, nil)}, h); err != nil {
			return nil, err
		}
		return c.Sign(s.h, testData)
	}
	d := sha256.Sum256(testData)
	if err := c.SignInit(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, h); err != nil {
		return nil, err
	}
	return c.Sign(s.h, d[:])
}

// kind is the object kind holding the operation's key.
func (o *servedOp) kind() keyKind { return o.alg.kind() }

// madeBy reports an error unless out was made by version id's key.
func (o *servedOp) madeBy(id, out []byte) error {
	ctx := context.Background()
	switch o.alg {
	case AES256:
		pt, err := o.tok.DecryptGCM(ctx, id, make([]byte, GCMNonceSize), nil, out)
		if err != nil || !bytes.Equal(pt, testData) {
			return fmt.Errorf("does not decrypt with its key: %v", err)
		}
		return nil
	case HMACOnly:
		mac, err := o.tok.HMAC(ctx, id, crypto.SHA256, testData)
		if err != nil || !bytes.Equal(mac, out) {
			return fmt.Errorf("is not its key's HMAC: %v", err)
		}
		return nil
	}
	d := sha256.Sum256(testData)
	half := len(out) / 2
	if !ecdsa.Verify(o.pub[string(id)].(*ecdsa.PublicKey), d[:], new(big.Int).SetBytes(out[:half]), new(big.Int).SetBytes(out[half:])) {
		return errors.New("does not verify with its key")
	}
	return nil
}
