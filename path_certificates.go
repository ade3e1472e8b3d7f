package cmk

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

func (b *backend) pathCSR() *framework.Path {
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/csr",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: "cmk",
			OperationVerb:   "generate-csr-for-key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name":    fieldName,
			"version": {Type: framework.TypeInt, Description: "Version whose key the CSR is for; the latest when not set."},
			"csr": {
				Type:        framework.TypeString,
				Description: "PEM CSR whose subject, subject alternative names and extensions the new CSR takes (its key and signature are ignored). Without it, the CSR has an empty subject.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathCSRWrite), Summary: "Make a PKCS#10 CSR for a signing key's version, signed in the HSM."},
		},
		HelpSynopsis: "Make a certificate signing request for a signing key, signed inside the HSM.",
		HelpDescription: `As Transit's keys/:name/csr: a PKCS#10 request carrying the version's public key, signed by its private key
with a PKCS#11 call (RSA PKCS#1 v1.5 with SHA-256, ECDSA with the curve's hash, or Ed25519). A template CSR's
subject, SANs and extensions are copied. Give the request to a CA, then set the chain it returns with
keys/:name/set-certificate.`,
	}
}

func (b *backend) pathSetCertificate() *framework.Path {
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/set-certificate",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: "cmk",
			OperationVerb:   "set-certificate-for-key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name":    fieldName,
			"version": {Type: framework.TypeInt, Description: "Version the chain certifies; the latest when not set."},
			"certificate_chain": {
				Type:        framework.TypeString,
				Required:    true,
				Description: "PEM certificates, the leaf (certifying the version's public key) first, then intermediates, optionally the root.",
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathSetCertificateWrite), Summary: "Set the certificate chain of a signing key's version."},
		},
		HelpSynopsis: "Set the certificate chain of a signing key's version.",
		HelpDescription: `As Transit's keys/:name/set-certificate. The leaf must certify the version's public key, and each certificate
must be signed by the next one. The chain is shown as certificate_chain on the key read, exported by
export/certificate-chain/:name, and recorded in the key's history.`,
	}
}

// certifiedVersion is the key and version a certificate is for: a signing key's version that may verify (a
// certificate for an older version's public key: keys.Key.DecryptionVersion). Setting a certificate uses no key
// material.
func (b *backend) certifiedVersion(ctx context.Context, req *logical.Request, d *framework.FieldData) (*keys.Key, int, error) {
	name := d.Get("name").(string)
	k, err := b.keys.Get(ctx, req.Storage, name)
	if err != nil {
		return nil, 0, err
	}
	if k == nil {
		return nil, 0, callerf("signing key %q not found", name)
	}
	if !k.Type.Info().Sign {
		return nil, 0, k.Type.Unsupported("signing")
	}
	if err := k.Usable(); err != nil {
		return nil, 0, err
	}
	n := k.LatestVersion
	if requested, _ := d.Get("version").(int); requested != 0 {
		n = requested
	}
	if _, err := k.DecryptionVersion(n, "key"); err != nil {
		return nil, 0, err
	}
	return k, n, nil
}

func (b *backend) pathCSRWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	u, err := b.keys.Use(ctx, req.Storage, d.Get("name").(string), b.callerOf(req), keys.OpCSR, 1)
	if err != nil {
		return respond(err)
	}
	tmpl := &x509.CertificateRequest{}
	if s := d.Get("csr").(string); s != "" {
		block, _ := pem.Decode([]byte(s))
		if block == nil || block.Type != "CERTIFICATE REQUEST" {
			return respond(callerf("csr must be a PEM CERTIFICATE REQUEST"))
		}
		given, err := x509.ParseCertificateRequest(block.Bytes)
		if err != nil {
			return respond(callerf("csr cannot be parsed: %v", err))
		}
		tmpl.Subject, tmpl.DNSNames, tmpl.EmailAddresses = given.Subject, given.DNSNames, given.EmailAddresses
		tmpl.IPAddresses, tmpl.URIs = given.IPAddresses, given.URIs
		for _, ext := range given.Extensions {
			if !ext.Id.Equal(oidSubjectAltName) { // made again from the names above
				tmpl.ExtraExtensions = append(tmpl.ExtraExtensions, ext)
			}
		}
	}
	version, _ := d.Get("version").(int)
	der, err := u.SignCSR(ctx, version, tmpl)
	if err != nil {
		return respond(err)
	}
	k := u.Key()
	typ := k.Type // the signing version's: an older one may be of another type
	if v := k.Versions[version]; v != nil {
		typ = v.Type
	}
	return &logical.Response{Data: map[string]interface{}{
		"name": k.Name,
		"type": string(typ),
		"csr":  string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})),
	}}, nil
}

var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

func (b *backend) pathSetCertificateWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	k, n, err := b.certifiedVersion(ctx, req, d)
	if err != nil {
		return respond(err)
	}
	chain, err := parseChain(d.Get("certificate_chain").(string))
	if err != nil {
		return respond(err)
	}
	pub, ok := k.Versions[n].Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(chain[0].PublicKey) {
		return respond(callerf("the chain's leaf certificate (subject %q) does not certify version %d of key %q: its public key differs", chain[0].Subject.String(), n, k.Name))
	}
	var canonical strings.Builder
	for _, c := range chain {
		_ = pem.Encode(&canonical, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	_, err = b.keys.Update(ctx, req.Storage, k.Name, actorOf(req), func(tx *keys.Tx) error {
		return tx.SetCertificateChain(n, canonical.String(), chain[0].Subject.String())
	})
	if err != nil {
		return respond(err)
	}
	return nil, nil
}

// parseChain reads PEM certificates, leaf first, each signed by the next.
func parseChain(s string) ([]*x509.Certificate, error) {
	var chain []*x509.Certificate
	rest := []byte(s)
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, callerf("certificate_chain holds a %s block: only CERTIFICATE blocks are accepted", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, callerf("certificate %d of certificate_chain cannot be parsed: %v", len(chain)+1, err)
		}
		chain = append(chain, c)
	}
	if len(chain) == 0 {
		return nil, callerf("certificate_chain holds no PEM certificate")
	}
	for i := 0; i+1 < len(chain); i++ {
		if err := chain[i].CheckSignatureFrom(chain[i+1]); err != nil {
			return nil, callerf("certificate %d (subject %q) is not signed by certificate %d (subject %q): give the chain leaf first, each certificate followed by its issuer",
				i+1, chain[i].Subject.String(), i+2, chain[i+1].Subject.String())
		}
	}
	return chain, nil
}
