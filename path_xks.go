package cmk

import (
	"context"
	"encoding/base32"
	"encoding/base64"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/xks"
)

// AWS KMS External Key Store, its configuration: key stores, their SigV4 credentials and the keys they expose.
// Serving the XKS API is xks.go.

// Storage: a key store's settings; its credentials, seal-wrapped and kept by access key id (unique across the
// mount, so that a request's Authorization header finds its secret in one read); its external keys.
const (
	xksStoresPrefix      = "xks/stores/"
	xksCredentialsPrefix = "xks/credentials/"
	xksKeysPrefix        = "xks/keys/"
)

// xksStore is a key store: one XksProxyUriPath, for one AWS account or tenant, with its own credentials, keys,
// rules and throttle.
type xksStore struct {
	Name       string `json:"name"`
	PathPrefix string `json:"path_prefix"` // "" or /<prefix>: the URI path is PathPrefix + /kms/xks/v1
	xksRules
	RequestsPerSecond int       `json:"requests_per_second,omitempty"` // 0: no throttle
	Burst             int       `json:"burst,omitempty"`
	Disabled          bool      `json:"disabled,omitempty"` // the store's kill switch: InvalidStateException to every request
	CreatedAt         time.Time `json:"created_at"`
}

func (s *xksStore) uriPath() string { return s.PathPrefix + xks.APISuffix }

// xksRules is authorization on a request's requestMetadata, per store and per key, beside the key's own access
// conditions: a pattern list that is empty allows any value; '*' in a pattern matches any run of characters.
type xksRules struct {
	AllowedPrincipalARNs []string `json:"allowed_principal_arns,omitempty"`
	AllowedVPCEndpoints  []string `json:"allowed_vpc_endpoints,omitempty"`
	AllowedKMSKeyARNs    []string `json:"allowed_kms_key_arns,omitempty"`
}

// xksCredential is a SigV4 credential of a store. Its secret is write-only: only the response that creates it
// carries it.
type xksCredential struct {
	Store     string    `json:"store"`
	Secret    string    `json:"secret"`
	CreatedAt time.Time `json:"created_at"`
	CreatedBy string    `json:"created_by"`
}

// xksKey is an external key of a store: an AES-256 key of the mount, exposed to AWS under its external key id.
type xksKey struct {
	Key string `json:"key"`
	// KeyCreatedAt tells the key exposed from one made later under its name, after a deletion: AWS's ciphertexts
	// were made with the first one's material.
	KeyCreatedAt time.Time `json:"key_created_at"`
	KeyUsage     []string  `json:"key_usage"` // ENCRYPT, DECRYPT
	Disabled     bool      `json:"disabled,omitempty"`
	xksRules
}

// maxXKSCredentials per store: two rotate without downtime, as the specification asks, and two more for overlap.
const maxXKSCredentials = 4

var (
	xksStoreField     = &framework.FieldSchema{Type: framework.TypeString, Required: true, Description: "Name of the key store: 1–64 of A-Z, a-z, 0-9, '-' and '_'."}
	xksKeyIDField     = &framework.FieldSchema{Type: framework.TypeString, Required: true, Description: "The external key id AWS KMS names the key by (create-key --xks-key-id): 1–128 of A-Z, a-z, 0-9, '-', '.' and '_'."}
	xksAccessKeyField = &framework.FieldSchema{Type: framework.TypeString, Description: "SigV4 access key id: 20–30 of A-Z and 2-7. Generated when not given."}
	xksRuleFields     = map[string]*framework.FieldSchema{
		"allowed_principal_arns": {Type: framework.TypeCommaStringSlice, Description: "requestMetadata.awsPrincipalArn patterns allowed ('*' matches any run of characters); empty: any principal."},
		"allowed_vpc_endpoints":  {Type: framework.TypeCommaStringSlice, Description: "requestMetadata.awsSourceVpce values allowed ('*' as above); empty: any, and requests not made through a VPC endpoint. When set, a request without one is refused."},
		"allowed_kms_key_arns":   {Type: framework.TypeCommaStringSlice, Description: "requestMetadata.kmsKeyArn patterns allowed ('*' as above); empty: any. GetKeyMetadata for CreateKey carries no kmsKeyArn and is not refused for lacking one."},
	}
)

// The paths' parameters; lengths and the access key id's alphabet are checked where they are written.
const (
	xksStorePattern  = `(?P<store>[A-Za-z0-9_-]+)`
	xksKeyIDPattern  = `(?P<external_key_id>[A-Za-z0-9._-]+)`
	xksAccessPattern = `(?P<access_key_id>[A-Za-z0-9]+)`
)

var xksStoreName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

var xksAccessKeyID = regexp.MustCompile(`^[A-Z2-7]{20,30}$`)

const xksHelp = "AWS KMS External Key Store (XKS): AWS KMS keys whose material is a key of this mount, in your HSM. A key store " +
	"is one XKS proxy URI path (one AWS account or tenant) with its own SigV4 credentials, external keys, request rules and " +
	"throttle. AWS's requests reach the engine through cmd/cmk-xks-proxy, which terminates TLS and forwards each request's " +
	"bytes to xks/request with its own Vault token: the engine verifies SigV4 over the bytes AWS signed, and every use of a " +
	"key passes the same door as Vault's own requests (access conditions, grants, disable, usage analytics, metrics)."

func xksRuleFieldsWith(fields map[string]*framework.FieldSchema) map[string]*framework.FieldSchema {
	for k, v := range xksRuleFields {
		fields[k] = v
	}
	return fields
}

func (b *backend) pathXKS() []*framework.Path {
	return []*framework.Path{
		{
			Pattern:      "xks/stores/?$",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "list", OperationSuffix: "xks-stores"},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ListOperation: &framework.PathOperation{Callback: handle(b.pathXKSStoresList), Summary: "List the XKS key stores."},
			},
			HelpSynopsis:    "List the mount's AWS External Key Stores.",
			HelpDescription: xksHelp,
		},
		{
			Pattern:      "xks/stores/" + xksStorePattern,
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationSuffix: "xks-store"},
			Fields: xksRuleFieldsWith(map[string]*framework.FieldSchema{
				"store": xksStoreField,
				"path_prefix": {Type: framework.TypeString, Description: "The URI path's prefix: /<prefix> or empty; the store's XksProxyUriPath is " +
					"path_prefix + /kms/xks/v1, at most 128 characters of a-z, A-Z, 0-9, /, - and _. Default: /<store>."},
				"requests_per_second": {Type: framework.TypeInt, Description: "The store's throttle, requests per second on each node (ThrottlingException past it); 0: none."},
				"burst":               {Type: framework.TypeInt, Description: "Requests the throttle lets through at once; default requests_per_second."},
				"disabled": {Type: framework.TypeBool, Description: "The store's kill switch: while true every request to it, health included, " +
					"is InvalidStateException, and AWS KMS reports its keys unusable. Vault's own use of the keys goes on."},
			}),
			ExistenceCheck: b.xksStoreExists,
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.CreateOperation: &framework.PathOperation{Callback: handle(b.pathXKSStoreWrite), Summary: "Create a key store."},
				logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathXKSStoreWrite), Summary: "Change a key store's rules or throttle."},
				logical.ReadOperation:   &framework.PathOperation{Callback: handle(b.pathXKSStoreRead), Summary: "Read a key store."},
				logical.DeleteOperation: &framework.PathOperation{Callback: handle(b.pathXKSStoreDelete), Summary: "Delete a key store that exposes no key, and its credentials."},
			},
			HelpSynopsis: "Create, read, change or delete an AWS External Key Store.",
			HelpDescription: xksHelp + " The read gives uri_path, the XksProxyUriPath to give AWS (create-custom-key-store " +
				"--xks-proxy-uri-path), the rules, the throttle, the credentials' access key ids and the number of external keys. " +
				"path_prefix is fixed at creation. A store that exposes keys cannot be deleted: delete its keys first.",
		},
		{
			Pattern:      "xks/stores/" + xksStorePattern + "/credentials$",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "add", OperationSuffix: "xks-credential"},
			Fields: map[string]*framework.FieldSchema{
				"store":             xksStoreField,
				"access_key_id":     xksAccessKeyField,
				"secret_access_key": {Type: framework.TypeString, Description: "SigV4 secret: 43–64 Base64 characters (at least 256 bits). Generated from the HSM's random number generator when not given; give one only with access_key_id, to take over an existing key store's."},
			},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathXKSCredentialCreate), Summary: "Add a SigV4 credential to a key store; its secret is returned once."},
			},
			HelpSynopsis: "Add a SigV4 credential AWS KMS signs a key store's requests with.",
			HelpDescription: xksHelp + " A store holds at most 4 credentials, any of which verifies a request: add a new one, give it " +
				"to AWS (update-custom-key-store --xks-proxy-authentication-credential), then delete the old one: rotation without " +
				"downtime. The secret is returned only by the write that creates it, and stored seal-wrapped where Vault offers seal " +
				"wrapping; no read returns it. The response also gives kms_console_file, the JSON the AWS KMS console accepts.",
		},
		{
			Pattern:      "xks/stores/" + xksStorePattern + "/credentials/$",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "list", OperationSuffix: "xks-credentials"},
			Fields:       map[string]*framework.FieldSchema{"store": xksStoreField},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ListOperation: &framework.PathOperation{Callback: handle(b.pathXKSCredentialsList), Summary: "List a key store's access key ids."},
			},
			HelpSynopsis:    "List the access key ids of a key store's SigV4 credentials.",
			HelpDescription: xksHelp,
		},
		{
			Pattern:      "xks/stores/" + xksStorePattern + "/credentials/" + xksAccessPattern,
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationSuffix: "xks-credential"},
			Fields:       map[string]*framework.FieldSchema{"store": xksStoreField, "access_key_id": xksAccessKeyField},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation:   &framework.PathOperation{Callback: handle(b.pathXKSCredentialRead), Summary: "Read a credential (never its secret)."},
				logical.DeleteOperation: &framework.PathOperation{Callback: handle(b.pathXKSCredentialDelete), Summary: "Delete a credential: requests signed with it fail from now on."},
			},
			HelpSynopsis:    "Read or delete one SigV4 credential of a key store.",
			HelpDescription: xksHelp + " The read gives the store, when and by whom the credential was made; never the secret.",
		},
		{
			Pattern:      "xks/stores/" + xksStorePattern + "/keys/?$",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "list", OperationSuffix: "xks-keys"},
			Fields:       map[string]*framework.FieldSchema{"store": xksStoreField},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ListOperation: &framework.PathOperation{Callback: handle(b.pathXKSKeysList), Summary: "List a key store's external key ids."},
			},
			HelpSynopsis:    "List the external keys a key store exposes to AWS KMS.",
			HelpDescription: xksHelp,
		},
		{
			Pattern:      "xks/stores/" + xksStorePattern + "/keys/" + xksKeyIDPattern,
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationSuffix: "xks-key"},
			Fields: xksRuleFieldsWith(map[string]*framework.FieldSchema{
				"store":           xksStoreField,
				"external_key_id": xksKeyIDField,
				"key":             {Type: framework.TypeString, Description: "The mount's key to expose: an aes256-gcm96 key, exposed by no other external key. Fixed once set."},
				"key_usage": {Type: framework.TypeCommaStringSlice, Description: "What AWS may do with it: ENCRYPT, DECRYPT or both (default). " +
					"A request for another is InvalidKeyUsageException."},
				"disabled": {Type: framework.TypeBool, Description: "This external key's kill switch: while true GetKeyMetadata reports DISABLED and " +
					"encrypt and decrypt are InvalidStateException; the key itself, and Vault's own use of it, are untouched."},
			}),
			ExistenceCheck: b.xksKeyExists,
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.CreateOperation: &framework.PathOperation{Callback: handle(b.pathXKSKeyWrite), Summary: "Expose a key to AWS KMS."},
				logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathXKSKeyWrite), Summary: "Change an external key's usage or rules."},
				logical.ReadOperation:   &framework.PathOperation{Callback: handle(b.pathXKSKeyRead), Summary: "Read an external key."},
				logical.DeleteOperation: &framework.PathOperation{Callback: handle(b.pathXKSKeyDelete), Summary: "Stop exposing a key: AWS's requests for it fail with KeyNotFoundException."},
			},
			HelpSynopsis: "Expose one of the mount's AES-256 keys to AWS KMS under an external key id.",
			HelpDescription: xksHelp + " AWS KMS names the key by external_key_id (aws kms create-key --origin EXTERNAL_KEY_STORE " +
				"--xks-key-id). Every version of the key serves: the ciphertext metadata AWS keeps with each ciphertext names the " +
				"version, so rotation (manual, scheduled or for usage) is invisible to AWS and older ciphertexts keep decrypting " +
				"while their version serves decryption. Disabling the key (keys/:name/disable) stops AWS's use at once: " +
				"GetKeyMetadata reports DISABLED and encrypt and decrypt fail with InvalidStateException; disabled=true here does the " +
				"same for AWS alone. A key deleted (and one made again under its name) is KeyNotFoundException: its material is " +
				"not what AWS's ciphertexts were made with. The rules here apply besides the store's.",
		},
		b.pathXKSRequest(),
	}
}

func (b *backend) xksStoreExists(ctx context.Context, req *logical.Request, d *framework.FieldData) (bool, error) {
	st, err := getJSON[xksStore](ctx, req.Storage, xksStoresPrefix+d.Get("store").(string))
	return st != nil, err
}

func (b *backend) xksKeyExists(ctx context.Context, req *logical.Request, d *framework.FieldData) (bool, error) {
	k, err := getJSON[xksKey](ctx, req.Storage, xksKeysPrefix+d.Get("store").(string)+"/"+d.Get("external_key_id").(string))
	return k != nil, err
}

func getJSON[T any](ctx context.Context, s logical.Storage, path string) (*T, error) {
	e, err := s.Get(ctx, path)
	if err != nil || e == nil {
		return nil, err
	}
	var v T
	if err := e.DecodeJSON(&v); err != nil {
		return nil, fmt.Errorf("decode %s: %w", path, err)
	}
	return &v, nil
}

func putJSON(ctx context.Context, s logical.Storage, path string, v interface{}) error {
	e, err := logical.StorageEntryJSON(path, v)
	if err != nil {
		return err
	}
	return s.Put(ctx, e)
}

func (b *backend) pathXKSStoresList(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	names, err := req.Storage.List(ctx, xksStoresPrefix)
	if err != nil {
		return nil, err
	}
	return logical.ListResponse(names), nil
}

// readRules reads the rule fields given in d into r.
func readRules(d *framework.FieldData, r *xksRules) {
	for field, dst := range map[string]*[]string{
		"allowed_principal_arns": &r.AllowedPrincipalARNs,
		"allowed_vpc_endpoints":  &r.AllowedVPCEndpoints,
		"allowed_kms_key_arns":   &r.AllowedKMSKeyARNs,
	} {
		v, ok := d.GetOk(field)
		if !ok {
			continue
		}
		list := []string{}
		for _, p := range v.([]string) {
			if p = strings.TrimSpace(p); p != "" {
				list = append(list, p)
			}
		}
		*dst = list
	}
}

func (b *backend) pathXKSStoreWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("store").(string)
	b.xks.writeMu.Lock()
	defer b.xks.writeMu.Unlock()
	st, err := getJSON[xksStore](ctx, req.Storage, xksStoresPrefix+name)
	if err != nil {
		return nil, err
	}
	if st == nil && !xksStoreName.MatchString(name) {
		return respond(callerf("a key store's name is 1–64 of A-Z, a-z, 0-9, '-' and '_'"))
	}
	prefix, given := d.GetOk("path_prefix")
	if st == nil {
		st = &xksStore{Name: name, PathPrefix: "/" + name, CreatedAt: time.Now().UTC()}
		if given {
			st.PathPrefix = strings.TrimSuffix(prefix.(string), "/")
		}
		if err := xks.CheckURIPath(st.uriPath()); err != nil {
			return respond(callerf("path_prefix: %v", err))
		}
		cfg, err := b.xks.config(ctx, req.Storage) // current: every write drops it, under writeMu
		if err != nil {
			return nil, err
		}
		for _, o := range cfg.stores {
			if o.uriPath() == st.uriPath() {
				return respond(callerf("key store %q already serves %s", o.Name, o.uriPath()))
			}
		}
	} else if given && strings.TrimSuffix(prefix.(string), "/") != st.PathPrefix {
		return respond(callerf("path_prefix is fixed at creation (%q): AWS KMS holds the URI path; make another store instead", st.PathPrefix))
	}
	readRules(d, &st.xksRules)
	if v, ok := d.GetOk("requests_per_second"); ok {
		st.RequestsPerSecond = v.(int)
	}
	if v, ok := d.GetOk("burst"); ok {
		st.Burst = v.(int)
	}
	if v, ok := d.GetOk("disabled"); ok {
		st.Disabled = v.(bool)
	}
	if st.RequestsPerSecond < 0 || st.Burst < 0 {
		return respond(callerf("requests_per_second and burst cannot be negative"))
	}
	if err := putJSON(ctx, req.Storage, xksStoresPrefix+name, st); err != nil {
		return nil, err
	}
	b.xks.drop()
	return b.pathXKSStoreRead(ctx, req, d)
}

// xksCredentialsOf lists the access key ids of store's credentials.
func xksCredentialsOf(ctx context.Context, s logical.Storage, store string) ([]string, error) {
	ids, err := s.List(ctx, xksCredentialsPrefix)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, id := range ids {
		c, err := getJSON[xksCredential](ctx, s, xksCredentialsPrefix+id)
		if err != nil {
			return nil, err
		}
		if c != nil && c.Store == store {
			out = append(out, id)
		}
	}
	sort.Strings(out)
	return out, nil
}

func (b *backend) pathXKSStoreRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("store").(string)
	st, err := getJSON[xksStore](ctx, req.Storage, xksStoresPrefix+name)
	if err != nil || st == nil {
		return nil, err
	}
	creds, err := xksCredentialsOf(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	ks, err := req.Storage.List(ctx, xksKeysPrefix+name+"/")
	if err != nil {
		return nil, err
	}
	burst := st.Burst
	if burst == 0 {
		burst = st.RequestsPerSecond
	}
	data := map[string]interface{}{
		"name": st.Name, "path_prefix": st.PathPrefix, "uri_path": st.uriPath(),
		"requests_per_second": st.RequestsPerSecond, "burst": burst,
		"access_key_ids": nonNil(creds), "external_keys": len(ks), "created_at": st.CreatedAt.Format(time.RFC3339),
		"disabled": st.Disabled,
	}
	rulesInto(data, st.xksRules)
	return &logical.Response{Data: data}, nil
}

func rulesInto(data map[string]interface{}, r xksRules) {
	data["allowed_principal_arns"] = nonNil(r.AllowedPrincipalARNs)
	data["allowed_vpc_endpoints"] = nonNil(r.AllowedVPCEndpoints)
	data["allowed_kms_key_arns"] = nonNil(r.AllowedKMSKeyARNs)
}

func (b *backend) pathXKSStoreDelete(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("store").(string)
	b.xks.writeMu.Lock()
	defer b.xks.writeMu.Unlock()
	ks, err := req.Storage.List(ctx, xksKeysPrefix+name+"/")
	if err != nil {
		return nil, err
	}
	if len(ks) > 0 {
		return respond(callerf("key store %q exposes %d keys: delete them first (xks/stores/%s/keys/<external_key_id>)", name, len(ks), name))
	}
	creds, err := xksCredentialsOf(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	for _, id := range creds {
		if err := req.Storage.Delete(ctx, xksCredentialsPrefix+id); err != nil {
			return nil, err
		}
	}
	if err := req.Storage.Delete(ctx, xksStoresPrefix+name); err != nil {
		return nil, err
	}
	b.xks.drop()
	return nil, nil
}

func (b *backend) pathXKSCredentialsList(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	ids, err := xksCredentialsOf(ctx, req.Storage, d.Get("store").(string))
	if err != nil {
		return nil, err
	}
	return logical.ListResponse(ids), nil
}

var xksSecretPattern = regexp.MustCompile(`^[A-Za-z0-9+/=]{43,64}$`)

func (b *backend) pathXKSCredentialCreate(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("store").(string)
	b.xks.writeMu.Lock()
	defer b.xks.writeMu.Unlock()
	st, err := getJSON[xksStore](ctx, req.Storage, xksStoresPrefix+name)
	if err != nil {
		return nil, err
	}
	if st == nil {
		return respond(callerf("no key store %q: create it first (xks/stores/%s)", name, name))
	}
	existing, err := xksCredentialsOf(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	if len(existing) >= maxXKSCredentials {
		return respond(callerf("key store %q holds %d credentials, the most it may: delete one first", name, maxXKSCredentials))
	}
	id, secret := d.Get("access_key_id").(string), d.Get("secret_access_key").(string)
	switch {
	case secret != "" && id == "":
		return respond(callerf("secret_access_key needs access_key_id"))
	case id != "" && !xksAccessKeyID.MatchString(id):
		return respond(callerf("access_key_id must be 20–30 of A-Z and 2-7"))
	case secret != "" && !xksSecretPattern.MatchString(secret):
		return respond(callerf("secret_access_key must be 43–64 of A-Z, a-z, 0-9, '+', '/' and '='"))
	}
	if id == "" || secret == "" {
		tok, _, err := b.getToken(ctx, req.Storage)
		if err != nil {
			return respond(err)
		}
		if id == "" {
			raw, err := tok.GenerateRandom(ctx, 15)
			if err != nil {
				return respond(err)
			}
			id = base32.StdEncoding.EncodeToString(raw) // 24 of A-Z and 2-7, no padding
		}
		raw, err := tok.GenerateRandom(ctx, 32)
		if err != nil {
			return respond(err)
		}
		secret = base64.StdEncoding.EncodeToString(raw)
		clear(raw)
	}
	if other, err := getJSON[xksCredential](ctx, req.Storage, xksCredentialsPrefix+id); err != nil {
		return nil, err
	} else if other != nil {
		return respond(callerf("access key id %s is taken", id))
	}
	c := &xksCredential{Store: name, Secret: secret, CreatedAt: time.Now().UTC(), CreatedBy: actorOf(req).String()}
	if err := putJSON(ctx, req.Storage, xksCredentialsPrefix+id, c); err != nil {
		return nil, err
	}
	b.xks.drop()
	b.logger.Info("XKS credential added", "store", name, "access_key_id", id, "by", c.CreatedBy)
	console := fmt.Sprintf(`{"XksProxyUriPath":%q,"XksProxyAuthenticationCredential":{"AccessKeyId":%q,"RawSecretAccessKey":%q}}`, st.uriPath(), id, secret)
	return &logical.Response{Data: map[string]interface{}{
		"store": name, "access_key_id": id, "secret_access_key": secret, "uri_path": st.uriPath(),
		"created_at": c.CreatedAt.Format(time.RFC3339), "kms_console_file": console,
	}}, nil
}

func (b *backend) pathXKSCredentialRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	id := d.Get("access_key_id").(string)
	c, err := getJSON[xksCredential](ctx, req.Storage, xksCredentialsPrefix+id)
	if err != nil || c == nil || c.Store != d.Get("store").(string) {
		return nil, err
	}
	return &logical.Response{Data: map[string]interface{}{
		"store": c.Store, "access_key_id": id, "created_at": c.CreatedAt.Format(time.RFC3339), "created_by": c.CreatedBy,
	}}, nil
}

func (b *backend) pathXKSCredentialDelete(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	id := d.Get("access_key_id").(string)
	b.xks.writeMu.Lock()
	defer b.xks.writeMu.Unlock()
	c, err := getJSON[xksCredential](ctx, req.Storage, xksCredentialsPrefix+id)
	if err != nil || c == nil || c.Store != d.Get("store").(string) {
		return nil, err
	}
	if err := req.Storage.Delete(ctx, xksCredentialsPrefix+id); err != nil {
		return nil, err
	}
	b.xks.drop()
	b.logger.Info("XKS credential deleted", "store", c.Store, "access_key_id", id, "by", actorOf(req).String())
	return nil, nil
}

func (b *backend) pathXKSKeysList(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	ids, err := req.Storage.List(ctx, xksKeysPrefix+d.Get("store").(string)+"/")
	if err != nil {
		return nil, err
	}
	return logical.ListResponse(ids), nil
}

var xksUsages = []string{"ENCRYPT", "DECRYPT"}

func (b *backend) pathXKSKeyWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	store, id := d.Get("store").(string), d.Get("external_key_id").(string)
	b.xks.writeMu.Lock()
	defer b.xks.writeMu.Unlock()
	if st, err := getJSON[xksStore](ctx, req.Storage, xksStoresPrefix+store); err != nil {
		return nil, err
	} else if st == nil {
		return respond(callerf("no key store %q: create it first (xks/stores/%s)", store, store))
	}
	if err := xks.CheckKeyID(id); err != nil {
		return respond(callerf("%v", err))
	}
	path := xksKeysPrefix + store + "/" + id
	xk, err := getJSON[xksKey](ctx, req.Storage, path)
	if err != nil {
		return nil, err
	}
	name := d.Get("key").(string)
	if xk == nil {
		if name == "" {
			return respond(callerf("key is required: the name of the mount's aes256-gcm96 key to expose"))
		}
		k, err := b.keys.Get(ctx, req.Storage, name)
		if err != nil {
			return nil, err
		}
		if k == nil {
			return respond(callerf("no key %q on this mount", name))
		}
		if k.Type != keys.TypeAES256GCM96 {
			return respond(callerf("key %q is %s: AWS's External Key Store takes AES-256 keys only (aes256-gcm96)", name, k.Type))
		}
		if other, err := b.xksKeyExposing(ctx, req.Storage, name); err != nil {
			return nil, err
		} else if other != "" {
			return respond(callerf("key %q is already exposed as %s: one key, one external key id", name, other))
		}
		xk = &xksKey{Key: name, KeyCreatedAt: k.CreatedAt, KeyUsage: xksUsages}
	} else if name != "" && name != xk.Key {
		return respond(callerf("external key %q exposes key %q, fixed once set: AWS's ciphertexts under it need that key", id, xk.Key))
	}
	if v, ok := d.GetOk("key_usage"); ok {
		var usage []string
		for _, u := range v.([]string) {
			u = strings.ToUpper(strings.TrimSpace(u))
			if !slices.Contains(xksUsages, u) {
				return respond(callerf("key_usage takes ENCRYPT and DECRYPT, not %q", u))
			}
			if !slices.Contains(usage, u) {
				usage = append(usage, u)
			}
		}
		if len(usage) == 0 {
			return respond(callerf("key_usage needs ENCRYPT, DECRYPT or both"))
		}
		xk.KeyUsage = usage
	}
	readRules(d, &xk.xksRules)
	if v, ok := d.GetOk("disabled"); ok {
		xk.Disabled = v.(bool)
	}
	if err := putJSON(ctx, req.Storage, path, xk); err != nil {
		return nil, err
	}
	b.xks.drop()
	return b.pathXKSKeyRead(ctx, req, d)
}

// xksKeyExposing names the store/external key id that exposes key name, "" if none.
func (b *backend) xksKeyExposing(ctx context.Context, s logical.Storage, name string) (string, error) {
	stores, err := s.List(ctx, xksKeysPrefix)
	if err != nil {
		return "", err
	}
	for _, st := range stores {
		ids, err := s.List(ctx, xksKeysPrefix+st)
		if err != nil {
			return "", err
		}
		for _, id := range ids {
			xk, err := getJSON[xksKey](ctx, s, xksKeysPrefix+st+id)
			if err != nil {
				return "", err
			}
			if xk != nil && xk.Key == name {
				return strings.TrimSuffix(st, "/") + "/" + id, nil
			}
		}
	}
	return "", nil
}

func (b *backend) pathXKSKeyRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	store, id := d.Get("store").(string), d.Get("external_key_id").(string)
	xk, err := getJSON[xksKey](ctx, req.Storage, xksKeysPrefix+store+"/"+id)
	if err != nil || xk == nil {
		return nil, err
	}
	data := map[string]interface{}{"store": store, "external_key_id": id, "key": xk.Key, "key_usage": xk.KeyUsage, "disabled": xk.Disabled}
	rulesInto(data, xk.xksRules)
	return &logical.Response{Data: data}, nil
}

func (b *backend) pathXKSKeyDelete(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	b.xks.writeMu.Lock()
	defer b.xks.writeMu.Unlock()
	if err := req.Storage.Delete(ctx, xksKeysPrefix+d.Get("store").(string)+"/"+d.Get("external_key_id").(string)); err != nil {
		return nil, err
	}
	b.xks.drop()
	return nil, nil
}
