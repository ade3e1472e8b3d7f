package keys

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
)

// The mount's audit key signs what an auditor checks offline: the heads of the keys' history chains and evidence
// bundles. It is an ECDSA P-256 key generated in the HSM; every version is kept (its public key in storage, its
// private key on the token), so that heads signed before a rotation keep verifying.
//
// Storage is what the audit key defends against, so a public key read from storage vouches for nothing by itself:
// a version is used to verify or to sign only once the token shows it holds that version's key (its object labelled
// as the version, under the CKA_ID storage records, with the public key storage records). The check is made once
// per process and version (tokenAuditKeys); a version that fails it is named, never used.
const (
	auditKeyPath = "audit_key"
	// WALKindAuditKey brackets the creation of an audit key version's HSM objects until storage holds it.
	WALKindAuditKey = "hsm_audit_key"
)

// AuditKeyVersion is one version of the audit key: where its private key is on the token, and its public key.
type AuditKeyVersion struct {
	HSMID     string    `json:"hsm_id"`
	Label     string    `json:"label"`
	PublicKey string    `json:"public_key"` // PEM "PUBLIC KEY" (PKIX), evidence.MarshalAuditKey
	CreatedAt time.Time `json:"created_at"`
	CreatedBy string    `json:"created_by,omitempty"`
}

// AuditKey is the mount's audit key as stored: every version, the latest signing.
type AuditKey struct {
	LatestVersion int                      `json:"latest_version"`
	Versions      map[int]*AuditKeyVersion `json:"versions"`
}

// auditKeyLabel is the CKA_LABEL of an audit key version. It is not a version label (no "/v<N>" after a key name,
// and no "/" after the mount's prefix that a key's name could end at): reconcile, adoption and a key's deletion,
// which find a key's objects by "cmk/<mount>/<key>/", never take it for a key's.
func auditKeyLabel(mountID string, n int) string {
	return fmt.Sprintf("%saudit_key:v%d", LabelPrefix(mountID), n)
}

func readAuditKey(ctx context.Context, s logical.Storage) (*AuditKey, error) {
	e, err := s.Get(ctx, auditKeyPath)
	if err != nil || e == nil {
		return nil, err
	}
	var a AuditKey
	if err := e.DecodeJSON(&a); err != nil {
		return nil, fmt.Errorf("read the audit key: %w", err)
	}
	return &a, nil
}

// AuditKey returns the mount's audit key as the token vouches for it: only the versions whose key the token holds
// (nil if none was made yet), and the others by version with why they are not used.
func (m *Manager) AuditKey(ctx context.Context, s logical.Storage) (*AuditKey, map[int]string, error) {
	a, err := readAuditKey(ctx, s)
	if err != nil || a == nil {
		return nil, nil, err
	}
	return m.vouchedAuditKey(ctx, s, a)
}

// vouchedAuditKey is AuditKey for the audit key a as read from storage (not nil).
func (m *Manager) vouchedAuditKey(ctx context.Context, s logical.Storage, a *AuditKey) (*AuditKey, map[int]string, error) {
	var err error
	vouched := &AuditKey{LatestVersion: a.LatestVersion, Versions: map[int]*AuditKeyVersion{}}
	unvouched := map[int]string{}
	var tok HSM
	for _, n := range a.SortedVersions() {
		v := a.Versions[n]
		if m.tokenAuditKeys.holds(n, v) {
			vouched.Versions[n] = v
			continue
		}
		if tok == nil {
			if tok, err = m.connect(ctx, s); err != nil {
				return nil, nil, err
			}
		}
		why, err := m.checkAuditKeyOnToken(ctx, tok, n, v)
		if err != nil {
			return nil, nil, err
		}
		if why != "" {
			unvouched[n] = why
			continue
		}
		vouched.Versions[n] = v
	}
	return vouched, unvouched, nil
}

// tokenAuditKeys are the audit key versions the token was found to hold, by version: what storage recorded of each
// when it was checked.
type tokenAuditKeys struct{ checked sync.Map } // version → AuditKeyVersion

// holds says whether version n as stored is what the token was found to hold.
func (c *tokenAuditKeys) holds(n int, v *AuditKeyVersion) bool {
	was, ok := c.checked.Load(n)
	return ok && was.(AuditKeyVersion).HSMID == v.HSMID && was.(AuditKeyVersion).PublicKey == v.PublicKey
}

// checkAuditKeyOnToken says why version n as stored is not the key the token holds as that version ("" when it is,
// and then remembers it). The label is the version's own (never the one storage records): storage cannot point the
// check at another object.
func (m *Manager) checkAuditKeyOnToken(ctx context.Context, tok HSM, n int, v *AuditKeyVersion) (string, error) {
	label := auditKeyLabel(m.mountID, n)
	stored, err := evidence.ParseAuditKey(v.PublicKey)
	if err != nil {
		return fmt.Sprintf("its public key in storage cannot be read: %v", err), nil
	}
	found, err := tok.FindVersion(ctx, hsm.ECDSAP256, label, 0)
	if err != nil {
		return "", fmt.Errorf("check audit key version %d on the token: %w", n, err)
	}
	switch {
	case len(found) == 0:
		return fmt.Sprintf("the token holds no object labelled %q", label), nil
	case len(found) > 1:
		return fmt.Sprintf("the token holds %d objects labelled %q", len(found), label), nil
	}
	f := found[0]
	if ok, why := f.AdoptableOnWord(); !ok {
		return fmt.Sprintf("the token's object labelled %q is no audit key: %s", label, why), nil
	}
	if f.IDHex() != v.HSMID {
		return fmt.Sprintf("storage records CKA_ID %s, the token's object labelled %q has %s", v.HSMID, label, f.IDHex()), nil
	}
	if pub, ok := f.Public.(*ecdsa.PublicKey); !ok || !pub.Equal(stored) {
		return fmt.Sprintf("its public key in storage is not the one the token holds as %q", label), nil
	}
	m.tokenAuditKeys.checked.Store(n, *v)
	return "", nil
}

// auditKeyRetry is how long the engine waits, after failing to make the audit key (a token without ECDSA P-256,
// generation refused), before it tries again on its own: every event and every tick of every key would otherwise
// write a WAL entry, ask the HSM and clean up, per key. audit_key/rotate tries at once.
const auditKeyRetry = 5 * time.Minute

// auditKeyFailure is the last failure to make the mount's first audit key version, while it stands.
type auditKeyFailure struct {
	at  time.Time
	err error
}

// errAuditKeyNotMade: the mount has no audit key, and making it failed (now, or within auditKeyRetry, when it is
// not tried again): logged once per attempt, where it is tried.
var errAuditKeyNotMade = errors.New("the mount's audit key could not be made")

// auditKeyForSigning returns the audit key, making its first version in the HSM when the mount has none, at most
// once per auditKeyRetry after a failure.
func (m *Manager) auditKeyForSigning(ctx context.Context, s logical.Storage) (*AuditKey, error) {
	if a, err := readAuditKey(ctx, s); err != nil || a != nil {
		return a, err
	}
	m.auditMu.Lock()
	defer m.auditMu.Unlock()
	if a, err := readAuditKey(ctx, s); err != nil || a != nil {
		return a, err
	}
	if f := m.auditFailed; f.err != nil && m.now().Before(f.at.Add(auditKeyRetry)) {
		return nil, fmt.Errorf("%w (tried again after %s, or by audit_key/rotate): %w", errAuditKeyNotMade,
			f.at.Add(auditKeyRetry).UTC().Format(time.RFC3339), f.err)
	}
	a, err := m.addAuditKeyVersion(ctx, s, nil, Actor{DisplayName: "cmk (first signature of the mount)"})
	if err != nil {
		m.auditFailed = auditKeyFailure{at: m.now(), err: err}
		m.log.Error("the mount's audit key could not be made: history is recorded and chained, but no head is signed; tried again later",
			"error", err, "retry_in", auditKeyRetry.String())
		return nil, fmt.Errorf("%w: %w", errAuditKeyNotMade, err)
	}
	m.auditFailed = auditKeyFailure{}
	return a, nil
}

// RotateAuditKey makes a new audit key version in the HSM; new heads and bundles are signed with it, and the
// earlier versions stay to verify what they signed.
func (m *Manager) RotateAuditKey(ctx context.Context, s logical.Storage, who Actor) (*AuditKey, error) {
	who, err := m.sealed(ctx, s, who)
	if err != nil {
		return nil, err
	}
	m.auditMu.Lock()
	defer m.auditMu.Unlock()
	cur, err := readAuditKey(ctx, s)
	if err != nil {
		return nil, err
	}
	return m.addAuditKeyVersion(ctx, s, cur, who)
}

// addAuditKeyVersion generates the next version of the audit key (the first when cur is nil) under a WAL entry:
// if storage never comes to hold it, the rollback destroys it. Called under auditMu.
func (m *Manager) addAuditKeyVersion(ctx context.Context, s logical.Storage, cur *AuditKey, who Actor) (*AuditKey, error) {
	tok, err := m.connect(ctx, s)
	if err != nil {
		return nil, err
	}
	next := &AuditKey{Versions: map[int]*AuditKeyVersion{}}
	if cur != nil {
		next.LatestVersion = cur.LatestVersion
		for n, v := range cur.Versions {
			next.Versions[n] = v
		}
	}
	n := next.LatestVersion + 1
	id := make([]byte, 16) // an identifier, not a secret
	if _, err := rand.Read(id); err != nil {
		return nil, err
	}
	walID, err := framework.PutWAL(ctx, s, WALKindAuditKey, &WALEntry{Version: n, HSMID: hex.EncodeToString(id)})
	if err != nil {
		return nil, fmt.Errorf("write WAL: %w", err)
	}
	label := auditKeyLabel(m.mountID, n)
	undo := func() {
		if _, err := tok.DestroyKeys(ctx, id); err == nil { // nothing was stored: what the call left can go
			_ = framework.DeleteWAL(ctx, s, walID)
		}
	}
	pub, err := tok.GenerateVersion(ctx, hsm.ECDSAP256, id, label, 0)
	if err != nil {
		undo()
		return nil, fmt.Errorf("create audit key version %d in the HSM: %w", n, err)
	}
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok || ec.Curve.Params().Name != "P-256" {
		undo()
		return nil, fmt.Errorf("create audit key version %d in the HSM: the token returned no P-256 public key", n)
	}
	pemText, err := evidence.MarshalAuditKey(ec)
	if err != nil {
		undo()
		return nil, err
	}
	next.Versions[n] = &AuditKeyVersion{HSMID: hex.EncodeToString(id), Label: label, PublicKey: pemText, CreatedAt: time.Now().UTC(), CreatedBy: who.String()}
	next.LatestVersion = n
	e, err := logical.StorageEntryJSON(auditKeyPath, next)
	if err == nil {
		err = s.Put(ctx, e)
	}
	if err != nil {
		return nil, err // the WAL rollback decides, from storage, whether the version is to go
	}
	m.tokenAuditKeys.checked.Store(n, *next.Versions[n]) // the token just gave its public key
	if err := framework.DeleteWAL(ctx, s, walID); err != nil {
		m.log.Warn("could not delete WAL entry; its rollback finds the audit key version stored and destroys nothing", "error", err)
	}
	// The audit key's history is this log line and the versions' created_by: it belongs to no key.
	m.log.Info("audit key version created in the HSM", "version", n, "label", label, "by", who.String())
	return next, nil
}

// RollbackAuditKey is the WAL rollback of an audit key version's creation: its objects go unless storage holds
// the version. Nothing any head depends on is lost: a version storage never held signed nothing that verifies.
func (m *Manager) RollbackAuditKey(ctx context.Context, s logical.Storage, data interface{}) error {
	raw, err := json.Marshal(data)
	if err != nil {
		return err
	}
	var w WALEntry
	if err := json.Unmarshal(raw, &w); err != nil {
		return err
	}
	id, err := hex.DecodeString(w.HSMID)
	if err != nil || len(id) == 0 {
		return nil
	}
	m.auditMu.Lock()
	defer m.auditMu.Unlock()
	a, err := readAuditKey(ctx, s)
	if err != nil {
		return err
	}
	if a != nil {
		for _, v := range a.Versions {
			if v.HSMID == w.HSMID {
				return nil
			}
		}
	}
	tok, err := m.connect(ctx, s)
	if err != nil {
		return err
	}
	n, err := tok.DestroyKeys(ctx, id)
	if err == nil && n > 0 {
		m.log.Info("WAL rollback destroyed an unstored audit key version", "version", w.Version, "objects", n)
	}
	return err
}

// AuditSign signs SHA-256(msg) with the latest audit key version in the HSM (making the first version if the mount
// has none) and returns the version and the base64 of the ASN.1 DER signature, as evidence.AuditKeys.Verify checks.
func (m *Manager) AuditSign(ctx context.Context, s logical.Storage, msg []byte) (int, string, error) {
	stored, err := m.auditKeyForSigning(ctx, s)
	if err != nil {
		return 0, "", err
	}
	a, unvouched, err := m.vouchedAuditKey(ctx, s, stored)
	if err != nil {
		return 0, "", err
	}
	return m.auditSignWith(ctx, s, a, unvouched, msg)
}

// auditSignWith is AuditSign with the audit key as vouchedAuditKey returned it, read once by a caller that also
// verifies with it.
func (m *Manager) auditSignWith(ctx context.Context, s logical.Storage, a *AuditKey, unvouched map[int]string, msg []byte) (int, string, error) {
	if why := unvouched[a.LatestVersion]; why != "" {
		return 0, "", fmt.Errorf("%w: audit key version %d is not signed with: %s", errAuditKeyUnvouched, a.LatestVersion, why)
	}
	v := a.Versions[a.LatestVersion]
	if v == nil {
		return 0, "", fmt.Errorf("the audit key has no version %d", a.LatestVersion)
	}
	pub, err := evidence.ParseAuditKey(v.PublicKey)
	if err != nil {
		return 0, "", err
	}
	id, err := hex.DecodeString(v.HSMID)
	if err != nil {
		return 0, "", fmt.Errorf("audit key version %d: %w", a.LatestVersion, err)
	}
	tok, err := m.connect(ctx, s)
	if err != nil {
		return 0, "", err
	}
	digest := sha256.Sum256(msg)
	raw, err := tok.SignECDSA(ctx, id, digest[:])
	if err != nil {
		return 0, "", fmt.Errorf("sign with audit key version %d: %w", a.LatestVersion, err)
	}
	der, err := ecdsaASN1(raw)
	if err != nil {
		return 0, "", err
	}
	// Checked here, so that a signature the token got wrong is never stored as evidence.
	if !ecdsa.VerifyASN1(pub, digest[:], der) {
		return 0, "", fmt.Errorf("the token's signature with audit key version %d does not verify with its public key", a.LatestVersion)
	}
	return a.LatestVersion, base64.StdEncoding.EncodeToString(der), nil
}

// AuditPublicKeys returns the public keys (PEM) by version of the audit key versions the token holds; empty when
// the mount has none yet.
func (m *Manager) AuditPublicKeys(ctx context.Context, s logical.Storage) (map[int]string, error) {
	a, _, err := m.AuditKey(ctx, s)
	if err != nil {
		return nil, err
	}
	out := map[int]string{}
	if a != nil {
		for n, v := range a.Versions {
			out[n] = v.PublicKey
		}
	}
	return out, nil
}

// auditKeys are the public keys, parsed for verification, of the audit key versions the token holds, and the other
// versions with why they are not used.
func (m *Manager) auditKeys(ctx context.Context, s logical.Storage) (evidence.AuditKeys, map[int]string, error) {
	a, unvouched, err := m.AuditKey(ctx, s)
	if err != nil {
		return nil, nil, err
	}
	keys, err := auditPublicKeys(a)
	return keys, unvouched, err
}

// auditPublicKeys parses the public keys of a's versions (a as vouchedAuditKey returns it; nil: none).
func auditPublicKeys(a *AuditKey) (evidence.AuditKeys, error) {
	keys := evidence.AuditKeys{}
	if a != nil {
		for n, v := range a.Versions {
			pub, err := evidence.ParseAuditKey(v.PublicKey)
			if err != nil {
				return nil, fmt.Errorf("audit key version %d: %w", n, err)
			}
			keys[n] = pub
		}
	}
	return keys, nil
}

// SortedVersions lists the audit key's version numbers in order.
func (a *AuditKey) SortedVersions() []int {
	var out []int
	for n := range a.Versions {
		out = append(out, n)
	}
	sort.Ints(out)
	return out
}

// errAuditKeyUnvouched: the audit key version storage names is not one the token holds: nothing is signed with it.
var errAuditKeyUnvouched = errors.New("the audit key version in storage is not the token's")

// errNotVouchable: the history as stored does not extend what the signed head vouched for (or nothing vouched for
// it and this process did not begin it): the engine does not sign a head over it.
var errNotVouchable = errors.New("the history as stored does not extend its signed head")
