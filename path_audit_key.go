package cmk

import (
	"context"
	"strconv"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

const auditKeyHelp = "The audit key is the mount's ECDSA P-256 key generated in the HSM (its private key never leaves it) that signs " +
	"the head of every key's history chain (keys/:name/history/verify) and the evidence an auditor takes away. It is made " +
	"at the mount's first history event; a token without ECDSA P-256 cannot make it, and history is then recorded and " +
	"chained but not vouched for. After a failure to make it the engine tries again on its own at most every 5 minutes " +
	"(logging each failure once); audit_key/rotate tries at once. Every version is kept: heads signed before a rotation go on verifying with their " +
	"version's public key, and new heads are signed with the latest. A version's public key is the token's: storage's " +
	"record of it is used only once the token shows it holds that key. Its HSM objects are labelled " +
	"cmk/<mount>/audit_key:v<N>: reconcile and adoption never take them for a key's."

func (b *backend) pathAuditKey() []*framework.Path {
	return []*framework.Path{
		{
			Pattern:      "audit_key",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "read", OperationSuffix: "audit-key"},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation: &framework.PathOperation{Callback: handle(b.pathAuditKeyRead), Summary: "The audit key's public keys, every version."},
			},
			HelpSynopsis: "Read the public keys of the mount's audit key, which signs history heads and evidence.",
			HelpDescription: auditKeyHelp + " The read returns each version's PEM public key (PKIX \"PUBLIC KEY\"), when and by whom " +
				"it was made, and latest_version (0 and no versions before the mount's first history event). Reading makes nothing. " +
				"Only the versions the token vouches for are served: a version whose public key in storage is not the one the token " +
				"holds under the version's label and CKA_ID (or that is not on the token) is never used to verify or sign, and " +
				"unvouched_versions names it with why. The check asks the token once per version and process: the read answers " +
				"503 when the HSM cannot be reached and a version is not checked yet.",
		},
		{
			Pattern:      "audit_key/rotate",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "rotate", OperationSuffix: "audit-key"},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathAuditKeyRotate), Summary: "Make a new audit key version in the HSM."},
			},
			HelpSynopsis: "Rotate the audit key: a new version, generated in the HSM, signs from now on.",
			HelpDescription: auditKeyHelp + " A rotation makes the next version in the HSM and answers as a read does; earlier " +
				"versions are kept. It is an operator's action under the caller's ACL policy: who rotated is the new version's " +
				"created_by, and the plugin logs it.",
		},
	}
}

func (b *backend) pathAuditKeyRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	a, unvouched, err := b.keys.AuditKey(ctx, req.Storage)
	if err != nil {
		return respond(err)
	}
	return formatAuditKey(a, unvouched), nil
}

func (b *backend) pathAuditKeyRotate(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	if _, err := b.keys.RotateAuditKey(ctx, req.Storage, actorOf(req)); err != nil {
		return respond(err)
	}
	return b.pathAuditKeyRead(ctx, req, nil)
}

func formatAuditKey(a *keys.AuditKey, unvouched map[int]string) *logical.Response {
	versions := map[string]interface{}{}
	latest := 0
	if a != nil {
		latest = a.LatestVersion
		for _, n := range a.SortedVersions() {
			v := a.Versions[n]
			versions[strconv.Itoa(n)] = map[string]interface{}{
				"public_key": v.PublicKey,
				"created_at": v.CreatedAt.Format(time.RFC3339Nano),
				"created_by": v.CreatedBy,
				"label":      v.Label,
			}
		}
	}
	refused := map[string]interface{}{}
	for n, why := range unvouched {
		refused[strconv.Itoa(n)] = why
	}
	return &logical.Response{Data: map[string]interface{}{
		"latest_version":     latest,
		"algorithm":          evidence.SignatureAlgorithm,
		"versions":           versions,
		"unvouched_versions": refused,
	}}
}
