package cmk

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

func (b *backend) pathEvidence() *framework.Path {
	return &framework.Path{
		Pattern:      "keys/" + framework.GenericNameRegex("name") + "/evidence",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "read", OperationSuffix: "key-evidence"},
		Fields:       map[string]*framework.FieldSchema{"name": fieldName},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{Callback: handle(b.pathEvidenceRead),
				Summary: "One document of everything the engine can say of the key, signed by the mount's audit key."},
		},
		HelpSynopsis:    "An evidence bundle for an auditor: the key's metadata, versions, access, grants, verified history, usage and anomalies, signed in the HSM.",
		HelpDescription: evidenceHelp,
	}
}

const evidenceHelp = `Returns {format, document, signature}. document is the JSON text of one document (a string, the exact bytes ` +
	`signed, so that it survives any re-encoding of the response): generated_at, mount, the key's metadata as its read ` +
	`shows it (owner, description, tags, data_assets, type, state, rotation), every version and its state, the access ` +
	`conditions (keys/:name/access), the grants in force (keys/:name/grants; the history records ended ones), the whole history as stored with its ` +
	`signed chain head and the engine's verification of it (keys/:name/history/verify), the usage report ` +
	`(keys/:name/usage) and recent anomalies, and the audit key's public keys. signature is the mount's audit key's ` +
	`ECDSA P-256 signature (SHA-256, ASN.1 DER, base64) over the document's bytes, made in the HSM, with the audit key ` +
	`version that made it. A key that was deleted still has evidence: its history, state "deleted". ` +
	`cmk-evidence (cmd/cmk-evidence) verifies a bundle offline with the audit public keys alone, read from audit_key ` +
	`beforehand and kept by the auditor, and writes an HTML report; kept bundles let it check that a later bundle's history goes on from an earlier one's (cmk-evidence verify --previous), which a rollback of storage to an older signed head does not. Reading evidence makes no change and records no ` +
	`event; it signs in the HSM, so it answers 503 while the HSM is unreachable.`

func (b *backend) pathEvidenceRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	k, err := b.keys.Get(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	events, head, verification, err := b.keys.VerifyHistory(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	if k == nil && len(events) == 0 {
		return nil, nil // no key and no history: 404
	}
	doc := evidence.Document{
		GeneratedAt: time.Now().UTC(),
		Mount:       mountOf(req),
		Key:         evidence.KeyMetadata{Name: name, State: "deleted"},
		History:     evidence.History{Events: events, Head: head, Verification: verification},
	}
	if k != nil {
		doc.Key = evidenceKey(k, b.summarize(k, nil, doc.GeneratedAt).state)
		doc.Versions = b.evidenceVersions(k)
		if doc.Access, err = json.Marshal(b.formatAccess(k)); err != nil {
			return nil, err
		}
		grants, err := b.keys.Grants(ctx, req.Storage, name)
		if err != nil {
			return nil, err
		}
		for _, g := range grants {
			if g.State != keys.GrantLive {
				continue // the history records the others: created, revoked, used up, expired
			}
			raw, err := json.Marshal(formatGrant(g))
			if err != nil {
				return nil, err
			}
			doc.Grants = append(doc.Grants, raw)
		}
	}
	if doc.Usage, err = json.Marshal(b.keys.Usage(ctx, req.Storage, name)); err != nil {
		return nil, err
	}
	for _, a := range b.keys.Anomalies(ctx, req.Storage, name) {
		raw, err := json.Marshal(a)
		if err != nil {
			return nil, err
		}
		doc.Anomalies = append(doc.Anomalies, raw)
	}
	if doc.AuditKeys, err = b.keys.AuditPublicKeys(ctx, req.Storage); err != nil {
		return nil, err
	}
	text, err := json.Marshal(doc)
	if err != nil {
		return nil, err
	}
	version, sig, err := b.keys.AuditSign(ctx, req.Storage, text)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]interface{}{
		"format":   evidence.BundleFormat,
		"document": string(text),
		"signature": map[string]interface{}{
			"algorithm": evidence.SignatureAlgorithm, "audit_key_version": version, "value": sig,
		},
	}}, nil
}

// mountOf names the mount a request reached: its path, and its accessor where Vault gives it.
func mountOf(req *logical.Request) string {
	if req.MountAccessor == "" {
		return req.MountPoint
	}
	return fmt.Sprintf("%s (accessor %s)", req.MountPoint, req.MountAccessor)
}

// evidenceKey is the key's metadata as a bundle carries it.
func evidenceKey(k *keys.Key, state string) evidence.KeyMetadata {
	at := func(t time.Time) *time.Time {
		if t.IsZero() {
			return nil
		}
		t = t.UTC()
		return &t
	}
	m := evidence.KeyMetadata{
		Name: k.Name, Type: string(k.Type), Owner: k.Owner, Description: k.Description, Tags: k.Tags,
		DataAssets: k.DataAssets, CreatedAt: k.CreatedAt.UTC(), State: state, LatestVersion: k.LatestVersion,
		MinDecryptionVersion: k.MinDecryptionVersion, MinEncryptionVersion: k.MinEncryptionVersion,
		NextRotation: at(k.NextRotation), LastRotated: at(k.LastRotated), DeleteAt: at(k.DeleteAt),
		ApprovalsRequired: k.ApprovalsRequired,
	}
	if k.AutoRotatePeriod > 0 {
		m.AutoRotatePeriod = k.AutoRotatePeriod.String()
	}
	return m
}

// evidenceVersions lists the key's versions, oldest first, with their states and, for AES keys, their use.
func (b *backend) evidenceVersions(k *keys.Key) []evidence.KeyVersion {
	ns := make([]int, 0, len(k.Versions))
	for n := range k.Versions {
		ns = append(ns, n)
	}
	sort.Ints(ns)
	out := make([]evidence.KeyVersion, 0, len(ns))
	for _, n := range ns {
		v := k.Versions[n]
		kv := evidence.KeyVersion{Version: n, Type: string(v.Type), State: k.VersionState(n), CreatedAt: v.CreatedAt.UTC()}
		if !v.DestroyedAt.IsZero() {
			t := v.DestroyedAt.UTC()
			kv.DestroyedAt = &t
		}
		if v.Type.IsAES() {
			if used, ok := b.keys.EncryptionCount(k.Name, n); ok {
				limit := k.EncryptionLimit()
				kv.Encryptions, kv.Limit = &used, &limit
			}
		}
		out = append(out, kv)
	}
	return out
}
