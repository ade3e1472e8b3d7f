package cmk

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"maps"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

const (
	policyPrefix = "policy/"
	// walKindVersion brackets the creation of a version's HSM objects until its metadata is stored.
	walKindVersion = "hsm_key_version"
	// walKindWrappingKey brackets the creation of the mount's wrapping key.
	walKindWrappingKey = "hsm_wrapping_key"
	// walRollbackMinAge is long enough for any key generation to finish; the rollback also takes the key's
	// lock, so it can never race a creation still in progress.
	walRollbackMinAge = 2 * time.Minute
)

// keyType is a kind of key, named as in Transit.
type keyType string

const (
	typeAES256GCM96 keyType = "aes256-gcm96"
	typeAES128GCM96 keyType = "aes128-gcm96"
	typeHMAC        keyType = "hmac"
	typeRSA2048     keyType = "rsa-2048"
	typeRSA3072     keyType = "rsa-3072"
	typeRSA4096     keyType = "rsa-4096"
	typeECDSAP256   keyType = "ecdsa-p256"
	typeECDSAP384   keyType = "ecdsa-p384"
	typeECDSAP521   keyType = "ecdsa-p521"
	typeEd25519     keyType = "ed25519"
)

// keyTypeInfo is what a key type is in the HSM and what it can do.
type keyTypeInfo struct {
	alg     hsm.Algorithm
	encrypt bool // encrypt and decrypt (AES-GCM, or RSA-OAEP)
	sign    bool // sign and verify
}

var keyTypes = map[keyType]keyTypeInfo{
	typeAES256GCM96: {hsm.AES256, true, false},
	typeAES128GCM96: {hsm.AES128, true, false},
	typeHMAC:        {hsm.HMACOnly, false, false},
	typeRSA2048:     {hsm.RSA2048, true, true},
	typeRSA3072:     {hsm.RSA3072, true, true},
	typeRSA4096:     {hsm.RSA4096, true, true},
	typeECDSAP256:   {hsm.ECDSAP256, false, true},
	typeECDSAP384:   {hsm.ECDSAP384, false, true},
	typeECDSAP521:   {hsm.ECDSAP521, false, true},
	typeEd25519:     {hsm.Ed25519, false, true},
}

// keyTypeNames lists the types in the order the docs give them.
var keyTypeNames = []string{"aes256-gcm96", "aes128-gcm96", "hmac", "rsa-2048", "rsa-3072", "rsa-4096",
	"ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "ed25519"}

func (t keyType) info() keyTypeInfo { return keyTypes[t] }
func (t keyType) isRSA() bool       { return t == typeRSA2048 || t == typeRSA3072 || t == typeRSA4096 }
func (t keyType) isECDSA() bool {
	return t == typeECDSAP256 || t == typeECDSAP384 || t == typeECDSAP521
}
func (t keyType) asymmetric() bool { return t.isRSA() || t.isECDSA() || t == typeEd25519 }

// publicKeyName is the "name" Transit gives an asymmetric version's public key.
func (t keyType) publicKeyName() string {
	switch t {
	case typeECDSAP256:
		return "P-256"
	case typeECDSAP384:
		return "P-384"
	case typeECDSAP521:
		return "P-521"
	}
	return string(t)
}

// capabilities names what the type supports, for error messages.
func (t keyType) capabilities() string {
	var c []string
	if t.info().encrypt {
		c = append(c, "encrypt/decrypt")
	}
	if t.info().sign {
		c = append(c, "sign/verify")
	}
	return strings.Join(append(c, "hmac"), ", ")
}

// unsupported is the 400 for an operation the key's type cannot do.
func (t keyType) unsupported(op string) error {
	return fmt.Errorf("key type %s does not support %s; it supports %s", t, op, t.capabilities())
}

func parseKeyType(s string) (keyType, error) {
	if s == "" {
		return typeAES256GCM96, nil
	}
	if _, ok := keyTypes[keyType(s)]; ok {
		return keyType(s), nil
	}
	return "", fmt.Errorf("unsupported key type %q: this engine creates %s", s, strings.Join(keyTypeNames, ", "))
}

// keyPolicy is a key's metadata as stored in Vault: settings and versions, never material. A *keyPolicy in the
// cache is never modified: changes are made on a clone, persisted, then published (copy on write), so encrypt
// and decrypt read it without locks and never wait for a rotation.
type keyPolicy struct {
	Name                 string              `json:"name"`
	Type                 keyType             `json:"type"`
	LatestVersion        int                 `json:"latest_version"`
	MinDecryptionVersion int                 `json:"min_decryption_version"`
	MinEncryptionVersion int                 `json:"min_encryption_version"`
	DeletionAllowed      bool                `json:"deletion_allowed"`
	Versions             map[int]*keyVersion `json:"versions"`
	CreatedAt            time.Time           `json:"created_at"`
	// HMACKeySize is the size in bytes of each version's HMAC secret (key_size for hmac keys).
	HMACKeySize int `json:"hmac_key_size,omitempty"`
	// Imported keys were brought in with import; rotation then needs AllowRotation, as in Transit.
	Imported      bool `json:"imported,omitempty"`
	AllowRotation bool `json:"allow_rotation,omitempty"`
	// Deleting is set before a deletion destroys HSM objects, so that an interrupted deletion is finished by
	// the next attempt and the key serves nothing meanwhile.
	Deleting bool `json:"deleting,omitempty"`
}

// keyVersion is one version's metadata. Its material is on the token, found by HSMID.
type keyVersion struct {
	HSMID     string    `json:"hsm_id"` // hex CKA_ID shared by the version's objects
	Label     string    `json:"label"`  // CKA_LABEL, for people reading the token
	CreatedAt time.Time `json:"created_at"`
	CreatedBy string    `json:"created_by,omitempty"`
	// PublicKey of an asymmetric version as Transit shows it: PEM (PKIX) for RSA and ECDSA, base64 for Ed25519.
	PublicKey string `json:"public_key,omitempty"`
	// ImportMethod says how imported material reached the token (see BYOK); empty for generated versions.
	ImportMethod string `json:"import_method,omitempty"`

	pub crypto.PublicKey // PublicKey parsed, set when the version is loaded or created
}

func (p *keyPolicy) hmacKeySize() int {
	if p.HMACKeySize > 0 {
		return p.HMACKeySize
	}
	return hsm.HMACKeySize
}

func (v *keyVersion) id() []byte {
	b, _ := hex.DecodeString(v.HSMID)
	return b
}

func (p *keyPolicy) clone() *keyPolicy {
	c := *p
	c.Versions = maps.Clone(p.Versions)
	return &c
}

// versionState is derived from the key's settings (DESIGN.md's lifecycle states).
func (p *keyPolicy) versionState(v int) string {
	switch {
	case v < p.MinDecryptionVersion:
		return "disabled"
	case v < p.MinEncryptionVersion:
		return "decrypt_only"
	}
	return "active"
}

// encryptionVersion resolves a requested key_version (0 = latest) for encryption.
func (p *keyPolicy) encryptionVersion(requested int) (int, *keyVersion, error) {
	v := requested
	if v == 0 {
		v = p.LatestVersion
	}
	switch {
	case v < 0 || v > p.LatestVersion:
		return 0, nil, fmt.Errorf("invalid key version %d: key %q has versions 1 to %d", requested, p.Name, p.LatestVersion)
	case v < p.MinEncryptionVersion:
		return 0, nil, fmt.Errorf("key version %d is below min_encryption_version %d", v, p.MinEncryptionVersion)
	case v < p.MinDecryptionVersion:
		return 0, nil, fmt.Errorf("key version %d is below min_decryption_version %d", v, p.MinDecryptionVersion)
	}
	return v, p.Versions[v], nil
}

// decryptionVersion checks that version v may decrypt.
func (p *keyPolicy) decryptionVersion(v int) (*keyVersion, error) {
	switch {
	case v < 1 || v > p.LatestVersion:
		return nil, fmt.Errorf("invalid ciphertext: key version %d does not exist (latest is %d)", v, p.LatestVersion)
	case v < p.MinDecryptionVersion:
		return nil, fmt.Errorf("ciphertext version %d is disallowed by policy: below min_decryption_version %d", v, p.MinDecryptionVersion)
	}
	return p.Versions[v], nil
}

// usable reports why a key serves no operation, if it does not.
func (p *keyPolicy) usable() error {
	if p.Deleting {
		return fmt.Errorf("key %q is being deleted", p.Name)
	}
	return nil
}

// lockKey returns the key's lock; writers hold it from load to publish.
func (b *backend) lockKey(name string) *locksutil.LockEntry {
	return locksutil.LockForKey(b.keyLocks, name)
}

// policy returns the key's current snapshot, nil if it does not exist. Once cached, no storage read happens.
func (b *backend) policy(ctx context.Context, s logical.Storage, name string) (*keyPolicy, error) {
	if p, ok := b.keys.Load(name); ok {
		return p.(*keyPolicy), nil
	}
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	return b.policyLocked(ctx, s, name)
}

// policyLocked is policy for callers already holding the key's lock.
func (b *backend) policyLocked(ctx context.Context, s logical.Storage, name string) (*keyPolicy, error) {
	if p, ok := b.keys.Load(name); ok {
		return p.(*keyPolicy), nil
	}
	p, err := loadPolicy(ctx, s, name)
	if err != nil || p == nil {
		return nil, err
	}
	b.keys.Store(name, p)
	return p, nil
}

func loadPolicy(ctx context.Context, s logical.Storage, name string) (*keyPolicy, error) {
	e, err := s.Get(ctx, policyPrefix+name)
	if err != nil {
		return nil, fmt.Errorf("read key %q: %w", name, err)
	}
	if e == nil {
		return nil, nil
	}
	var p keyPolicy
	if err := e.DecodeJSON(&p); err != nil {
		return nil, fmt.Errorf("decode key %q: %w", name, err)
	}
	for n, v := range p.Versions {
		if v.PublicKey == "" {
			continue
		}
		if v.pub, err = parsePublicKey(p.Type, v.PublicKey); err != nil {
			return nil, fmt.Errorf("key %q version %d: %w", name, n, err)
		}
	}
	return &p, nil
}

// formatPublicKey renders a public key as Transit does.
func formatPublicKey(pub crypto.PublicKey) (string, error) {
	if ed, ok := pub.(ed25519.PublicKey); ok {
		return base64.StdEncoding.EncodeToString(ed), nil
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), nil
}

func parsePublicKey(t keyType, s string) (crypto.PublicKey, error) {
	if t == typeEd25519 {
		raw, err := base64.StdEncoding.DecodeString(s)
		if err != nil || len(raw) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("stored Ed25519 public key is malformed")
		}
		return ed25519.PublicKey(raw), nil
	}
	block, _ := pem.Decode([]byte(s))
	if block == nil {
		return nil, fmt.Errorf("stored public key is not PEM")
	}
	return x509.ParsePKIXPublicKey(block.Bytes)
}

// storePolicy persists p and publishes it to the cache. Called with the key's lock held.
func (b *backend) storePolicy(ctx context.Context, s logical.Storage, p *keyPolicy) error {
	e, err := logical.StorageEntryJSON(policyPrefix+p.Name, p)
	if err != nil {
		return err
	}
	if err := s.Put(ctx, e); err != nil {
		return fmt.Errorf("store key %q: %w", p.Name, err)
	}
	b.keys.Store(p.Name, p)
	return nil
}

type walVersion struct {
	Name    string `json:"name"`
	Version int    `json:"version"`
	HSMID   string `json:"hsm_id"`
}

// materialFunc puts a version's material on the token under CKA_ID id and returns its public key (asymmetric
// types) and, for imports, how the material got there.
type materialFunc func(id []byte, label string) (pub crypto.PublicKey, importMethod string, err error)

// generated is the materialFunc of a key version generated in the HSM.
func generated(ctx context.Context, tok hsmToken, p *keyPolicy) materialFunc {
	return func(id []byte, label string) (crypto.PublicKey, string, error) {
		pub, err := tok.GenerateVersion(ctx, p.Type.info().alg, id, label, p.hmacKeySize())
		return pub, "", err
	}
}

// addVersion puts the next version's material on the token and persists p (a clone, with the key's lock held)
// with it. The WAL entry written first lets the rollback destroy objects whose metadata never reached storage;
// on a failure here they are destroyed at once when the HSM allows.
func (b *backend) addVersion(ctx context.Context, s logical.Storage, tok hsmToken, p *keyPolicy, by string, material materialFunc) error {
	rawID := make([]byte, 16) // an identifier, not a secret: the standard library's RNG is fine here
	if _, err := rand.Read(rawID); err != nil {
		return err
	}
	v := p.LatestVersion + 1
	ver := &keyVersion{
		HSMID:     hex.EncodeToString(rawID),
		Label:     fmt.Sprintf("cmk/%s/%s/v%d", b.mountID, p.Name, v),
		CreatedAt: time.Now().UTC(),
		CreatedBy: by,
	}
	walID, err := b.walPut(ctx, s, walKindVersion, p.Name, v, rawID)
	if err != nil {
		return fmt.Errorf("write WAL: %w", err)
	}
	undo := func(cause error) error {
		if _, derr := tok.DestroyKeys(ctx, rawID); derr != nil {
			b.logger.Warn("could not destroy uncommitted key version; WAL rollback will retry", "key", p.Name, "version", v, "error", derr)
			return cause
		}
		if werr := framework.DeleteWAL(ctx, s, walID); werr != nil {
			b.logger.Warn("could not delete WAL entry", "error", werr)
		}
		return cause
	}
	pub, method, err := material(rawID, ver.Label)
	if err != nil {
		return undo(fmt.Errorf("key %q version %d in the HSM: %w", p.Name, v, err))
	}
	ver.ImportMethod = method
	if pub != nil {
		if ver.PublicKey, err = formatPublicKey(pub); err != nil {
			return undo(err)
		}
		ver.pub = pub
	}
	p.Versions = maps.Clone(p.Versions)
	if p.Versions == nil {
		p.Versions = map[int]*keyVersion{}
	}
	p.Versions[v] = ver
	p.LatestVersion = v
	if p.MinDecryptionVersion == 0 {
		p.MinDecryptionVersion = 1
	}
	if err := b.storePolicy(ctx, s, p); err != nil {
		return undo(err)
	}
	if err := framework.DeleteWAL(ctx, s, walID); err != nil {
		// Harmless: the rollback finds the version referenced and destroys nothing.
		b.logger.Warn("could not delete WAL entry", "error", err)
	}
	event := "key version created in the HSM"
	if method != "" {
		event = "key version imported into the HSM"
	}
	b.logger.Info(event, "key", p.Name, "version", v, "label", ver.Label, "by", by, "import_method", method)
	return nil
}

// walPut records that HSM objects with CKA_ID id are about to be made: version v of key name, or the mount's
// wrapping key.
func (b *backend) walPut(ctx context.Context, s logical.Storage, kind, name string, v int, id []byte) (string, error) {
	return framework.PutWAL(ctx, s, kind, &walVersion{Name: name, Version: v, HSMID: hex.EncodeToString(id)})
}

// walRollback destroys the HSM objects of a version whose metadata never reached storage. Nothing that storage
// references is ever destroyed here.
func (b *backend) walRollback(ctx context.Context, req *logical.Request, kind string, data interface{}) error {
	if kind != walKindVersion && kind != walKindWrappingKey {
		return fmt.Errorf("unknown WAL entry kind %q", kind)
	}
	raw, err := json.Marshal(data)
	if err != nil {
		return err
	}
	var w walVersion
	if err := json.Unmarshal(raw, &w); err != nil {
		return err
	}
	id, err := hex.DecodeString(w.HSMID)
	if err != nil || len(id) == 0 {
		return nil // nothing that could be on the token
	}
	committed, unlock, err := b.walCommitted(ctx, req.Storage, kind, w)
	defer unlock()
	if err != nil || committed {
		return err
	}
	tok, _, err := b.getToken(ctx, req.Storage)
	if err != nil {
		return err // keep the entry; the next rollback pass tries again
	}
	n, err := tok.DestroyKeys(ctx, id)
	if err != nil {
		return err
	}
	b.logger.Info("WAL rollback destroyed uncommitted HSM objects", "key", w.Name, "version", w.Version, "objects", n)
	return nil
}

// walCommitted reports whether storage references the objects of a WAL entry. It holds the lock that guards
// their creation until unlock is called, so the rollback never races a creation still in progress.
func (b *backend) walCommitted(ctx context.Context, s logical.Storage, kind string, w walVersion) (bool, func(), error) {
	if kind == walKindWrappingKey {
		b.wrappingMu.Lock()
		wk, err := readWrappingKey(ctx, s)
		return err == nil && wk != nil && wk.HSMID == w.HSMID, b.wrappingMu.Unlock, err
	}
	lock := b.lockKey(w.Name)
	lock.Lock()
	p, err := loadPolicy(ctx, s, w.Name)
	if err != nil || p == nil {
		return false, lock.Unlock, err
	}
	for _, v := range p.Versions {
		if v.HSMID == w.HSMID {
			return true, lock.Unlock, nil
		}
	}
	return false, lock.Unlock, nil
}

// createKey creates key name with its first version unless it exists. It reports whether it created it.
func (b *backend) createKey(ctx context.Context, s logical.Storage, name string, typ keyType, hmacSize int, by string) (*keyPolicy, bool, error) {
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	p, err := b.policyLocked(ctx, s, name)
	if err != nil || p != nil {
		return p, false, err
	}
	tok, _, err := b.getToken(ctx, s)
	if err != nil {
		return nil, false, err
	}
	p = &keyPolicy{Name: name, Type: typ, CreatedAt: time.Now().UTC(), HMACKeySize: hmacSize}
	if err := b.addVersion(ctx, s, tok, p, by, generated(ctx, tok, p)); err != nil {
		return nil, false, err
	}
	return p, true, nil
}

// deleteKey destroys every version's HSM objects, then the key's metadata. It is marked as deleting first, so
// a deletion cut short by a crash or an HSM fault is completed by the next DELETE and serves nothing meanwhile.
func (b *backend) deleteKey(ctx context.Context, s logical.Storage, name string) error {
	lock := b.lockKey(name)
	lock.Lock()
	defer lock.Unlock()
	p, err := b.policyLocked(ctx, s, name)
	if err != nil || p == nil {
		return err
	}
	if !p.DeletionAllowed {
		return errDeletionNotAllowed
	}
	tok, _, err := b.getToken(ctx, s)
	if err != nil {
		return err
	}
	if !p.Deleting {
		p = p.clone()
		p.Deleting = true
		if err := b.storePolicy(ctx, s, p); err != nil {
			return err
		}
	}
	for v, ver := range p.Versions {
		if _, err := tok.DestroyKeys(ctx, ver.id()); err != nil {
			return fmt.Errorf("destroy key %q version %d: %w", name, v, err)
		}
	}
	if err := s.Delete(ctx, policyPrefix+name); err != nil {
		return err
	}
	b.keys.Delete(name)
	b.logger.Info("key deleted and its HSM objects destroyed", "key", name, "versions", len(p.Versions))
	return nil
}

var errDeletionNotAllowed = errors.New("deletion is not allowed for this key: set deletion_allowed=true on keys/<name>/config first")

// requester names who made a request, for the key's records: the entity when there is one, else the token's
// accessor; never the token itself.
func requester(req *logical.Request) string {
	if req == nil {
		return ""
	}
	switch {
	case req.EntityID != "" && req.DisplayName != "":
		return req.DisplayName + " (entity " + req.EntityID + ")"
	case req.EntityID != "":
		return "entity " + req.EntityID
	case req.ClientTokenAccessor != "":
		return req.DisplayName + " (token accessor " + req.ClientTokenAccessor + ")"
	}
	return req.DisplayName
}
