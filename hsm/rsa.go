package hsm

import (
	"context"
	"crypto"
	"crypto/subtle"
	"errors"
	"fmt"
	"hash"

	"github.com/miekg/pkcs11"
)

// DecryptRSA decrypts with the RSA key of id with OAEP of hash h (MGF1 of the same hash, empty label). Tokens
// whose OAEP lacks the hash (SoftHSM 2.6 offers SHA-1 only) get a raw RSA decryption and the padding is checked
// here, in constant time. PKCS#1 v1.5 is DecryptPKCS1v15.
func (t *Token) DecryptRSA(ctx context.Context, id []byte, h crypto.Hash, ciphertext []byte) ([]byte, error) {
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

// DecryptPKCS1v15 decrypts a PKCS#1 v1.5 ciphertext of the RSA key of id with implicit rejection: it returns the
// message where the padding is valid and rejection where it is not, never an error that depends on the padding.
// Tokens refuse bad padding with codes that also mean faults (SoftHSM 2.6 CKR_GENERAL_ERROR, opencryptoki
// CKR_FUNCTION_FAILED), which the recovery rules ask again on another session: a second private-key operation
// and a new session that timing shows. So the token makes one raw RSA decryption (CKM_RSA_X_509), which succeeds
// for any ciphertext below the modulus, and the padding is removed here, in constant time. ciphertext must be as
// long as the modulus and below it, and rejection at most 11 bytes shorter (the caller knows both publicly).
func (t *Token) DecryptPKCS1v15(ctx context.Context, id, ciphertext, rejection []byte) ([]byte, error) {
	if len(ciphertext) < 11 || len(rejection) > len(ciphertext)-11 {
		return nil, fmt.Errorf("%w: a %d-byte rejection message for a %d-byte ciphertext", ErrInvalidArgument, len(rejection), len(ciphertext))
	}
	raw, err := t.rsaDecrypt(ctx, id, pkcs11.NewMechanism(pkcs11.CKM_RSA_X_509, nil), ciphertext)
	if rv, ok := rvOf(err); ok && rv == pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED {
		err = fmt.Errorf("%w: %w", ErrMechanismUnsupported, err) // the key's allowed mechanisms lack raw RSA
	}
	if err != nil {
		return nil, err
	}
	defer clear(raw)
	em := leftPad(raw, len(ciphertext)) // some tokens drop the leading zero bytes of the raw result
	defer clear(em)
	return pkcs1v15UnpadOr(em, rejection), nil
}

// pkcs1v15UnpadOr is the message of em, the raw RSA result, where it has valid EME-PKCS1-v1_5 padding (RFC 8017
// §7.2.2: 00 02, at least 8 non-zero bytes, 00, the message), and rejection where it has not. Neither the
// checks nor the choice branch on em or on the verdict: both messages sit at the end of a block as long as em,
// and the block's bytes and the message's start are taken from one or the other with constant-time selects.
// Only the returned length depends on the choice, and the caller's answer shows that length anyway.
func pkcs1v15UnpadOr(em, rejection []byte) []byte {
	k := len(em)
	firstByteIsZero := subtle.ConstantTimeByteEq(em[0], 0)
	secondByteIsTwo := subtle.ConstantTimeByteEq(em[1], 2)
	// The separator is the first zero after the block type.
	lookingForIndex, index := 1, 0
	for i := 2; i < k; i++ {
		equals0 := subtle.ConstantTimeByteEq(em[i], 0)
		index = subtle.ConstantTimeSelect(lookingForIndex&equals0, i, index)
		lookingForIndex = subtle.ConstantTimeSelect(equals0, 0, lookingForIndex)
	}
	paddingLongEnough := subtle.ConstantTimeLessOrEq(2+8, index)
	valid := firstByteIsZero & secondByteIsTwo & (lookingForIndex ^ 1) & paddingLongEnough

	block := make([]byte, k)
	defer clear(block)
	copy(block[k-len(rejection):], rejection)
	for i := range block {
		block[i] = byte(subtle.ConstantTimeSelect(valid, int(em[i]), int(block[i])))
	}
	start := subtle.ConstantTimeSelect(valid, index+1, k-len(rejection))
	return append([]byte(nil), block[start:]...)
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
