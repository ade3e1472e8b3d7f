package keys

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// implicitRejectionLabel separates the derivation of a ciphertext's implicit-rejection key from every other use of
// the version's HMAC secret.
const implicitRejectionLabel = "cmk PKCS#1 v1.5 implicit rejection\x00"

// decryptPKCS1v15 decrypts an RSA PKCS#1 v1.5 ciphertext, for a key that opted in, with implicit rejection (the
// idea of draft-irtf-cfrg-rsa-implicit-rejection): a ciphertext whose padding is invalid decrypts to a
// pseudo-random message derived from the ciphertext under a secret of the version, never to an error, so that no
// answer of decrypt or rewrap tells valid padding from invalid (Bleichenbacher's oracle). The draft derives its
// key from the private exponent, which never leaves the HSM; here it is the version's HMAC secret, also in the
// HSM and reserved for this once the key opts in (hmacReserved): the derivation key is HMAC-SHA256(secret,
// label ‖ ciphertext). Valid or not, every ciphertext costs the same: one HMAC, the synthetic message, one raw
// RSA decryption, the padding removed and the message chosen in constant time (hsm's DecryptPKCS1v15). The HMAC
// is part of the decryption the door admitted, not a use of its own.
func (u *Use) decryptPKCS1v15(ctx context.Context, v int, ver *Version, raw []byte) ([]byte, error) {
	k := u.key
	if !k.AllowPKCS1v15Decryption {
		return nil, Callerf("PKCS#1 v1.5 decryption is refused for key %q: the validity of its padding is an oracle (Bleichenbacher) on every ciphertext of the key, OAEP ones included; set allow_pkcs1v15_decryption=true in keys/%s/config to accept it, answered with implicit rejection", k.Name, k.Name)
	}
	pub := ver.Public().(*rsa.PublicKey)
	modulus := pub.Size()
	if len(raw) != modulus { // public: says nothing of the padding
		return nil, Callerf("invalid ciphertext: %d bytes, key %q version %d takes %d", len(raw), k.Name, v, modulus)
	}
	if new(big.Int).SetBytes(raw).Cmp(pub.N) >= 0 { // public too: no RSA ciphertext is
		return nil, Callerf("invalid ciphertext: not below the modulus of key %q version %d", k.Name, v)
	}
	kdk, err := u.hmac(ctx, v, ver, "sha2-256", append([]byte(implicitRejectionLabel), raw...), false)
	if err != nil {
		return nil, err
	}
	defer clear(kdk)
	synthetic := syntheticMessage(kdk, modulus)
	defer clear(synthetic)
	pt, err := u.tok.DecryptPKCS1v15(ctx, ver.ID(), raw, synthetic)
	if errors.Is(err, hsm.ErrMechanismUnsupported) { // refused at C_DecryptInit, before the token saw the data
		return nil, Callerf("PKCS#1 v1.5 decryption with key %q version %d needs raw RSA (CKM_RSA_X_509), which the token refuses for this key (%v): the engine removes the padding itself so that invalid padding costs the same as valid; versions made before the engine listed raw RSA among an RSA key's allowed mechanisms, on a token that stores them, cannot serve it: rotate the key and use a new version", k.Name, v, err)
	}
	if err != nil {
		return nil, fmt.Errorf("decrypt with key %q version %d: %w", k.Name, v, err)
	}
	return pt, nil
}

// syntheticMessage is the message an invalid PKCS#1 v1.5 ciphertext decrypts to: drawn from kdk exactly as the
// message of a uniformly random block with valid padding (00 02, at least 8 non-zero bytes, a zero, the message),
// so that its length, which rewrap can reveal (a message too long for OAEP cannot be encrypted again), has the
// same distribution as the one a forged ciphertext with valid padding gives.
func syntheticMessage(kdk []byte, modulus int) []byte {
	const minPS = 8
	stream := func(counter uint32, n int) []byte {
		out := make([]byte, 0, n+sha256.Size)
		for block := uint32(0); len(out) < n; block++ {
			m := hmac.New(sha256.New, kdk)
			var c [8]byte
			binary.BigEndian.PutUint32(c[:4], counter)
			binary.BigEndian.PutUint32(c[4:], block)
			m.Write(c[:])
			out = m.Sum(out)
		}
		return out[:n]
	}
	body := modulus - 2 // the bytes after 00 02
	for counter := uint32(0); ; counter++ {
		// The first 8 padding bytes (non-zero in a valid block) do not bear on the message: only where the first
		// zero after them falls does.
		ps := stream(counter, body)
		if i := bytes.IndexByte(ps[minPS:], 0); i >= 0 {
			return ps[minPS+i+1:]
		}
		// No separator: not a valid block; draw the next, as a valid block is a random one given that it is valid.
	}
}
