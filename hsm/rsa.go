package hsm

import (
	"context"
	"crypto"
	"crypto/subtle"
	"errors"
	"hash"

	"github.com/miekg/pkcs11"
)

// DecryptRSA decrypts with the RSA key of id: OAEP with hash h (MGF1 of the same hash, empty label), or
// PKCS#1 v1.5 when h is 0. Tokens whose OAEP lacks the hash (SoftHSM 2.6 offers SHA-1 only) get a raw RSA
// decryption and the padding is checked here, in constant time.
func (t *Token) DecryptRSA(ctx context.Context, id []byte, h crypto.Hash, ciphertext []byte) ([]byte, error) {
	if h == 0 {
		return t.rsaDecrypt(ctx, id, pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil), ciphertext)
	}
	info, err := lookupHash(h)
	if err != nil {
		return nil, err
	}
	if _, raw := t.rawOAEP.Load(h); !raw {
		params := pkcs11.NewOAEPParams(info.mech, info.mgf, pkcs11.CKZ_DATA_SPECIFIED, nil)
		pt, err := t.rsaDecrypt(ctx, id, pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, params), ciphertext)
		if !errors.Is(err, ErrMechanismUnsupported) && !isArgumentsBad(err) {
			return pt, err
		}
		t.rawOAEP.Store(h, true) // the token's OAEP lacks this hash: remember, do not ask again
		t.log.Debug("token lacks OAEP with this hash; decrypting raw and checking the padding in the plugin", "hash", h.String())
	}
	raw, err := t.rsaDecrypt(ctx, id, pkcs11.NewMechanism(pkcs11.CKM_RSA_X_509, nil), ciphertext)
	if err != nil {
		return nil, err
	}
	defer clear(raw)
	em := leftPad(raw, len(ciphertext)) // some tokens drop the leading zero bytes of the raw result
	defer clear(em)
	return oaepUnpad(h.New(), em)
}

func isArgumentsBad(err error) bool {
	rv, ok := rvOf(err)
	return ok && rv == pkcs11.CKR_ARGUMENTS_BAD
}

func (t *Token) rsaDecrypt(ctx context.Context, id []byte, mech *pkcs11.Mechanism, ciphertext []byte) ([]byte, error) {
	var out []byte
	err := t.do(ctx, "RSA decrypt", func(c pkcs11API, s session) error {
		h, err := t.findKey(c, s, kindRSA, id)
		if err != nil {
			return err
		}
		if err := c.DecryptInit(s.h, []*pkcs11.Mechanism{mech}, h); err != nil {
			return err
		}
		out, err = c.Decrypt(s.h, ciphertext)
		if err != nil {
			return ciphertextVerdict(err)
		}
		return nil
	})
	return out, err
}

// oaepUnpad checks and removes EME-OAEP padding (RFC 8017 §7.1.2, empty label) from em, the raw RSA result,
// without branching on secret data until the single verdict, so that it gives no padding oracle.
func oaepUnpad(h hash.Hash, em []byte) ([]byte, error) {
	hLen := h.Size()
	k := len(em)
	if k < 2*hLen+2 {
		return nil, ErrInvalidCiphertext
	}
	defer scrubHash(h) // mgf1XOR leaves the seed in the hash's partial block
	h.Reset()
	lHash := h.Sum(nil)
	firstByteIsZero := subtle.ConstantTimeByteEq(em[0], 0)
	seed := make([]byte, hLen)
	db := make([]byte, k-hLen-1)
	copy(seed, em[1:1+hLen])
	copy(db, em[1+hLen:])
	defer clear(seed)
	defer clear(db)
	mgf1XOR(seed, h, db)
	mgf1XOR(db, h, seed)
	lHashGood := subtle.ConstantTimeCompare(db[:hLen], lHash)
	// The rest of db is zero or more 0x00 bytes, one 0x01, then the message.
	var lookingForIndex, index, invalid int
	lookingForIndex = 1
	rest := db[hLen:]
	for i := 0; i < len(rest); i++ {
		equals0 := subtle.ConstantTimeByteEq(rest[i], 0)
		equals1 := subtle.ConstantTimeByteEq(rest[i], 1)
		index = subtle.ConstantTimeSelect(lookingForIndex&equals1, i, index)
		lookingForIndex = subtle.ConstantTimeSelect(equals1, 0, lookingForIndex)
		invalid = subtle.ConstantTimeSelect(lookingForIndex&^equals0, 1, invalid)
	}
	if firstByteIsZero&lHashGood&^invalid&^lookingForIndex != 1 {
		return nil, ErrInvalidCiphertext
	}
	return append([]byte(nil), rest[index+1:]...), nil
}

// scrubHash overwrites the partial block a hash keeps of its last input (the OAEP seed here: with the masked
// data, it gives the plaintext) for hashes that buffer it, as the standard library's do: after a Reset, a write
// shorter than a block is copied to the start of the buffer.
func scrubHash(h hash.Hash) {
	h.Reset()
	h.Write(make([]byte, h.BlockSize()-1))
	h.Reset()
}

// mgf1XOR xors out with MGF1(seed) using h.
func mgf1XOR(out []byte, h hash.Hash, seed []byte) {
	var counter [4]byte
	var digest []byte
	done := 0
	for done < len(out) {
		h.Reset()
		h.Write(seed)
		h.Write(counter[:])
		digest = h.Sum(digest[:0])
		for i := 0; i < len(digest) && done < len(out); i++ {
			out[done] ^= digest[i]
			done++
		}
		for i := 3; i >= 0; i-- {
			counter[i]++
			if counter[i] != 0 {
				break
			}
		}
	}
	clear(digest)
}
