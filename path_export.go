package cmk

import (
	"context"
	"strconv"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// Export types, as Transit names them. Only public ones are served: the others would reveal key material, which
// is a non-extractable HSM object.
const (
	exportPublicKey        = "public-key"
	exportCertificateChain = "certificate-chain"
)

var exportTypes = []interface{}{"encryption-key", "signing-key", "hmac-key", exportPublicKey, exportCertificateChain}

func (b *backend) pathExport() *framework.Path {
	return &framework.Path{
		Pattern: "export/" + framework.GenericNameRegex("type") + "/" + framework.GenericNameRegex("name") + framework.OptionalParamRegex("version"),
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: "cmk",
			OperationVerb:   "export",
			OperationSuffix: "key|key-version",
		},
		Fields: map[string]*framework.FieldSchema{
			"type": {
				Type:          framework.TypeString,
				AllowedValues: exportTypes,
				Description:   `What to export: "public-key" (RSA, ECDSA, Ed25519 keys) or "certificate-chain" (versions with a chain set by set-certificate). Transit's other types reveal key material and are refused.`,
			},
			"name":    fieldName,
			"version": {Type: framework.TypeString, Description: `A version number or "latest"; all versions when omitted.`},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{Callback: b.pathExportRead, Summary: "Export a key's public keys or certificate chains."},
		},
		HelpSynopsis: "Export the public half of an asymmetric key, or the certificate chains set for its versions.",
		HelpDescription: `As Transit's export, for what is public: public-key gives each version's public key (PEM; Ed25519 base64),
certificate-chain the chain set with keys/:name/set-certificate. Neither needs the key to be exportable. The types
that would return key material (encryption-key, signing-key, hmac-key) are refused with HTTP 400: the material is
a non-extractable HSM object. Destroyed versions are left out.`,
	}
}

func (b *backend) pathExportRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	typ, name := d.Get("type").(string), d.Get("name").(string)
	switch typ {
	case exportPublicKey, exportCertificateChain:
	case "encryption-key", "signing-key", "hmac-key":
		return respond(callerf("export of %s is not possible: %s", typ, msgNonExtractable))
	default:
		return respond(callerf("unknown export type %q: public-key or certificate-chain", typ))
	}
	k, err := b.keys.Get(ctx, req.Storage, name)
	if err != nil {
		return respond(err)
	}
	if k == nil {
		return respond(callerf("key %q not found", name))
	}
	if !k.Type.Asymmetric() {
		return respond(callerf("%s export needs an asymmetric key; key %q is %s", typ, name, k.Type))
	}
	versions, err := exportVersions(k, d.Get("version").(string))
	if err != nil {
		return respond(err)
	}
	out := map[string]interface{}{}
	for _, n := range versions {
		v := k.Versions[n]
		value := v.PublicKey
		if typ == exportCertificateChain {
			value = v.CertificateChain
		}
		if value != "" {
			out[strconv.Itoa(n)] = value
		}
	}
	if len(out) == 0 && typ == exportCertificateChain {
		return respond(callerf("no certificate chain is set for the requested versions of key %q: keys/%s/set-certificate sets one", name, name))
	}
	return &logical.Response{Data: map[string]interface{}{"name": k.Name, "type": string(k.Type), "keys": out}}, nil
}

// exportVersions resolves Transit's version parameter: empty for every version that still exists, "latest", or a
// number.
func exportVersions(k *keys.Key, version string) ([]int, error) {
	alive := func(n int) bool { v := k.Versions[n]; return v != nil && v.State != keys.StateDestroyed }
	switch strings.TrimPrefix(version, "v") {
	case "":
		var out []int
		for n := 1; n <= k.LatestVersion; n++ {
			if alive(n) {
				out = append(out, n)
			}
		}
		return out, nil
	case "latest":
		return []int{k.LatestVersion}, nil
	}
	n, err := strconv.Atoi(strings.TrimPrefix(version, "v"))
	if err != nil || n < 1 {
		return nil, callerf("version must be a number or \"latest\", not %q", version)
	}
	if !alive(n) {
		return nil, callerf("version %d of key %q does not exist or was destroyed", n, k.Name)
	}
	return []int{n}, nil
}
