package cmk

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// apiDocPath is the API reference, written from the paths' own schemas and from sample requests run against a
// real SoftHSM token, so that it cannot drift from the code: TestAPIReference fails when it differs from what
// the code gives, and `make api-doc` writes it again.
const apiDocPath = "docs/API.md"

// apiSample is one request of the reference, run in order against one mount.
type apiSample struct {
	op   logical.Operation
	path string
	data map[string]interface{}
}

// apiSamples are run in order: later ones use what earlier ones made. {ct}, {sig} and {hmac} stand for the last
// ciphertext, signature and HMAC returned.
var apiSamples = []apiSample{
	{logical.UpdateOperation, "config/hsm", map[string]interface{}{"token_label": "cmk-api-doc", "pin": "1234"}},
	{logical.ReadOperation, "config/hsm", nil},
	{logical.UpdateOperation, "config/keys", map[string]interface{}{"deletion_grace_period": "168h"}},
	{logical.ReadOperation, "config/keys", nil},
	{logical.UpdateOperation, "cache-config", map[string]interface{}{"size": 0}},
	{logical.UpdateOperation, "keys/demo", map[string]interface{}{"type": "aes256-gcm96"}},
	{logical.UpdateOperation, "keys/demo/config", map[string]interface{}{"deletion_allowed": true, "auto_rotate_period": "720h"}},
	{logical.UpdateOperation, "encrypt/demo", map[string]interface{}{"plaintext": "aGVsbG8gd29ybGQ="}},
	{logical.UpdateOperation, "decrypt/demo", map[string]interface{}{"ciphertext": "{ct}"}},
	{logical.UpdateOperation, "keys/demo/rotate", nil},
	{logical.UpdateOperation, "rewrap/demo", map[string]interface{}{"ciphertext": "{ct}"}},
	{logical.UpdateOperation, "encrypt/demo", map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"plaintext": "b25l", "reference": "first"}, map[string]interface{}{"plaintext": "dHdv", "reference": "second"}}}},
	{logical.UpdateOperation, "datakey/wrapped/demo", map[string]interface{}{"bits": 256}},
	{logical.ReadOperation, "keys/demo", nil},
	{logical.ListOperation, "keys/", nil},
	{logical.ReadOperation, "keys/demo/versions/1", nil},
	{logical.UpdateOperation, "keys/demo/versions/1/disable", nil},
	{logical.UpdateOperation, "keys/demo/versions/1/enable", nil},
	{logical.ReadOperation, "keys/demo/history", map[string]interface{}{"limit": 3}},
	{logical.UpdateOperation, "keys/signer", map[string]interface{}{"type": "ecdsa-p256"}},
	{logical.UpdateOperation, "sign/signer", map[string]interface{}{"input": "aGVsbG8gd29ybGQ="}},
	{logical.UpdateOperation, "verify/signer", map[string]interface{}{"input": "aGVsbG8gd29ybGQ=", "signature": "{sig}"}},
	{logical.ReadOperation, "export/public-key/signer/1", nil},
	{logical.UpdateOperation, "keys/signer/csr", nil},
	{logical.UpdateOperation, "hmac/demo", map[string]interface{}{"input": "aGVsbG8gd29ybGQ="}},
	{logical.UpdateOperation, "verify/demo", map[string]interface{}{"input": "aGVsbG8gd29ybGQ=", "hmac": "{hmac}"}},
	{logical.UpdateOperation, "random/16", nil},
	{logical.UpdateOperation, "hash/sha2-256", map[string]interface{}{"input": "aGVsbG8gd29ybGQ="}},
	{logical.ReadOperation, "wrapping_key", nil},
	{logical.ReadOperation, "keys/demo/reconcile", nil},
	{logical.ReadOperation, "reconcile", nil},
	{logical.UpdateOperation, "keys/demo/config", map[string]interface{}{"min_encryption_version": 2}},
	{logical.UpdateOperation, "keys/demo/trim", map[string]interface{}{"min_available_version": 1}},
	{logical.UpdateOperation, "keys/demo/disable", nil},
	{logical.UpdateOperation, "keys/demo/enable", nil},
	{logical.ReadOperation, "export/encryption-key/demo", nil},
	{logical.UpdateOperation, "keys/signer/config", map[string]interface{}{"deletion_allowed": true}},
	{logical.DeleteOperation, "keys/signer", nil},
	{logical.UpdateOperation, "keys/signer/cancel-deletion", nil},
}

func TestAPIReference(t *testing.T) {
	doc := apiReference(t)
	if os.Getenv("CMK_UPDATE_API_DOC") != "" {
		if err := os.WriteFile(apiDocPath, []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	have, err := os.ReadFile(apiDocPath)
	if err != nil {
		t.Fatalf("%v: write it with make api-doc", err)
	}
	if string(have) != doc {
		a, b := strings.Split(string(have), "\n"), strings.Split(doc, "\n")
		for i := range min(len(a), len(b)) {
			if a[i] != b[i] {
				t.Fatalf("%s differs from what the code gives, from line %d:\n  file: %s\n  code: %s\nwrite it again with make api-doc", apiDocPath, i+1, a[i], b[i])
			}
		}
		t.Fatalf("%s differs from what the code gives (%d lines, code gives %d): write it again with make api-doc", apiDocPath, len(a), len(b))
	}
}

// apiReference writes the reference: every path with its operations, fields and help, and for those that have
// one, a sample request and its response as the engine gave it (values that differ from run to run replaced).
func apiReference(t *testing.T) string {
	if err := softhsm.CreateToken("cmk-api-doc", "1234"); err != nil {
		t.Fatal(err)
	}
	conf := logical.TestBackendConfig()
	conf.BackendUUID = "7a3f0c52-example-mount"
	conf.Logger = hclog.NewNullLogger()
	conf.StorageView = &logical.InmemStorage{}
	b := newBackend(conf)
	if err := b.Setup(context.Background(), conf); err != nil {
		t.Fatal(err)
	}
	defer b.clean(context.Background())

	samples := map[*framework.Path][]string{}
	last := map[string]string{}
	for i, s := range apiSamples {
		data := map[string]interface{}{}
		for k, v := range s.data {
			if str, ok := v.(string); ok && strings.HasPrefix(str, "{") {
				v = last[strings.Trim(str, "{}")]
			}
			data[k] = v
		}
		resp, err := b.HandleRequest(context.Background(), &logical.Request{ID: fmt.Sprintf("doc-%d", i), Operation: s.op, Path: s.path,
			Data: data, Storage: conf.StorageView, DisplayName: "token", ClientTokenAccessor: "accessor"})
		code := status(resp, err)
		var body interface{}
		switch {
		case err != nil && (resp == nil || !resp.IsError()):
			body = map[string]interface{}{"errors": []string{err.Error()}}
		case resp != nil && resp.IsError():
			body = map[string]interface{}{"errors": []string{resp.Error().Error()}}
		case resp != nil:
			out := map[string]interface{}{"data": resp.Data}
			if len(resp.Warnings) > 0 {
				out["warnings"] = resp.Warnings
			}
			body = out
		}
		if resp != nil && resp.Data != nil {
			for field, key := range map[string]string{"ciphertext": "ct", "signature": "sig", "hmac": "hmac"} {
				if v, ok := resp.Data[field].(string); ok {
					last[key] = v
				}
			}
		}
		p := pathFor(b, s.path)
		if p == nil {
			t.Fatalf("sample %s matches no path", s.path)
		}
		samples[p] = append(samples[p], renderSample(s, data, code, body))
	}

	var out strings.Builder
	out.WriteString("# API reference\n\n")
	out.WriteString("Written by `make api-doc` (TestAPIReference) from each path's own schema and help, with sample requests run\n" +
		"against a mount on a SoftHSM token; values that differ from run to run (ciphertexts, signatures, IDs, times) are\n" +
		"shown as `…`. `make test` fails when this file and the code differ. The engine is mounted at `cmk/` here.\n\n")
	out.WriteString("| path | operations | summary |\n|---|---|---|\n")
	for _, p := range b.Backend.Paths {
		fmt.Fprintf(&out, "| [`%s`](#%s) | %s | %s |\n", readablePattern(p.Pattern), anchor(readablePattern(p.Pattern)), strings.Join(operations(p), ", "), p.HelpSynopsis)
	}
	for _, p := range b.Backend.Paths {
		pattern := readablePattern(p.Pattern)
		fmt.Fprintf(&out, "\n## %s\n\n%s\n\n", pattern, p.HelpSynopsis)
		if d := strings.TrimSpace(p.HelpDescription); d != "" {
			out.WriteString(d + "\n\n")
		}
		for _, op := range sortedOps(p) {
			summary := ""
			if po, ok := p.Operations[op].(*framework.PathOperation); ok {
				summary = po.Summary
			}
			fmt.Fprintf(&out, "- **%s** (`%s`): %s\n", opVerb(op), httpMethod(op), summary)
		}
		names := make([]string, 0, len(p.Fields))
		for n := range p.Fields {
			names = append(names, n)
		}
		sort.Strings(names)
		if len(names) > 0 {
			out.WriteString("\n| parameter | type | default | description |\n|---|---|---|---|\n")
			for _, n := range names {
				f := p.Fields[n]
				where := ""
				switch {
				case strings.Contains(p.Pattern, "<"+n+">"):
					where = " (in the URL)"
				case f.Query:
					where = " (query)"
				}
				desc := strings.ReplaceAll(f.Description, "|", "\\|")
				if len(f.AllowedValues) > 0 {
					vals := make([]string, len(f.AllowedValues))
					for i, v := range f.AllowedValues {
						vals[i] = fmt.Sprintf("`%v`", v)
					}
					desc += " One of " + strings.Join(vals, ", ") + "."
				}
				def := ""
				if f.Default != nil {
					def = fmt.Sprintf("`%v`", f.Default)
				}
				fmt.Fprintf(&out, "| `%s`%s | %s | %s | %s |\n", n, where, f.Type.String(), def, strings.ReplaceAll(desc, "\n", " "))
			}
		}
		for _, s := range samples[p] {
			out.WriteString("\n" + s)
		}
	}
	return out.String()
}

func pathFor(b *backend, path string) *framework.Path {
	for _, p := range b.Backend.Paths {
		if regexp.MustCompile("^" + p.Pattern + "$").MatchString(path) {
			return p
		}
	}
	return nil
}

// plain turns a response into JSON's own values (maps, lists, numbers), as a client sees it.
func plain(v interface{}) interface{} {
	raw, _ := json.Marshal(v)
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.UseNumber()
	var out interface{}
	_ = dec.Decode(&out)
	return out
}

func renderSample(s apiSample, data map[string]interface{}, code int, body interface{}) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Sample: `%s /v1/cmk/%s`", httpMethod(s.op), s.path)
	if len(data) > 0 {
		req, _ := json.MarshalIndent(redact("", plain(data)), "", "  ")
		fmt.Fprintf(&b, " with\n\n```json\n%s\n```\n\n", req)
	} else {
		b.WriteString("\n\n")
	}
	if body == nil {
		fmt.Fprintf(&b, "answers HTTP %d with no body.\n", code)
		return b.String()
	}
	resp, _ := json.MarshalIndent(redact("", plain(body)), "", "  ")
	fmt.Fprintf(&b, "answers HTTP %d:\n\n```json\n%s\n```\n", code, resp)
	return b.String()
}

var (
	reVersioned = regexp.MustCompile(`^vault:v(\d+):.+`)
	reTime      = regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$`)
	reTimeIn    = regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)`)
	reHex       = regexp.MustCompile(`^[0-9a-f]{16,}$`)
	reBase64    = regexp.MustCompile(`^[A-Za-z0-9+/]{16,}={0,2}$`)
	reDigits    = regexp.MustCompile(`^\d+$`)
	reSerial    = regexp.MustCompile(`serial|accessor|request|^slot$`)
)

// redact replaces what differs from run to run, so that the reference is the same on every run.
func redact(key string, v interface{}) interface{} {
	switch x := v.(type) {
	case map[string]interface{}:
		out := map[string]interface{}{}
		for k, val := range x {
			out[k] = redact(k, val)
		}
		return out
	case []interface{}:
		out := make([]interface{}, len(x))
		for i, val := range x {
			out[i] = redact(key, val)
		}
		return out
	case []map[string]interface{}:
		out := make([]interface{}, len(x))
		for i, val := range x {
			out[i] = redact(key, val)
		}
		return out
	case []string:
		if key == "mechanisms" && len(x) > 3 {
			return append(append([]string{}, x[:3]...), fmt.Sprintf("… (%d in all)", len(x)))
		}
		out := make([]interface{}, len(x))
		for i, val := range x {
			out[i] = redact(key, val)
		}
		return out
	case string:
		switch {
		case reVersioned.MatchString(x):
			return "vault:v" + reVersioned.FindStringSubmatch(x)[1] + ":…"
		case strings.HasPrefix(x, "-----BEGIN"):
			return strings.SplitN(x, "\n", 2)[0] + "\n…"
		case reTime.MatchString(x), reHex.MatchString(x), reBase64.MatchString(x), reSerial.MatchString(key) && x != "":
			return "…"
		case key == "library":
			return "/usr/lib/softhsm/libsofthsm2.so"
		}
		return reAccessorHMAC.ReplaceAllString(reTimeIn.ReplaceAllString(x, "…"), "hmac-sha256:…")
	case json.Number:
		isTime := reDigits.MatchString(key) || strings.HasSuffix(key, "_time") // Transit's keys map: version → Unix time
		if n, err := x.Int64(); (err == nil && n > 1_000_000_000 && isTime) || reSerial.MatchString(key) {
			return "…"
		}
		return x
	}
	if reSerial.MatchString(key) {
		return "…"
	}
	return v
}

// reAccessorHMAC is a token accessor's HMAC under the mount's salt, which differs per run.
var reAccessorHMAC = regexp.MustCompile(`hmac-sha256:[0-9a-f]{64}`)

var (
	reOptional = regexp.MustCompile(`\(/\(\?P<(\w+)>\.\+\)\)\?`)
	reGeneric  = regexp.MustCompile(`\(\?P<(\w+)>\\w\(\(\[\\w-\.\]\+\)\?\\w\)\?\)`)
	reChoice   = regexp.MustCompile(`\(\?P<(\w+)>([a-z_|-]+)\)`)
	reNamed    = regexp.MustCompile(`\(\?P<(\w+)>[^)]*\)`)
)

// readablePattern writes a path's regular expression as Vault's docs write paths: keys/:name/rotate.
func readablePattern(p string) string {
	p = strings.TrimSuffix(strings.TrimPrefix(p, "^"), "$")
	p = reOptional.ReplaceAllString(p, "(/:$1)")
	p = reGeneric.ReplaceAllString(p, ":$1")
	p = reChoice.ReplaceAllString(p, "{$2}")
	p = reNamed.ReplaceAllString(p, ":$1")
	p = strings.ReplaceAll(p, `\/`, "/")
	p = strings.ReplaceAll(p, ")?(", ")(")
	return strings.TrimSuffix(p, "/?")
}

func anchor(s string) string {
	return strings.Trim(regexp.MustCompile(`[^a-z0-9_-]+`).ReplaceAllString(strings.ToLower(s), "-"), "-")
}

var opOrder = []logical.Operation{logical.ReadOperation, logical.ListOperation, logical.CreateOperation, logical.UpdateOperation, logical.DeleteOperation}

func sortedOps(p *framework.Path) []logical.Operation {
	var out []logical.Operation
	for _, op := range opOrder {
		if _, ok := p.Operations[op]; ok {
			out = append(out, op)
		}
	}
	return out
}

func operations(p *framework.Path) []string {
	var out []string
	for _, op := range sortedOps(p) {
		out = append(out, opVerb(op))
	}
	return out
}

func opVerb(op logical.Operation) string {
	switch op {
	case logical.CreateOperation, logical.UpdateOperation:
		return map[logical.Operation]string{logical.CreateOperation: "create", logical.UpdateOperation: "write"}[op]
	}
	return string(op)
}

func httpMethod(op logical.Operation) string {
	switch op {
	case logical.ReadOperation:
		return "GET"
	case logical.ListOperation:
		return "LIST"
	case logical.DeleteOperation:
		return "DELETE"
	}
	return "POST"
}
