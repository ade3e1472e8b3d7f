package evidence

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// BundleFormat names this layout of a bundle; a verifier refuses a format it does not know.
const BundleFormat = "cmk-evidence/v1"

// Bundle is keys/:name/evidence: one document about a key and the audit key's signature over its exact bytes.
// Document is the document's JSON text, a string, so that it reaches the auditor byte for byte through Vault's
// response encoding (which would re-encode an object) and verifying never depends on re-encoding it.
type Bundle struct {
	Format    string    `json:"format"`
	Document  string    `json:"document"`
	Signature Signature `json:"signature"`
}

// Signature is the audit key's signature over a bundle's document.
type Signature struct {
	Algorithm       string `json:"algorithm"` // SignatureAlgorithm
	AuditKeyVersion int    `json:"audit_key_version"`
	Value           string `json:"value"` // base64 DER
}

// Document is what a bundle says of one key, as the engine saw it at GeneratedAt.
type Document struct {
	GeneratedAt time.Time `json:"generated_at"`
	// Mount identifies the engine: its mount path and accessor as the request saw them.
	Mount     string            `json:"mount"`
	Key       KeyMetadata       `json:"key"`
	Versions  []KeyVersion      `json:"versions"`
	Access    json.RawMessage   `json:"access,omitempty"` // the key's access conditions as keys/:name/access reads them
	Grants    []json.RawMessage `json:"grants,omitempty"`
	History   History           `json:"history"`
	Usage     json.RawMessage   `json:"usage,omitempty"` // keys/:name/usage's report
	Anomalies []json.RawMessage `json:"anomalies,omitempty"`
	// AuditKeys are the audit key's public keys (PEM) by version, as audit_key reads them. A verifier must take
	// the keys it trusts from elsewhere (audit_key, read once and kept): these are for display only.
	AuditKeys map[int]string `json:"audit_keys"`
}

// KeyMetadata is the key as its read shows it, the fields an auditor asks for first.
type KeyMetadata struct {
	Name                 string            `json:"name"`
	Type                 string            `json:"type"`
	Owner                string            `json:"owner,omitempty"`
	Description          string            `json:"description,omitempty"`
	Tags                 map[string]string `json:"tags,omitempty"`
	DataAssets           []string          `json:"data_assets,omitempty"`
	CreatedAt            time.Time         `json:"created_at"`
	State                string            `json:"state"` // active, disabled, deletion_scheduled, deleting, deleted
	LatestVersion        int               `json:"latest_version"`
	MinDecryptionVersion int               `json:"min_decryption_version"`
	MinEncryptionVersion int               `json:"min_encryption_version"`
	AutoRotatePeriod     string            `json:"auto_rotate_period,omitempty"` // Go duration, "" when none
	NextRotation         *time.Time        `json:"next_rotation_time,omitempty"`
	LastRotated          *time.Time        `json:"last_rotated,omitempty"`
	DeleteAt             *time.Time        `json:"delete_at,omitempty"`
	ApprovalsRequired    int               `json:"approvals_required,omitempty"`
	Extra                map[string]any    `json:"extra,omitempty"` // anything else the key read shows
}

// KeyVersion is one version and its state.
type KeyVersion struct {
	Version     int        `json:"version"`
	Type        string     `json:"type,omitempty"` // the version's algorithm: a rotation may change the key's
	State       string     `json:"state"`          // active, decrypt-only, disabled, destroyed, ...
	CreatedAt   time.Time  `json:"created_at"`
	Encryptions *uint64    `json:"encryptions,omitempty"`
	Limit       *uint64    `json:"encryption_limit,omitempty"`
	DestroyedAt *time.Time `json:"destroyed_at,omitempty"`
}

// History is the key's whole history as stored, its signed head, and what the engine found verifying it. A
// verifier checks Events against Head itself and compares with Verification.
type History struct {
	Events       []json.RawMessage `json:"events"`
	Head         *Head             `json:"head,omitempty"`
	Verification Verification      `json:"verification"`
}

// Checked is what verifying a bundle offline found.
type Checked struct {
	Document *Document
	// SignedWith is the audit key version the bundle's signature names.
	SignedWith int
	// SignatureErr is why the bundle's signature does not verify; nil when it does.
	SignatureErr error
	// History is the chain re-verified from the document's events and head.
	History Verification
	// Vouched says, for each of the document's history events, whether the signed head vouches for it (Vouched).
	Vouched []bool
	// EngineAgrees is whether the engine's own verification in the document says what re-verifying found.
	EngineAgrees bool
}

// OK is whether the bundle verifies whole: its signature, and its history chain.
func (c *Checked) OK() bool { return c.SignatureErr == nil && c.History.Verified && c.EngineAgrees }

// Check verifies a bundle with the audit public keys alone. It returns an error only when the bundle cannot be read
// at all; a bundle that reads but does not verify is a Checked whose OK is false and which says why.
func Check(raw []byte, keys AuditKeys) (*Checked, error) {
	var b Bundle
	if err := json.Unmarshal(raw, &b); err != nil {
		return nil, fmt.Errorf("not an evidence bundle: %w", err)
	}
	if b.Format == "" { // as `vault read -format=json` writes it: the bundle is the response's data
		var resp struct {
			Data *Bundle `json:"data"`
		}
		if json.Unmarshal(raw, &resp) == nil && resp.Data != nil {
			b = *resp.Data
		}
	}
	if b.Format != BundleFormat {
		return nil, fmt.Errorf("bundle format %q is not %q", b.Format, BundleFormat)
	}
	if len(b.Document) == 0 {
		return nil, errors.New("the bundle has no document")
	}
	var doc Document
	if err := json.Unmarshal([]byte(b.Document), &doc); err != nil {
		return nil, fmt.Errorf("the bundle's document: %w", err)
	}
	c := &Checked{Document: &doc, SignedWith: b.Signature.AuditKeyVersion}
	if b.Signature.Algorithm != SignatureAlgorithm {
		c.SignatureErr = fmt.Errorf("signature algorithm %q is not %q", b.Signature.Algorithm, SignatureAlgorithm)
	} else {
		c.SignatureErr = keys.Verify(b.Signature.AuditKeyVersion, []byte(b.Document), b.Signature.Value)
	}
	c.History = VerifyChain(doc.Key.Name, doc.History.Events, doc.History.Head, keys)
	c.Vouched = Vouched(doc.Key.Name, doc.History.Events, doc.History.Head, keys)
	e := doc.History.Verification
	c.EngineAgrees = e.Verified == c.History.Verified && e.Broken == c.History.Broken
	return c, nil
}
