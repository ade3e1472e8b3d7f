package keys

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// The use of keys: the model chooses the version, counts encryptions and rotates for usage, calls the HSM and
// writes Transit's formats. The only way to key material is a Use, which Manager.Use hands out once the door
// (Admit) has admitted the caller for an operation; handlers parse the request, call a Use's methods per item,
// and format the response.

// Crypto is what a use of key material asks of the HSM; the material never leaves the token.
type Crypto interface {
	EncryptGCM(ctx context.Context, id, nonce, aad, plaintext []byte) (usedNonce, sealed []byte, err error)
	DecryptGCM(ctx context.Context, id, nonce, aad, sealed []byte) ([]byte, error)
	DecryptRSA(ctx context.Context, id []byte, h crypto.Hash, ciphertext []byte) ([]byte, error)
	DecryptPKCS1v15(ctx context.Context, id, ciphertext, rejection []byte) ([]byte, error)
	SignPKCS1v15(ctx context.Context, id []byte, h crypto.Hash, digest []byte) ([]byte, error)
	SignPSS(ctx context.Context, id []byte, h crypto.Hash, digest []byte, saltLen int) ([]byte, error)
	SignECDSA(ctx context.Context, id, digest []byte) ([]byte, error)
	SignEd25519(ctx context.Context, id, message []byte) ([]byte, error)
	HMAC(ctx context.Context, id []byte, h crypto.Hash, data []byte) ([]byte, error)
	GenerateRandom(ctx context.Context, n int) ([]byte, error)
	PoolSize() int // sessions the token serves at once: how many items of a batch may run together
}

// Use is a use of a key admitted by the door for one operation and one request. Its methods do the per-item work
// and may run in parallel (a batch's items).
type Use struct {
	m      *Manager
	s      logical.Storage
	key    *Key // the snapshot the request uses (after adopting the versions it names)
	op     Operation
	caller Caller
	tok    Crypto
	nonces *Nonces
}

// Use loads key name, checks that it serves op, and admits caller's use of it for op on items items (a batch is
// judged once, for all its items).
func (m *Manager) Use(ctx context.Context, s logical.Storage, name string, c Caller, op Operation, items int) (*Use, error) {
	k, err := m.Usable(ctx, s, name, op)
	if err != nil {
		return nil, err
	}
	tok, nonces, err := m.token(ctx, s)
	if err != nil {
		return nil, err
	}
	if err := k.refuses(op); err != nil {
		return nil, err
	}
	if c.Actor, err = m.withAccessorHMAC(ctx, s, c.Actor); err != nil {
		return nil, err
	}
	if err := m.admitCounted(ctx, s, k, c, op, items); err != nil {
		return nil, err
	}
	return &Use{m: m, s: s, key: k, op: op, caller: c, tok: tok, nonces: nonces}, nil
}

// admitCounted is the door with every outcome counted: the use is judged for anomalies first (anomaly.go), so
// that the key's action applies to the request that crossed the line, then admitted or denied (Admit), and
// counted in the key's usage analytics, items uses or denials (analytics.go). An error that is no denial (the
// identity store or storage unreachable) is neither.
func (m *Manager) admitCounted(ctx context.Context, s logical.Storage, k *Key, c Caller, op Operation, items int) error {
	counting := m.AnalyticsOn()
	if counting {
		for _, a := range m.judgeUse(ctx, s, k, c.Actor, op, items) {
			m.actOn(ctx, s, c.Actor, a)
		}
	}
	err := m.Admit(ctx, s, k, c, op, items)
	var denied *DeniedError
	switch {
	case !counting:
	case err == nil:
		m.record(ctx, s, k.Name, c.Actor, op, items, "")
	case errors.As(err, &denied):
		m.record(ctx, s, k.Name, c.Actor, op, items, denied.Condition)
	}
	return err
}

// Usable loads key name for op and checks that it serves operations; it admits nothing and reaches no key
// material: by itself it serves only what a version's public key does (verifying a signature).
func (m *Manager) Usable(ctx context.Context, s logical.Storage, name string, op Operation) (*Key, error) {
	k, err := m.Get(ctx, s, name)
	if err != nil {
		return nil, err
	}
	m.observer().Judging(ctx, name, op, k)
	if k == nil {
		return nil, Callerf("%s key %q not found", op.role(), name) // as Transit names a missing key
	}
	if err := k.Usable(); err != nil {
		return nil, err
	}
	return k, nil
}

// role names a key by what op uses it for.
func (op Operation) role() string {
	switch op {
	case OpSign, OpCSR:
		return "signing"
	case OpHMAC:
		return "HMAC"
	case OpVerify:
		return "verification"
	}
	return "encryption"
}

// refuses says why k refuses op for a whole request, before any item.
func (k *Key) refuses(op Operation) error {
	switch op {
	case OpSign, OpCSR:
		if !k.Type.Info().Sign {
			return k.Type.Unsupported("signing")
		}
	case OpHMAC:
		return k.hmacReserved()
	}
	return nil
}

// Key is the snapshot of the key this use serves.
func (u *Use) Key() *Key { return u.key }

// Sessions is how many items of a batch the token can serve at once.
func (u *Use) Sessions() int { return u.tok.PoolSize() }

// serves fails a method called on a use admitted for another operation: the door judged op, not what the method
// does.
func (u *Use) serves(what string, ops ...Operation) error {
	if slices.Contains(ops, u.op) {
		return nil
	}
	return fmt.Errorf("key %q: a use admitted for %s cannot %s", u.key.Name, u.op, what)
}

// AdoptNamed makes the use's key know version newest, the newest that the request's items name in their
// ciphertexts, signatures or HMACs (NamedVersion); see Manager.AdoptNamed.
func (u *Use) AdoptNamed(ctx context.Context, newest, items int) error {
	k, err := u.m.AdoptNamed(ctx, u.s, u.key, newest, items, u.caller.Actor)
	if err != nil {
		return err
	}
	u.key = k
	return nil
}

// AdoptNamed returns k knowing version newest, the newest that a request's items name. One newer than storage knows
// may be on the token (storage restored from an older snapshot): it is adopted if the rule allows (adopt.go), so
// that what clients were given before the restore still decrypts and verifies. A version that is nowhere leaves k
// as it is, and the item fails as naming an unknown version. In a batch (items > 1) a failure to adopt fails only
// the items naming versions after the latest.
func (m *Manager) AdoptNamed(ctx context.Context, s logical.Storage, k *Key, newest, items int, who Actor) (*Key, error) {
	if newest <= k.LatestVersion {
		return k, nil
	}
	nk, adopted, err := m.Adopt(ctx, s, k.Name, newest, who)
	if err != nil {
		if items == 1 {
			return nil, err // the one item's answer: why its version cannot be served (409, 503)
		}
		m.log.Warn("versions named by a batch could not be adopted from the HSM", "key", k.Name, "through", newest, "error", err)
		if nk == nil {
			return k, nil
		}
	}
	if len(adopted) > 0 {
		m.log.Warn("versions adopted from the HSM: a request named them and storage did not know them (restored from an older snapshot?)",
			"key", k.Name, "versions", adopted)
	}
	return nk, nil
}

// Encrypt seals plaintext under version (0 = latest) and returns Transit's ciphertext and the version used:
// AES-GCM in the HSM, or RSA with the version's public key (padding "" or "oaep", with SHA-256, or "pkcs1v15"; no
// secret is involved, so the standard library does it; decryption is in the HSM). An AES version that has made its
// last allowed encryption is rotated, and the next encryption uses the new version: a batch may cross several
// rotations.
func (u *Use) Encrypt(ctx context.Context, plaintext, aad []byte, version int, padding string) (string, int, error) {
	if err := u.serves("encrypt", OpEncrypt, OpRewrap, OpDatakey); err != nil {
		return "", 0, err
	}
	return u.encrypt(ctx, u.key, plaintext, aad, version, padding)
}

func (u *Use) encrypt(ctx context.Context, k *Key, plaintext, aad []byte, version int, padding string) (string, int, error) {
	if !k.Type.Info().Encrypt && version == 0 {
		return "", 0, k.Type.Unsupported("encryption")
	}
	v, ver, err := k.EncryptionVersion(version)
	if err != nil {
		return "", 0, err
	}
	if !ver.Type.Info().Encrypt { // an older version named by key_version, of another type than the latest's
		return "", 0, ver.Type.Unsupported("encryption")
	}
	if ver.Type.IsRSA() {
		ct, v, err := encryptRSA(k, v, ver, plaintext, aad, padding)
		if err == nil {
			u.m.noteVersion(ctx, u.s, k, v, ver, true)
		}
		return ct, v, err
	}
	if padding != "" {
		return "", 0, Callerf("padding_scheme applies to RSA keys only, not %s", ver.Type)
	}
	v, nonce, sealed, err := u.sealGCM(ctx, k, v, ver, version, plaintext, func(int) []byte { return aad }, "")
	if err != nil {
		return "", 0, err
	}
	return formatCiphertext(v, nonce, sealed), v, nil
}

// SealGCM encrypts plaintext in the HSM with the key's latest version, which must be of type want, and returns the
// version used, the nonce and ciphertext‖tag; aadFor gives the AAD the HSM authenticates for the version used (a
// protocol that binds the version into its AAD, as AWS's XKS does). It counts and rotates as Encrypt does.
func (u *Use) SealGCM(ctx context.Context, plaintext []byte, aadFor func(version int) []byte, want Type) (int, []byte, []byte, error) {
	if err := u.serves("encrypt", OpEncrypt); err != nil {
		return 0, nil, nil, err
	}
	v, ver, err := u.key.EncryptionVersion(0)
	if err != nil {
		return 0, nil, nil, err
	}
	if ver.Type != want {
		return 0, nil, nil, Callerf("key %q version %d is %s, not %s", u.key.Name, v, ver.Type, want)
	}
	return u.sealGCM(ctx, u.key, v, ver, 0, plaintext, aadFor, want)
}

// sealGCM is AES-GCM encryption with version v (ver) of k, asked for as version (0 = latest): the encryption is
// counted first, and a version that has made its last allowed one is rotated, the next encryption using the new
// version (a batch may cross several rotations): of any AES type, or of type want if want is set.
func (u *Use) sealGCM(ctx context.Context, k *Key, v int, ver *Version, version int, plaintext []byte, aadFor func(int) []byte, want Type) (int, []byte, []byte, error) {
	last, err := u.m.countEncryption(ctx, u.s, k, v)
	switch {
	case errors.Is(err, ErrVersionExhausted) && (version == 0 || version == k.LatestVersion):
		// An earlier encryption used the version's last one: rotate (or find it rotated) and use the new version.
		nk, err := u.m.rotateForUsage(ctx, u.s, k.Name, v, u.caller.Actor)
		switch {
		case err != nil:
			return 0, nil, nil, fmt.Errorf("key %q version %d has reached its encryption limit and rotating it failed: %w", k.Name, v, err)
		case nk == nil || nk.LatestVersion == v:
			return 0, nil, nil, Callerf("key %q version %d has reached its encryption limit", k.Name, v)
		}
		nv, nver, err := nk.EncryptionVersion(0)
		if err != nil {
			return 0, nil, nil, err
		}
		if !nver.Type.Info().Encrypt || nver.Type.IsRSA() || (want != "" && nver.Type != want) {
			return 0, nil, nil, Callerf("key %q was rotated at its encryption limit to a %s version, which cannot serve this encryption", k.Name, nver.Type)
		}
		return u.sealGCM(ctx, nk, nv, nver, 0, plaintext, aadFor, want)
	case errors.Is(err, ErrVersionExhausted):
		return 0, nil, nil, Callerf("key %q version %d has reached its encryption limit (%d)", k.Name, v, k.EncryptionLimit())
	case err != nil:
		return 0, nil, nil, err
	}
	if last {
		defer func() {
			if _, err := u.m.rotateForUsage(ctx, u.s, k.Name, v, u.caller.Actor); err != nil {
				u.m.log.Warn("usage rotation failed; the next encryption retries it", "key", k.Name, "version", v, "error", err)
			}
		}()
	}
	nonce, err := u.nonces.next(ctx)
	if err != nil {
		return 0, nil, nil, err
	}
	used, sealed, err := u.tok.EncryptGCM(ctx, ver.ID(), nonce, aadFor(v), plaintext)
	if err != nil {
		return 0, nil, nil, fmt.Errorf("encrypt with key %q version %d: %w", k.Name, v, err)
	}
	u.m.noteVersion(ctx, u.s, k, v, ver, true)
	return v, used, sealed, nil
}

func encryptRSA(k *Key, v int, ver *Version, plaintext, aad []byte, padding string) (string, int, error) {
	if len(aad) > 0 {
		return "", 0, Callerf("associated_data provided for non-AEAD key type %s", ver.Type)
	}
	pub := ver.Public().(*rsa.PublicKey)
	var ct []byte
	var err error
	switch padding {
	case "", "oaep":
		ct, err = rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, plaintext, nil)
	case "pkcs1v15":
		ct, err = rsa.EncryptPKCS1v15(rand.Reader, pub, plaintext)
	default:
		return "", 0, Callerf("padding_scheme must be oaep or pkcs1v15, not %q", padding)
	}
	if err != nil {
		return "", 0, Callerf("cannot encrypt with %s key %q: %v", ver.Type, k.Name, err)
	}
	return FormatVersioned(v, ct, base64.StdEncoding), v, nil
}

// Decrypt opens a ciphertext of the key (Transit's form) in the HSM; padding as for Encrypt, RSA keys only. The
// caller clears the plaintext when done.
func (u *Use) Decrypt(ctx context.Context, ciphertext string, aad []byte, padding string) ([]byte, error) {
	if err := u.serves("decrypt", OpDecrypt, OpRewrap); err != nil {
		return nil, err
	}
	return u.decrypt(ctx, ciphertext, aad, padding)
}

// decrypt opens ciphertext, and counts the use of the version it names.
func (u *Use) decrypt(ctx context.Context, ciphertext string, aad []byte, padding string) ([]byte, error) {
	pt, err := u.open(ctx, ciphertext, aad, padding)
	if err == nil {
		u.m.noteNamed(ctx, u.s, u.key, NamedVersion(ciphertext))
	}
	return pt, err
}

func (u *Use) open(ctx context.Context, ciphertext string, aad []byte, padding string) ([]byte, error) {
	k := u.key
	typ := k.Type // the named version's, when the key has it: a rotation may have changed the type
	if ver := k.Versions[NamedVersion(ciphertext)]; ver != nil {
		typ = ver.Type
	}
	if !typ.Info().Encrypt {
		return nil, typ.Unsupported("decryption")
	}
	if typ.IsRSA() {
		return u.decryptRSA(ctx, ciphertext, padding)
	}
	v, nonce, sealed, err := parseCiphertext(ciphertext)
	if err != nil {
		return nil, Callerf("%s", err.Error())
	}
	ver, err := k.decryptionVersion(v, "ciphertext", u.op == OpRewrap)
	if err != nil {
		return nil, err
	}
	pt, err := u.tok.DecryptGCM(ctx, ver.ID(), nonce, aad, sealed)
	if errors.Is(err, hsm.ErrInvalidCiphertext) {
		hint := "tampered, truncated, or made by another key"
		if len(aad) == 0 {
			hint += ", or encrypted with associated_data that was not given here"
		} else {
			hint += ", or encrypted with other associated_data"
		}
		return nil, Callerf("invalid ciphertext: version %d of key %q does not authenticate it (%s)", v, k.Name, hint)
	}
	if err != nil {
		return nil, fmt.Errorf("decrypt with key %q version %d: %w", k.Name, v, err)
	}
	return pt, nil
}

// CheckSealed decrypts what SealGCM returned, in the HSM, and compares it with the plaintext: a protocol's check
// (AWS XKS's ciphertext data integrity value) that its answer will decrypt, done within the encryption's use and
// counted as no decryption.
func (u *Use) CheckSealed(ctx context.Context, v int, nonce, aad, sealed, plaintext []byte) error {
	if err := u.serves("check its encryption", OpEncrypt); err != nil {
		return err
	}
	ver := u.key.Versions[v]
	if ver == nil {
		if k, err := u.m.Get(ctx, u.s, u.key.Name); err == nil && k != nil { // a usage rotation made v
			ver = k.Versions[v]
		}
	}
	if ver == nil {
		return fmt.Errorf("key %q has no version %d", u.key.Name, v)
	}
	pt, err := u.tok.DecryptGCM(ctx, ver.ID(), nonce, aad, sealed)
	if err != nil {
		return err
	}
	defer clear(pt)
	if !bytes.Equal(pt, plaintext) {
		return fmt.Errorf("key %q version %d decrypted its encryption to other bytes", u.key.Name, v)
	}
	return nil
}

// OpenGCM decrypts ciphertext‖tag (sealed) that version v made with nonce, authenticating aad, in the HSM: the
// counterpart of SealGCM. The version must serve decryption (it exists, is not below min_decryption_version, not
// retired, not destroyed) and be of an AES type; hsm.ErrInvalidCiphertext when it does not authenticate the input.
func (u *Use) OpenGCM(ctx context.Context, v int, nonce, aad, sealed []byte) ([]byte, error) {
	if err := u.serves("decrypt", OpDecrypt); err != nil {
		return nil, err
	}
	ver, err := u.key.decryptionVersion(v, "ciphertext", false)
	if err != nil {
		return nil, err
	}
	if !ver.Type.Info().Encrypt || ver.Type.IsRSA() {
		return nil, Callerf("version %d of key %q is %s, not AES-GCM", v, u.key.Name, ver.Type)
	}
	pt, err := u.tok.DecryptGCM(ctx, ver.ID(), nonce, aad, sealed)
	if err != nil {
		return nil, fmt.Errorf("decrypt with key %q version %d: %w", u.key.Name, v, err)
	}
	u.m.noteNamed(ctx, u.s, u.key, v)
	return pt, nil
}

func (u *Use) decryptRSA(ctx context.Context, ciphertext, padding string) ([]byte, error) {
	k := u.key
	v, raw, err := ParseVersioned("ciphertext", ciphertext, base64.StdEncoding)
	if err != nil {
		return nil, Callerf("%s", err.Error())
	}
	ver, err := k.decryptionVersion(v, "ciphertext", u.op == OpRewrap)
	if err != nil {
		return nil, err
	}
	if err := k.Private(v, "decrypt"); err != nil {
		return nil, err
	}
	switch padding {
	case "", "oaep":
	case "pkcs1v15":
		return u.decryptPKCS1v15(ctx, v, ver, raw)
	default:
		return nil, Callerf("padding_scheme must be oaep or pkcs1v15, not %q", padding)
	}
	pt, err := u.tok.DecryptRSA(ctx, ver.ID(), crypto.SHA256, raw)
	if err != nil {
		return nil, fmt.Errorf("decrypt with key %q version %d: %w", k.Name, v, err)
	}
	return pt, nil
}

// Rewrap decrypts ciphertext and encrypts its plaintext again under version (0 = latest); the plaintext never
// leaves the model. RSA keys may decrypt with one padding and encrypt with another.
func (u *Use) Rewrap(ctx context.Context, ciphertext string, aad []byte, version int, decryptPadding, encryptPadding string) (string, int, error) {
	if err := u.serves("rewrap", OpRewrap); err != nil {
		return "", 0, err
	}
	pt, err := u.decrypt(ctx, ciphertext, aad, decryptPadding)
	if err != nil {
		return "", 0, err
	}
	defer clear(pt)
	return u.encrypt(ctx, u.key, pt, aad, version, encryptPadding)
}

// Datakey draws a data key of bits bits from the HSM's RNG and encrypts it as Encrypt does. The caller clears the
// data key when done.
func (u *Use) Datakey(ctx context.Context, bits int, aad []byte, version int, padding string) (dataKey []byte, ciphertext string, v int, err error) {
	if err := u.serves("make a data key", OpDatakey); err != nil {
		return nil, "", 0, err
	}
	dataKey, err = u.tok.GenerateRandom(ctx, bits/8)
	if err != nil {
		return nil, "", 0, err
	}
	ciphertext, v, err = u.encrypt(ctx, u.key, dataKey, aad, version, padding)
	if err != nil {
		clear(dataKey)
		return nil, "", 0, err
	}
	return dataKey, ciphertext, v, nil
}
