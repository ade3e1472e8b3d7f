package keys

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"math/big"
	"strconv"
	"strings"
)

// Signing, signature verification, HMAC and CSRs with a key's versions, in Transit's formats.

// hashes are Transit's hash names for sign, verify and hmac.
var hashes = map[string]crypto.Hash{
	"sha1": crypto.SHA1, "sha2-224": crypto.SHA224, "sha2-256": crypto.SHA256, "sha2-384": crypto.SHA384,
	"sha2-512": crypto.SHA512, "sha3-224": crypto.SHA3_224, "sha3-256": crypto.SHA3_256, "sha3-384": crypto.SHA3_384,
	"sha3-512": crypto.SHA3_512,
}

// HashNamed is the hash Transit names name.
func HashNamed(name string) (crypto.Hash, bool) {
	h, ok := hashes[name]
	return h, ok
}

// SignOptions are a request's signature settings.
type SignOptions struct {
	Hash       crypto.Hash
	Prehashed  bool   // the input is the digest (not for ed25519)
	PSS        bool   // RSA: PSS, else PKCS#1 v1.5
	JWS        bool   // ECDSA: r‖s in base64url without padding, else ASN.1 in base64
	SaltLength string // RSA-PSS: "auto", "hash" or a number of bytes
}

func (o SignOptions) encoding() *base64.Encoding {
	if o.JWS {
		return base64.RawURLEncoding
	}
	return base64.StdEncoding
}

// digest is what gets signed: the input's hash, or the input itself when prehashed.
func (o SignOptions) digest(input []byte) ([]byte, error) {
	if o.Prehashed {
		if len(input) != o.Hash.Size() {
			return nil, Callerf("prehashed input is %d bytes; %v digests are %d", len(input), o.Hash, o.Hash.Size())
		}
		return input, nil
	}
	h := o.Hash.New()
	h.Write(input)
	return h.Sum(nil), nil
}

// pssSalt resolves SaltLength for an RSA key of the given size. auto means the largest salt when signing and any
// salt when verifying, as Go's (and Transit's) rsa.PSSSaltLengthAuto.
func (o SignOptions) pssSalt(pub *rsa.PublicKey, signing bool) (int, error) {
	maxSalt := (pub.N.BitLen()-1+7)/8 - o.Hash.Size() - 2
	switch strings.ToLower(o.SaltLength) {
	case "", "auto":
		if signing {
			return maxSalt, nil
		}
		return rsa.PSSSaltLengthAuto, nil
	case "hash":
		return o.Hash.Size(), nil
	}
	n, err := strconv.Atoi(o.SaltLength)
	if err != nil {
		return 0, Callerf("salt_length must be auto, hash or a number, not %q", o.SaltLength)
	}
	if n == rsa.PSSSaltLengthEqualsHash {
		return o.Hash.Size(), nil
	}
	if n < 0 || n > maxSalt {
		return 0, Callerf("salt_length %d is invalid: 0 to %d for this key and hash", n, maxSalt)
	}
	return n, nil
}

// Sign signs input with version (0 = latest) in the HSM and returns Transit's signature and the version used.
func (u *Use) Sign(ctx context.Context, input []byte, version int, o SignOptions) (string, int, error) {
	if err := u.serves("sign", OpSign); err != nil {
		return "", 0, err
	}
	k := u.key
	v, ver, err := k.EncryptionVersion(version)
	if err != nil {
		return "", 0, err
	}
	if err := k.Private(v, "sign"); err != nil {
		return "", 0, err
	}
	sig, err := u.sign(ctx, ver, o, input)
	if err != nil {
		return "", 0, err
	}
	u.m.noteVersion(ctx, u.s, k, v, ver, true)
	return FormatVersioned(v, sig, o.encoding()), v, nil
}

// sign makes the signature bytes in the HSM.
func (u *Use) sign(ctx context.Context, ver *Version, o SignOptions, input []byte) ([]byte, error) {
	if ver.Type == TypeEd25519 {
		if o.Prehashed {
			return nil, errEd25519Prehashed
		}
		return u.tok.SignEd25519(ctx, ver.ID(), input)
	}
	digest, err := o.digest(input)
	if err != nil {
		return nil, err
	}
	switch {
	case ver.Type.IsRSA() && o.PSS:
		salt, err := o.pssSalt(ver.Public().(*rsa.PublicKey), true)
		if err != nil {
			return nil, err
		}
		return u.tok.SignPSS(ctx, ver.ID(), o.Hash, digest, salt)
	case ver.Type.IsRSA():
		return u.tok.SignPKCS1v15(ctx, ver.ID(), o.Hash, digest)
	}
	raw, err := u.tok.SignECDSA(ctx, ver.ID(), digest)
	if err != nil {
		return nil, err
	}
	if o.JWS {
		return raw, nil
	}
	return ecdsaASN1(raw)
}

// errEd25519Prehashed: Ed25519 signs (and verifies) the input itself, never a digest of it.
var errEd25519Prehashed = Callerf("prehashed is not supported with ed25519: it signs the input itself")

// ecdsaASN1 turns the token's r‖s into the ASN.1 SEQUENCE Transit and X.509 use.
func ecdsaASN1(raw []byte) ([]byte, error) {
	half := len(raw) / 2
	return asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(raw[:half]), new(big.Int).SetBytes(raw[half:])})
}

// VerifySignature checks a signature of k (Transit's form) with the version's public key. Checking needs no
// secret, so the standard library does it, and no use of key material is admitted for it.
func (k *Key) VerifySignature(signature string, input []byte, o SignOptions) (bool, error) {
	v, sig, err := ParseVersioned("signature", signature, o.encoding())
	if err != nil {
		return false, Callerf("%s", err.Error())
	}
	ver, err := k.DecryptionVersion(v, "signature")
	if err != nil {
		return false, err
	}
	if ver.Type == TypeEd25519 {
		if o.Prehashed {
			return false, errEd25519Prehashed
		}
		return ed25519.Verify(ver.Public().(ed25519.PublicKey), input, sig), nil
	}
	digest, err := o.digest(input)
	if err != nil {
		return false, err
	}
	switch pub := ver.Public().(type) {
	case *rsa.PublicKey:
		if !o.PSS {
			return rsa.VerifyPKCS1v15(pub, o.Hash, digest, sig) == nil, nil
		}
		salt, err := o.pssSalt(pub, false)
		if err != nil {
			return false, err
		}
		return rsa.VerifyPSS(pub, o.Hash, digest, sig, &rsa.PSSOptions{SaltLength: salt}) == nil, nil
	case *ecdsa.PublicKey:
		if !o.JWS {
			return ecdsa.VerifyASN1(pub, digest, sig), nil
		}
		size := (pub.Curve.Params().BitSize + 7) / 8
		if len(sig) != 2*size {
			return false, nil
		}
		return ecdsa.Verify(pub, digest, new(big.Int).SetBytes(sig[:size]), new(big.Int).SetBytes(sig[size:])), nil
	}
	return false, fmt.Errorf("version %d of key %q has no public key", v, k.Name)
}

// hmacReserved refuses a caller's HMAC (hmac, verify with hmac) with a key whose HMAC secrets serve PKCS#1 v1.5
// implicit rejection: an HMAC of label ‖ ciphertext is the derivation key of that ciphertext's synthetic message,
// and whoever knows the synthetic message tells valid padding from invalid (the message, or its length through
// rewrap's "message too long"), which is Bleichenbacher's oracle.
func (k *Key) hmacReserved() error {
	if k.AllowPKCS1v15Decryption {
		return Callerf("key %q serves no hmac or verify with hmac: allow_pkcs1v15_decryption=true reserves its versions' HMAC secrets for PKCS#1 v1.5 implicit rejection, whose messages an HMAC under them would predict", k.Name)
	}
	return nil
}

// HMAC computes the HMAC of input with version's (0 = latest) HMAC secret in the HSM, hashName naming the hash as
// Transit does, and returns it in Transit's form.
func (u *Use) HMAC(ctx context.Context, input []byte, version int, hashName string) (string, error) {
	if err := u.serves("compute an HMAC", OpHMAC); err != nil {
		return "", err
	}
	v, ver, err := u.key.EncryptionVersion(version)
	if err != nil {
		return "", err
	}
	mac, err := u.hmac(ctx, v, ver, hashName, input, true)
	if err != nil {
		return "", err
	}
	u.m.noteVersion(ctx, u.s, u.key, v, ver, true)
	return FormatVersioned(v, mac, base64.StdEncoding), nil
}

// VerifyHMAC recomputes the HMAC that given (Transit's form) names in the HSM and compares in constant time.
func (u *Use) VerifyHMAC(ctx context.Context, given string, input []byte, hashName string) (bool, error) {
	if err := u.serves("verify an HMAC", OpVerify); err != nil {
		return false, err
	}
	if err := u.key.hmacReserved(); err != nil {
		return false, err
	}
	v, mac, err := ParseVersioned("hmac", given, base64.StdEncoding)
	if err != nil {
		return false, Callerf("%s", err.Error())
	}
	ver, err := u.key.DecryptionVersion(v, "hmac")
	if err != nil {
		return false, err
	}
	want, err := u.hmac(ctx, v, ver, hashName, input, true)
	if err != nil {
		return false, err
	}
	valid := hmac.Equal(want, mac)
	if valid { // a forged HMAC naming an old version does not keep it in use
		u.m.noteVersion(ctx, u.s, u.key, v, ver, false)
	}
	return valid, nil
}

// hmac computes the HMAC of input with version v's HMAC secret, making the secret first if the version has none
// yet (under the key's lock, where the version's state is checked again). forCaller: the HMAC is a caller's (hmac,
// verify), refused once the key reserves its secrets (hmacReserved), also when it opts in while this request runs;
// otherwise it is the engine's own (implicit rejection).
func (u *Use) hmac(ctx context.Context, v int, ver *Version, hashName string, input []byte, forCaller bool) ([]byte, error) {
	h, ok := hashes[hashName]
	if !ok {
		return nil, Callerf("unsupported hash algorithm %q", hashName)
	}
	k := u.key
	if err := k.Private(v, "compute an HMAC"); err != nil {
		return nil, err
	}
	if ver.HMACDeferred {
		if _, err := u.m.Update(ctx, u.s, k.Name, u.caller.Actor, func(tx *Tx) error {
			if forCaller {
				if err := tx.Key.hmacReserved(); err != nil {
					return err
				}
			}
			return tx.EnsureHMACSecret(v, forCaller)
		}); err != nil {
			return nil, err
		}
	}
	return u.tok.HMAC(ctx, ver.ID(), h, input)
}

// SignCSR makes a PKCS#10 request for version (0 = latest) from tmpl (subject, names, extensions), carrying the
// version's public key and signed by its private key in the HSM. Returns the DER.
func (u *Use) SignCSR(ctx context.Context, version int, tmpl *x509.CertificateRequest) ([]byte, error) {
	if err := u.serves("sign a CSR", OpCSR); err != nil {
		return nil, err
	}
	k := u.key
	n, ver, err := k.EncryptionVersion(version) // sign's rule: nothing below min_encryption_version signs
	if err != nil {
		return nil, err
	}
	if err := k.Private(n, "sign a CSR"); err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, &signer{ctx: ctx, u: u, ver: ver})
	if err != nil {
		return nil, fmt.Errorf("CSR for key %q version %d: %w", k.Name, n, err)
	}
	u.m.noteVersion(ctx, u.s, k, n, ver, true)
	return der, nil
}

// signer is a key version as a crypto.Signer whose private half is used in the HSM only: what the standard library
// needs to build a CSR around it.
type signer struct {
	ctx context.Context
	u   *Use
	ver *Version
}

func (s *signer) Public() crypto.PublicKey { return s.ver.Public() }

func (s *signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	id, tok := s.ver.ID(), s.u.tok
	switch s.ver.Public().(type) {
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			salt := pss.SaltLength
			if salt == rsa.PSSSaltLengthEqualsHash || salt == rsa.PSSSaltLengthAuto {
				salt = pss.Hash.Size()
			}
			return tok.SignPSS(s.ctx, id, pss.Hash, digest, salt)
		}
		return tok.SignPKCS1v15(s.ctx, id, opts.HashFunc(), digest)
	case *ecdsa.PublicKey:
		raw, err := tok.SignECDSA(s.ctx, id, digest)
		if err != nil {
			return nil, err
		}
		return ecdsaASN1(raw)
	case ed25519.PublicKey:
		if opts.HashFunc() != 0 {
			return nil, errors.New("Ed25519 signs messages, not digests")
		}
		return tok.SignEd25519(s.ctx, id, digest)
	}
	return nil, fmt.Errorf("key type %s cannot sign", s.ver.Type)
}
