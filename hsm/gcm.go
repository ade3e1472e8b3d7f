package hsm

import (
	"bytes"
	"context"
	"fmt"

	"github.com/miekg/pkcs11"
)

// GCM sizes shared with the ciphertext format.
const (
	GCMNonceSize = 12
	GCMTagSize   = 16
	// HMACKeySize is the size of the HMAC secret kept beside each version. Transit uses 32 bytes; tokens such as
	// SoftHSM refuse an HMAC key shorter than the hash output, so 64 bytes serve every SHA-2 HMAC up to SHA-512.
	HMACKeySize = 64
)

// EncryptGCM encrypts with the AES key of CKA_ID id under AES-GCM with the given 96-bit nonce and returns the
// nonce actually used (some HSMs substitute their own) and ciphertext‖tag.
func (t *Token) EncryptGCM(ctx context.Context, id, nonce, aad, plaintext []byte) (usedNonce, sealed []byte, err error) {
	if len(nonce) != GCMNonceSize {
		return nil, nil, fmt.Errorf("%w: GCM nonce must be %d bytes", ErrInvalidArgument, GCMNonceSize)
	}
	err = t.do(ctx, "AES-GCM encrypt", func(c pkcs11API, s session) error {
		h, release, err := t.aesKey(c, s, id)
		if err != nil {
			return err
		}
		defer release()
		params := pkcs11.NewGCMParams(nonce, nonEmpty(aad), GCMTagSize*8)
		defer params.Free()
		if err := c.EncryptInit(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, h); err != nil {
			return err
		}
		// The output's size is known: asking the module for it first is one call more, and NSS's answer leaves
		// out the tag.
		out, err := c.EncryptSized(s.h, plaintext, len(plaintext)+GCMTagSize)
		if err != nil {
			return err
		}
		if len(out) != len(plaintext)+GCMTagSize {
			return fmt.Errorf("AES-GCM encrypt: the token returned %d bytes for %d of plaintext", len(out), len(plaintext))
		}
		usedNonce = nonce
		if iv := params.IV(); len(iv) == GCMNonceSize && !bytes.Equal(iv, nonce) {
			usedNonce = iv
		}
		sealed = out
		return nil
	})
	return usedNonce, sealed, err
}

// DecryptGCM authenticates and decrypts ciphertext‖tag. A ciphertext the key does not authenticate gives
// ErrInvalidCiphertext. SoftHSM 2.6 reports a tag mismatch as CKR_GENERAL_ERROR, which is also what a failing
// device says: such an answer is asked again on another session before it is believed, so that a fault is never
// reported as a bad ciphertext.
func (t *Token) DecryptGCM(ctx context.Context, id, nonce, aad, sealed []byte) ([]byte, error) {
	if len(nonce) != GCMNonceSize {
		return nil, fmt.Errorf("%w: GCM nonce must be %d bytes", ErrInvalidArgument, GCMNonceSize)
	}
	if len(sealed) < GCMTagSize {
		return nil, ErrInvalidCiphertext
	}
	var plaintext []byte
	err := t.do(ctx, "AES-GCM decrypt", func(c pkcs11API, s session) error {
		h, release, err := t.aesKey(c, s, id)
		if err != nil {
			return err
		}
		defer release()
		params := pkcs11.NewGCMParams(nonce, nonEmpty(aad), GCMTagSize*8)
		defer params.Free()
		if err := c.DecryptInit(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, h); err != nil {
			return err
		}
		out, err := c.Decrypt(s.h, sealed)
		if err != nil {
			return ciphertextVerdict(err)
		}
		plaintext = out
		return nil
	})
	return plaintext, err
}

// ciphertextVerdict turns a decryption's refusal into ErrInvalidCiphertext where the code says the data is bad,
// and into errAmbiguousVerdict where the code is one a fault also gives (asked again before it is believed).
func ciphertextVerdict(err error) error {
	rv, ok := rvOf(err)
	if !ok {
		return err
	}
	switch rv {
	case pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE:
		return ErrInvalidCiphertext
	case pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_FUNCTION_FAILED:
		return fmt.Errorf("%w: %v", errAmbiguousVerdict, err)
	}
	return err
}

// nonEmpty turns an empty slice into nil: SoftHSM asserts on a non-NULL pointer with zero length.
func nonEmpty(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return b
}
