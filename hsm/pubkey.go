package hsm

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/sha256"
	"encoding/asn1"
	"fmt"
	"math/big"

	"github.com/miekg/pkcs11"
)

// importedCurvePublicKey finds the public key of an imported EC or Ed25519 private key. It checks the curve,
// then reads CKA_EC_POINT where the token keeps it on the private object; otherwise, for ECDSA, it recovers the
// point from two signatures made by the key (public arithmetic only: no secret leaves the token).
func (t *Token) importedCurvePublicKey(p pkcs11API, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle, alg Algorithm) (crypto.PublicKey, error) {
	want := oidEd25519DER
	if alg != Ed25519 {
		_, want = alg.curve()
	}
	a, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, nil)})
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(a[0].Value, want) && !(alg == Ed25519 && isEd25519Name(a[0].Value)) {
		return nil, fmt.Errorf("%w: the imported key is on another curve than %s", ErrInvalidArgument, alg)
	}
	if a, err := p.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil)}); err == nil && len(a[0].Value) > 0 {
		point := a[0].Value
		var inner []byte
		if rest, err := asn1.Unmarshal(point, &inner); err == nil && len(rest) == 0 {
			point = inner
		}
		if alg == Ed25519 {
			if len(point) != ed25519.PublicKeySize {
				return nil, fmt.Errorf("Ed25519 public key of %d bytes", len(point))
			}
			return ed25519.PublicKey(point), nil
		}
		return ecdsaPublicKey(alg, point)
	}
	if alg == Ed25519 {
		return nil, fmt.Errorf("%w: the token does not reveal the public key of an imported Ed25519 key, and it cannot be derived from signatures", ErrMechanismUnsupported)
	}
	curve, _ := alg.curve()
	sign := func(msg string) ([]byte, []byte, error) {
		d := sha256.Sum256([]byte(msg))
		if err := p.SignInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, h); err != nil {
			return nil, nil, err
		}
		sig, err := p.Sign(sh, d[:])
		return d[:], sig, err
	}
	d1, s1, err := sign("cmk public key recovery 1")
	if err != nil {
		return nil, err
	}
	d2, s2, err := sign("cmk public key recovery 2")
	if err != nil {
		return nil, err
	}
	size := (curve.Params().BitSize + 7) / 8
	r2, ss2 := new(big.Int).SetBytes(s2[:size]), new(big.Int).SetBytes(s2[size:])
	for _, q := range recoverECDSA(curve, d1, s1) {
		if ecdsa.Verify(q, d2, r2, ss2) {
			return q, nil
		}
	}
	return nil, fmt.Errorf("could not recover the public key of the imported %s key", alg)
}

func isEd25519Name(params []byte) bool {
	var s string
	_, err := asn1.Unmarshal(params, &s)
	return err == nil && s == "edwards25519"
}

// recoverECDSA returns the public keys that could have made signature r‖s over digest (SEC 1 §4.1.6).
func recoverECDSA(curve elliptic.Curve, digest, sig []byte) []*ecdsa.PublicKey {
	params := curve.Params()
	size := (params.BitSize + 7) / 8
	if len(sig) != 2*size {
		return nil
	}
	r, s := new(big.Int).SetBytes(sig[:size]), new(big.Int).SetBytes(sig[size:])
	n, pp := params.N, params.P
	e := hashToInt(digest, n)
	rInv := new(big.Int).ModInverse(r, n)
	if rInv == nil {
		return nil
	}
	var out []*ecdsa.PublicKey
	for j := 0; j < 2; j++ {
		x := new(big.Int).Add(r, new(big.Int).Mul(big.NewInt(int64(j)), n))
		if x.Cmp(pp) >= 0 {
			break
		}
		// y² = x³ - 3x + b (mod p) on the NIST curves.
		y2 := new(big.Int).Exp(x, big.NewInt(3), pp)
		y2.Sub(y2, new(big.Int).Mul(big.NewInt(3), x))
		y2.Add(y2, params.B)
		y2.Mod(y2, pp)
		y := new(big.Int).ModSqrt(y2, pp)
		if y == nil {
			continue
		}
		for _, yy := range []*big.Int{y, new(big.Int).Sub(pp, y)} {
			// Q = r⁻¹(sR − eG)
			//lint:ignore SA1019 public-point arithmetic on values the token returned; crypto/ecdh offers none
			sRx, sRy := curve.ScalarMult(x, yy, s.Bytes())
			negE := new(big.Int).Mod(new(big.Int).Neg(e), n)
			//lint:ignore SA1019 as above
			eGx, eGy := curve.ScalarBaseMult(negE.Bytes())
			//lint:ignore SA1019 as above
			sumX, sumY := curve.Add(sRx, sRy, eGx, eGy)
			//lint:ignore SA1019 as above
			qx, qy := curve.ScalarMult(sumX, sumY, rInv.Bytes())
			out = append(out, &ecdsa.PublicKey{Curve: curve, X: qx, Y: qy})
		}
	}
	return out
}

// hashToInt is ECDSA's conversion of a digest to an integer: its leftmost bits, as many as the order has.
func hashToInt(digest []byte, n *big.Int) *big.Int {
	orderBits := n.BitLen()
	orderBytes := (orderBits + 7) / 8
	if len(digest) > orderBytes {
		digest = digest[:orderBytes]
	}
	ret := new(big.Int).SetBytes(digest)
	if excess := len(digest)*8 - orderBits; excess > 0 {
		ret.Rsh(ret, uint(excess))
	}
	return ret
}
