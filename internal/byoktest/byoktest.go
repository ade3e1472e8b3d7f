// Package byoktest wraps key material for import exactly as `vault transit import` does, so tests can exercise
// BYOK without the CLI: an ephemeral AES-256 key wrapped with RSA-OAEP under the mount's wrapping key, followed
// by the target key wrapped with AES key wrap with padding (RFC 5649) under the ephemeral key.
package byoktest

import (
	"crypto"
	"crypto/aes"
	"crypto/rand"
	"crypto/rsa"
	"encoding/binary"
	"errors"
)

// Wrap returns RSA-OAEP(hash, ephemeral) ‖ KWP(ephemeral, key).
func Wrap(wrapping *rsa.PublicKey, h crypto.Hash, key []byte) ([]byte, error) {
	ephemeral := make([]byte, 32)
	if _, err := rand.Read(ephemeral); err != nil {
		return nil, err
	}
	wrappedEphemeral, err := rsa.EncryptOAEP(h.New(), rand.Reader, wrapping, ephemeral, nil)
	if err != nil {
		return nil, err
	}
	wrappedKey, err := WrapKWP(ephemeral, key)
	if err != nil {
		return nil, err
	}
	return append(wrappedEphemeral, wrappedKey...), nil
}

// WrapKWP is AES key wrap with padding, RFC 5649 §4.1.
func WrapKWP(kek, plaintext []byte) ([]byte, error) {
	if len(plaintext) == 0 {
		return nil, errors.New("nothing to wrap")
	}
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	padded := make([]byte, (len(plaintext)+7)/8*8)
	copy(padded, plaintext)
	var a [8]byte
	binary.BigEndian.PutUint32(a[:4], 0xA65959A6)
	binary.BigEndian.PutUint32(a[4:], uint32(len(plaintext)))
	n := len(padded) / 8
	if n == 1 {
		out := make([]byte, 16)
		block.Encrypt(out, append(a[:], padded...))
		return out, nil
	}
	r := padded
	buf := make([]byte, 16)
	for j := 0; j < 6; j++ {
		for i := 0; i < n; i++ {
			copy(buf, a[:])
			copy(buf[8:], r[i*8:i*8+8])
			block.Encrypt(buf, buf)
			t := uint64(n*j + i + 1)
			binary.BigEndian.PutUint64(a[:], binary.BigEndian.Uint64(buf[:8])^t)
			copy(r[i*8:], buf[8:])
		}
	}
	return append(a[:], r...), nil
}
