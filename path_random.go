package cmk

import (
	"context"
	"crypto/sha256"
	"crypto/sha3"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"hash"
	"strconv"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// random and hash: Transit's two paths that use no key.

// randomMaxBytes is Transit's limit for one random request.
const randomMaxBytes = 128 * 1024

func (b *backend) pathRandom() *framework.Path {
	return &framework.Path{
		Pattern:      "random(/" + framework.GenericNameRegex("source") + ")?" + framework.OptionalParamRegex("urlbytes"),
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "generate", OperationSuffix: "random|random-with-source|random-with-bytes|random-with-source-and-bytes"},
		Fields: map[string]*framework.FieldSchema{
			"urlbytes": {Type: framework.TypeString, Description: "Number of bytes, in the URL."},
			"bytes":    {Type: framework.TypeInt, Default: 32, Description: fmt.Sprintf("Number of bytes (1 to %d). Defaults to 32.", randomMaxBytes)},
			"format": {
				Type:          framework.TypeString,
				Default:       "base64",
				AllowedValues: []interface{}{"base64", "hex"},
				Description:   `Encoding of the result: "base64" (default) or "hex".`,
			},
			"source": {
				Type:          framework.TypeString,
				Default:       "platform",
				AllowedValues: []interface{}{"platform", "seal", "all"},
				Description:   `Accepted for Transit compatibility ("platform", "seal", "all"): the bytes always come from the HSM's RNG (C_GenerateRandom).`,
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathRandomWrite), Summary: "Random bytes from the HSM's RNG."},
		},
		HelpSynopsis:    "Generate random bytes with the HSM's RNG.",
		HelpDescription: "Returns random bytes from C_GenerateRandom on the configured token, base64 or hex encoded. The paths random/<bytes> and random/<source>/<bytes> work as in Transit.",
	}
}

func (b *backend) pathRandomWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	n := d.Get("bytes").(int)
	source, _ := d.Raw["source"].(string)
	urlBytes, _ := d.Raw["urlbytes"].(string)
	// As in Transit, random/<n> puts the count where the source would be.
	if urlBytes == "" && source != "" && source != "platform" && source != "seal" && source != "all" {
		urlBytes, source = source, ""
	}
	if urlBytes != "" {
		v, err := strconv.Atoi(urlBytes)
		if err != nil {
			return respond(callerf("error parsing url-set byte count: %q is not a number", urlBytes))
		}
		n = v
	}
	switch source {
	case "", "platform", "seal", "all":
	default:
		return respond(callerf("unsupported entropy source %q; must be \"platform\", \"seal\" or \"all\"", source))
	}
	if n < 1 || n > randomMaxBytes {
		return respond(callerf("bytes must be between 1 and %d", randomMaxBytes))
	}
	format := d.Get("format").(string)
	if format != "base64" && format != "hex" {
		return respond(callerf("unsupported encoding format %q; must be \"hex\" or \"base64\"", format))
	}
	tok, _, err := b.getToken(ctx, req.Storage)
	if err != nil {
		return respond(err)
	}
	out, err := tok.GenerateRandom(ctx, n)
	if err != nil {
		return respond(err)
	}
	enc := base64.StdEncoding.EncodeToString(out)
	if format == "hex" {
		enc = hex.EncodeToString(out)
	}
	return &logical.Response{Data: map[string]interface{}{"random_bytes": enc}}, nil
}

// hashes are Transit's hash algorithms; hashing needs no secret, so it is done in software as Transit does.
var hashes = map[string]func() hash.Hash{
	"sha2-224": sha256.New224,
	"sha2-256": sha256.New,
	"sha2-384": sha512.New384,
	"sha2-512": sha512.New,
	"sha3-224": func() hash.Hash { return sha3.New224() },
	"sha3-256": func() hash.Hash { return sha3.New256() },
	"sha3-384": func() hash.Hash { return sha3.New384() },
	"sha3-512": func() hash.Hash { return sha3.New512() },
}

func (b *backend) pathHash() *framework.Path {
	return &framework.Path{
		Pattern:      "hash" + framework.OptionalParamRegex("urlalgorithm"),
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "hash", OperationSuffix: "|with-algorithm"},
		Fields: map[string]*framework.FieldSchema{
			"input":        {Type: framework.TypeString, Description: "Base64 input to hash."},
			"urlalgorithm": {Type: framework.TypeString, Description: "Algorithm, in the URL."},
			"algorithm": {
				Type:          framework.TypeString,
				Default:       "sha2-256",
				AllowedValues: []interface{}{"sha2-224", "sha2-256", "sha2-384", "sha2-512", "sha3-224", "sha3-256", "sha3-384", "sha3-512"},
				Description:   "sha2-224, sha2-256 (default), sha2-384, sha2-512, sha3-224, sha3-256, sha3-384 or sha3-512.",
			},
			"format": {
				Type:          framework.TypeString,
				Default:       "hex",
				AllowedValues: []interface{}{"hex", "base64"},
				Description:   `Encoding of the sum: "hex" (default) or "base64".`,
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathHashWrite), Summary: "Hash data, as Transit's hash."},
		},
		HelpSynopsis:    "Hash base64 input with a SHA-2 or SHA-3 function.",
		HelpDescription: "As Transit's hash: no key is involved, so it runs in software.",
	}
}

func (b *backend) pathHashWrite(_ context.Context, _ *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	raw, ok := d.GetOk("input")
	if !ok {
		return respond(callerf("input missing"))
	}
	input, err := base64.StdEncoding.DecodeString(raw.(string))
	if err != nil {
		return respond(callerf("unable to decode input as base64: %v", err))
	}
	algorithm := d.Get("algorithm").(string)
	if u, ok := d.Raw["urlalgorithm"].(string); ok && u != "" {
		algorithm = u
	}
	newHash, ok := hashes[algorithm]
	if !ok {
		return respond(callerf("unsupported algorithm %q", algorithm))
	}
	format := d.Get("format").(string)
	if format != "hex" && format != "base64" {
		return respond(callerf("unsupported encoding format %q; must be \"hex\" or \"base64\"", format))
	}
	h := newHash()
	h.Write(input)
	sum := h.Sum(nil)
	out := hex.EncodeToString(sum)
	if format == "base64" {
		out = base64.StdEncoding.EncodeToString(sum)
	}
	return &logical.Response{Data: map[string]interface{}{"sum": out}}, nil
}
