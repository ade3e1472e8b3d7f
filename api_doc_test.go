package cmk

import (
	"cmp"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/byoktest"
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

// apiSamples are run in order: later ones use what earlier ones made. {ct}, {sig}, {hmac}, {csr} and
// {public_key} stand for the last ciphertext, signature, HMAC, CSR and public key returned, {grant} (in a path
// too) for the last grant id; {wrapped} for a fresh
// AES-256 key wrapped as `vault transit import` wraps it, with the wrapping key last read; {certificate} for a
// chain whose leaf certifies the last CSR's key, issued by a test CA.
var apiSamples = []apiSample{
	{logical.UpdateOperation, "config/hsm", map[string]interface{}{"token_label": "cmk-api-doc", "pin": "1234"}},
	{logical.ReadOperation, "config/hsm", nil},
	{logical.UpdateOperation, "config/keys", map[string]interface{}{"deletion_grace_period": "168h"}},
	{logical.ReadOperation, "config/keys", nil},
	{logical.UpdateOperation, "cache-config", map[string]interface{}{"size": 0}},
	{logical.UpdateOperation, "config/metrics", map[string]interface{}{"per_key_labels": true, "per_key_label_limit": 100}},
	{logical.ReadOperation, "config/analytics", nil},
	{logical.UpdateOperation, "keys/demo", map[string]interface{}{"type": "aes256-gcm96"}},
	{logical.UpdateOperation, "keys/demo/config", map[string]interface{}{"deletion_allowed": true, "auto_rotate_period": "720h"}},
	{logical.UpdateOperation, "encrypt/demo", map[string]interface{}{"plaintext": "aGVsbG8gd29ybGQ="}},
	{logical.UpdateOperation, "decrypt/demo", map[string]interface{}{"ciphertext": "{ct}"}},
	{logical.ReadOperation, "metrics", map[string]interface{}{"format": "prometheus"}},
	{logical.ReadOperation, "health", nil},
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
	{logical.ReadOperation, "keys/demo/anomalies", nil},
	{logical.UpdateOperation, "keys/demo/grants", map[string]interface{}{"entity_id": "contractor-entity-id", "operations": "decrypt", "ttl": "2h",
		"max_uses": 100, "reason": "INC-42 data recovery"}},
	{logical.ListOperation, "keys/demo/grants/", nil},
	{logical.ReadOperation, "keys/demo/grants/{grant}", nil},
	{logical.DeleteOperation, "keys/demo/grants/{grant}", nil},
	{logical.UpdateOperation, "keys/signer", map[string]interface{}{"type": "ecdsa-p256"}},
	{logical.UpdateOperation, "sign/signer", map[string]interface{}{"input": "aGVsbG8gd29ybGQ="}},
	{logical.UpdateOperation, "verify/signer", map[string]interface{}{"input": "aGVsbG8gd29ybGQ=", "signature": "{sig}"}},
	{logical.ReadOperation, "export/public-key/signer/1", nil},
	{logical.UpdateOperation, "keys/signer/csr", nil},
	{logical.UpdateOperation, "keys/signer/set-certificate", map[string]interface{}{"certificate_chain": "{certificate}"}},
	{logical.UpdateOperation, "hmac/demo", map[string]interface{}{"input": "aGVsbG8gd29ybGQ="}},
	{logical.UpdateOperation, "verify/demo", map[string]interface{}{"input": "aGVsbG8gd29ybGQ=", "hmac": "{hmac}"}},
	{logical.UpdateOperation, "random/16", nil},
	{logical.UpdateOperation, "hash/sha2-256", map[string]interface{}{"input": "aGVsbG8gd29ybGQ="}},
	// SoftHSM 2.6's OAEP has no SHA-256, which vault transit import uses: the operator's choice (README), made
	// before the wrapping key is.
	{logical.UpdateOperation, "config/hsm", map[string]interface{}{"raw_rsa_oaep_fallback": true}},
	{logical.ReadOperation, "wrapping_key", nil},
	{logical.UpdateOperation, "keys/byok/import", map[string]interface{}{"ciphertext": "{wrapped}", "type": "aes256-gcm96", "allow_rotation": true}},
	{logical.UpdateOperation, "keys/byok/import_version", map[string]interface{}{"ciphertext": "{wrapped}"}},
	{logical.ReadOperation, "keys/byok/versions/2", nil},
	{logical.ReadOperation, "keys/demo/reconcile", nil},
	{logical.ReadOperation, "reconcile", nil},
	{logical.UpdateOperation, "keys/demo/config", map[string]interface{}{"min_encryption_version": 2}},
	{logical.UpdateOperation, "keys/demo/trim", map[string]interface{}{"min_available_version": 1}},
	{logical.UpdateOperation, "keys/demo/disable", nil},
	{logical.UpdateOperation, "keys/demo/enable", nil},
	{logical.ReadOperation, "export/encryption-key/demo", nil},
	{logical.ReadOperation, "backup/demo", nil},
	{logical.UpdateOperation, "restore/demo", map[string]interface{}{"backup": "eyJwb2xpY3kiOnt9fQ=="}},
	{logical.UpdateOperation, "keys/signer/config", map[string]interface{}{"deletion_allowed": true}},
	{logical.DeleteOperation, "keys/signer", nil},
	{logical.UpdateOperation, "keys/signer/cancel-deletion", nil},
	// Dual control: the approvals are given by a custodian's entity (see apiReference).
	{logical.UpdateOperation, "keys/guarded", map[string]interface{}{"approvals_required": 1}},
	{logical.UpdateOperation, "keys/guarded/rotate", nil},
	{logical.UpdateOperation, "keys/guarded/versions/1/destroy", nil},
	{logical.ListOperation, "approvals/", nil},
	{logical.ReadOperation, "approvals/{approval_id}", nil},
	{logical.UpdateOperation, "approvals/{approval_id}/approve", nil},
	{logical.UpdateOperation, "keys/guarded/config", map[string]interface{}{"approvals_required": 0}},
	{logical.UpdateOperation, "approvals/{approval_id}/reject", map[string]interface{}{"comment": "the key stays under dual control"}},
	// Tamper-evident history: the chain checked against its signed head, the audit key's public keys, a rotation.
	{logical.ReadOperation, "keys/demo/history/verify", nil},
	{logical.ReadOperation, "audit_key", nil},
	{logical.UpdateOperation, "audit_key/rotate", nil},
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
		var err error
		data := map[string]interface{}{}
		for k, v := range s.data {
			if str, ok := v.(string); ok && strings.HasPrefix(str, "{") {
				if v, err = placeholder(strings.Trim(str, "{}"), last); err != nil {
					t.Fatalf("sample %s: %v", s.path, err)
				}
			}
			data[k] = v
		}
		if strings.Contains(s.path, "{approval_id}") { // the held request's id: the same in every run
			s.path = strings.ReplaceAll(s.path, "{approval_id}", last["approval_id"])
		}
		path := strings.ReplaceAll(s.path, "{grant}", last["grant"]) // random: the sample keeps {grant}
		req := &logical.Request{ID: fmt.Sprintf("doc-%d", i), Operation: s.op, Path: path,
			Data: data, Storage: conf.StorageView, DisplayName: "token", ClientTokenAccessor: "accessor"}
		if strings.HasPrefix(path, "approvals/") && s.op == logical.UpdateOperation {
			// Approvals come from another Vault entity than the requester's.
			req.EntityID, req.DisplayName, req.ClientTokenAccessor = "custodian-entity-id", "userpass-custodian", "custodian-accessor"
		}
		resp, err := b.HandleRequest(context.Background(), req)
		code := status(resp, err)
		if text, ok := textBody(resp); ok && err == nil {
			// The metrics: Prometheus's text, as a scraper receives it.
			samples[pathFor(b, path)] = append(samples[pathFor(b, path)], renderText(s, data, code, text))
			continue
		}
		if raw, ok := rawBody(resp); ok && err == nil {
			// A held request's 202: the body a client receives.
			var held struct {
				Data     map[string]interface{} `json:"data"`
				Warnings []string               `json:"warnings"`
			}
			if err := json.Unmarshal([]byte(raw), &held); err != nil {
				t.Fatal(err)
			}
			resp = &logical.Response{Data: held.Data, Warnings: held.Warnings}
			last["approval_id"], _ = held.Data["approval_id"].(string)
		}
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
			for field, key := range map[string]string{"ciphertext": "ct", "signature": "sig", "hmac": "hmac", "csr": "csr", "public_key": "public_key", "id": "grant"} {
				if v, ok := resp.Data[field].(string); ok {
					last[key] = v
				}
			}
		}
		p := pathFor(b, path)
		if p == nil {
			t.Fatalf("sample %s matches no path", s.path)
		}
		samples[p] = append(samples[p], renderSample(s, data, code, body))
	}

	var out strings.Builder
	out.WriteString("# API reference\n\n")
	out.WriteString("Written by `make api-doc` (TestAPIReference) from each path's own schema and help, with sample requests run\n" +
		"against a mount on a SoftHSM token; values that differ from run to run (ciphertexts, signatures, IDs, times) are\n" +
		"shown as `…`. `make test` fails when this file and the code differ. The engine is mounted at `cmk/` here.\n" +
		"Parameters in the URL are written `:name`; the fields responses carry are described [at the end](#response-fields).\n\n")
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
				shown := "`" + n + "`"
				switch {
				case strings.Contains(p.Pattern, "<"+n+">"):
					shown, where = "`:"+urlPart(n)+"`", " (in the URL)"
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
				fmt.Fprintf(&out, "| %s%s | %s | %s | %s |\n", shown, where, f.Type.String(), def, strings.ReplaceAll(desc, "\n", " "))
			}
		}
		for _, s := range samples[p] {
			out.WriteString("\n" + s)
		}
	}
	out.WriteString("\n## Response fields\n\nWhat responses carry besides the request fields described with each path above.\n\n| field | meaning |\n|---|---|\n")
	fields := make([]string, 0, len(responseFieldDocs))
	for name := range responseFieldDocs {
		fields = append(fields, name)
	}
	sort.Strings(fields)
	for _, name := range fields {
		fmt.Fprintf(&out, "| `%s` | %s |\n", name, strings.ReplaceAll(responseFieldDocs[name], "|", "\\|"))
	}
	return out.String()
}

// placeholder gives the value a sample's {name} stands for.
func placeholder(name string, last map[string]string) (interface{}, error) {
	switch name {
	case "wrapped":
		block, _ := pem.Decode([]byte(last["public_key"]))
		if block == nil {
			return nil, fmt.Errorf("no wrapping key read before {wrapped}")
		}
		pub, err := x509.ParsePKIXPublicKey(block.Bytes)
		if err != nil {
			return nil, err
		}
		material := make([]byte, 32)
		if _, err := rand.Read(material); err != nil {
			return nil, err
		}
		wrapped, err := byoktest.Wrap(pub.(*rsa.PublicKey), crypto.SHA256, material)
		return base64.StdEncoding.EncodeToString(wrapped), err
	case "certificate":
		block, _ := pem.Decode([]byte(last["csr"]))
		if block == nil {
			return nil, fmt.Errorf("no CSR made before {certificate}")
		}
		csr, err := x509.ParseCertificateRequest(block.Bytes)
		if err != nil {
			return nil, err
		}
		caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		now := time.Now()
		caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "example CA"}, NotBefore: now.Add(-time.Hour),
			NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
		caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
		if err != nil {
			return nil, err
		}
		ca, _ := x509.ParseCertificate(caDER)
		leafTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: csr.Subject, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour)}
		leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, csr.PublicKey, caKey)
		if err != nil {
			return nil, err
		}
		return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER})) +
			string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})), nil
	}
	if v, ok := last[name]; ok {
		return v, nil
	}
	return nil, fmt.Errorf("{%s} stands for nothing returned before", name)
}

// rawBody is the body of a response the engine gives whole (a held request's 202), if resp is one.
func rawBody(resp *logical.Response) (string, bool) {
	if resp == nil {
		return "", false
	}
	raw, ok := resp.Data[logical.HTTPRawBody].(string)
	return raw, ok
}

// textBody is the body of a response the engine gives as text (the metrics), if resp is one.
func textBody(resp *logical.Response) (string, bool) {
	if resp == nil || resp.Data[logical.HTTPContentType] != metricsContentType {
		return "", false
	}
	raw, ok := resp.Data[logical.HTTPRawBody].([]byte)
	return string(raw), ok
}

// reTimed are the series of the exposition whose values are times or depend on them: shown as "…".
var reTimed = regexp.MustCompile(`^(cmk_hsm_call_duration_seconds_(bucket|sum|count)\{.*\}) .*$`)

// renderText renders a sample whose answer is text: the HSM latency histogram's buckets are left out but for the
// last, and its values shown as "…".
func renderText(s apiSample, data map[string]interface{}, code int, text string) string {
	var b strings.Builder
	q := make([]string, 0, len(data))
	for k, v := range data {
		q = append(q, fmt.Sprintf("%s=%v", k, v))
	}
	sort.Strings(q)
	query := ""
	if len(q) > 0 {
		query = "?" + strings.Join(q, "&")
	}
	fmt.Fprintf(&b, "Sample: `%s /v1/cmk/%s%s`", httpMethod(s.op), s.path, query)
	fmt.Fprintf(&b, "\n\nanswers HTTP %d (`%s`):\n\n```text\n", code, metricsContentType)
	for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
		if m := reTimed.FindStringSubmatch(line); m != nil {
			if m[2] == "bucket" && !strings.Contains(line, `le="+Inf"`) {
				continue
			}
			line = m[1] + " …"
		}
		b.WriteString(line + "\n")
	}
	b.WriteString("```\n")
	return b.String()
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
			shown := k
			if reHex.MatchString(k) { // an id as a map key (a list's key_info): differs from run to run
				shown = "…"
			}
			out[shown] = redact(k, val)
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
		case key == "path": // a held request's path, which the base64 pattern would take for a value
			return x
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
	p = regexp.MustCompile(`:(\w+)`).ReplaceAllStringFunc(p, func(m string) string { return ":" + urlPart(m[1:]) })
	return strings.TrimSuffix(p, "/?")
}

// urlPart is the name Transit's documentation gives a URL part: the code's fields urlbytes and urlalgorithm are
// :bytes and :algorithm in a path (the field names only keep them apart from the body fields of the same name).
func urlPart(field string) string {
	return cmp.Or(map[string]string{"urlbytes": "bytes", "urlalgorithm": "algorithm"}[field], field)
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

// The OpenAPI document the engine gives Vault (sys/internal/specs/openapi, and from it vault-client-go and other
// generated clients) describes every path as the path declares it: every path is in it and nothing else; every
// operation's id is the one its DisplayAttrs name (prefix, verb and, for each form of an optional part, that form's
// suffix), never one the framework makes up from the path's words, and no two operations share one; every field with
// a fixed set of values carries that set as its enum, as does every URL part that is a choice; every query field is
// a query parameter of the operations that read.
func TestOpenAPIDescribesEveryPath(t *testing.T) {
	conf := logical.TestBackendConfig()
	conf.Logger = hclog.NewNullLogger()
	b := newBackend(conf)
	resp, err := b.HandleRequest(context.Background(), &logical.Request{Operation: logical.HelpOperation, Path: "", Storage: &logical.InmemStorage{}})
	if err != nil || resp == nil || resp.Data["openapi"] == nil {
		t.Fatalf("no OpenAPI document: %v %v", err, resp)
	}
	var doc struct {
		Paths      map[string]map[string]json.RawMessage `json:"paths"`
		Components struct {
			Schemas map[string]oasSchema `json:"schemas"`
		} `json:"components"`
	}
	raw, _ := json.Marshal(resp.Data["openapi"])
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}

	forms := map[*framework.Path][]string{} // each path's forms in the document
	for docPath := range doc.Paths {
		var owners []*framework.Path
		for _, p := range b.Backend.Paths {
			if regexp.MustCompile("^" + p.Pattern + "$").MatchString(concretePath(p, docPath)) {
				owners = append(owners, p)
			}
		}
		if len(owners) != 1 {
			t.Errorf("OpenAPI path %s belongs to %d of the backend's paths, want 1", docPath, len(owners))
			continue
		}
		forms[owners[0]] = append(forms[owners[0]], docPath)
	}

	ids := map[string]string{}
	for _, p := range b.Backend.Paths {
		if len(forms[p]) == 0 {
			t.Errorf("path %s is not in the OpenAPI document", p.Pattern)
			continue
		}
		choices := map[string][]string{}
		for _, m := range reChoice.FindAllStringSubmatch(p.Pattern, -1) {
			choices[m[1]] = strings.Split(m[2], "|")
		}
		for _, docPath := range forms[p] {
			item := doc.Paths[docPath]
			var common []oasParameter
			if raw, ok := item["parameters"]; ok {
				_ = json.Unmarshal(raw, &common)
			}
			for method, ops := range map[string][]logical.Operation{
				"get":    {logical.ReadOperation, logical.ListOperation},
				"post":   {logical.CreateOperation, logical.UpdateOperation},
				"delete": {logical.DeleteOperation},
			} {
				var handler framework.OperationHandler
				for _, op := range ops {
					if h, ok := p.Operations[op]; ok && handler == nil {
						handler = h
					}
				}
				raw, inDoc := item[method]
				if (handler != nil) != inDoc {
					t.Errorf("%s %s: declared %v, in the document %v", method, docPath, handler != nil, inDoc)
					continue
				}
				if !inDoc {
					continue
				}
				var op struct {
					OperationID string         `json:"operationId"`
					Parameters  []oasParameter `json:"parameters"`
					RequestBody struct {
						Content map[string]struct {
							Schema oasSchema `json:"schema"`
						} `json:"content"`
					} `json:"requestBody"`
				}
				if err := json.Unmarshal(raw, &op); err != nil {
					t.Fatal(err)
				}
				var want []string
				for _, o := range ops {
					if h, ok := p.Operations[o]; ok {
						want = append(want, operationIDs(p, o, h)...)
					}
				}
				if !contains(want, op.OperationID) {
					t.Errorf("%s %s: operation id %q, want one of %v (from DisplayAttrs)", method, docPath, op.OperationID, want)
				}
				if other, dup := ids[op.OperationID]; dup {
					t.Errorf("operation id %q is both %s and %s %s", op.OperationID, other, method, docPath)
				}
				ids[op.OperationID] = method + " " + docPath

				// Where each field shows, with the values it may take.
				shown := map[string][]string{}
				params := map[string]string{}
				for _, prm := range append(append([]oasParameter{}, common...), op.Parameters...) {
					shown[prm.Name] = enumStrings(prm.Schema.Enum)
					params[prm.Name] = prm.In
				}
				for _, c := range op.RequestBody.Content {
					body := c.Schema
					if ref := strings.TrimPrefix(body.Ref, "#/components/schemas/"); ref != body.Ref {
						body = doc.Components.Schemas[ref]
					}
					for name, prop := range body.Properties {
						shown[name] = enumStrings(prop.Enum)
					}
				}
				for name, f := range p.Fields {
					enum, ok := shown[name]
					if !ok {
						continue // a URL part of another form of the path, or a body field of another operation
					}
					allowed := make([]string, len(f.AllowedValues))
					for i, v := range f.AllowedValues {
						allowed[i] = fmt.Sprint(v)
					}
					wantEnum := allowed
					if c := choices[name]; len(c) > 0 {
						wantEnum = c
						if strings.Join(allowed, "|") != strings.Join(c, "|") {
							t.Errorf("%s: field %s is a choice of %v in the URL, but its AllowedValues are %v", p.Pattern, name, c, allowed)
						}
					}
					if strings.Join(enum, "|") != strings.Join(wantEnum, "|") {
						t.Errorf("%s %s: field %s has enum %v, want %v", method, docPath, name, enum, wantEnum)
					}
				}
				if method == "get" {
					for name, f := range p.Fields {
						if f.Query && params[name] != "query" {
							t.Errorf("get %s: query field %s is not a query parameter (%q)", docPath, name, params[name])
						}
					}
				}
			}
		}
	}
	if len(ids) < 30 {
		t.Fatalf("only %d operations checked", len(ids))
	}
}

type oasParameter struct {
	Name   string    `json:"name"`
	In     string    `json:"in"`
	Schema oasSchema `json:"schema"`
}

type oasSchema struct {
	Ref        string               `json:"$ref"`
	Enum       []interface{}        `json:"enum"`
	Properties map[string]oasSchema `json:"properties"`
}

func enumStrings(vals []interface{}) []string {
	out := make([]string, len(vals))
	for i, v := range vals {
		out[i] = fmt.Sprint(v)
	}
	return out
}

// concretePath fills an OpenAPI path's {parameters} with values the path's pattern takes.
func concretePath(p *framework.Path, docPath string) string {
	return regexp.MustCompile(`\{(\w+)\}`).ReplaceAllStringFunc(strings.TrimPrefix(docPath, "/"), func(m string) string {
		name := strings.Trim(m, "{}")
		if c := regexp.MustCompile(`\(\?P<` + name + `>([a-z_|-]+)\)`).FindStringSubmatch(p.Pattern); c != nil {
			return strings.Split(c[1], "|")[0]
		}
		if f := p.Fields[name]; f != nil && f.Type == framework.TypeInt {
			return "1"
		}
		return "x1"
	})
}

// operationIDs are the ids an operation's DisplayAttrs allow (the operation's own attributes before the path's):
// prefix-verb-suffix, one for each suffix of a path with optional parts; the verb may be left to the operation
// (read, write, list, delete) when a suffix is named. None when neither verb nor suffix is named: the framework
// would make the id up from the path's words.
func operationIDs(p *framework.Path, op logical.Operation, h framework.OperationHandler) []string {
	var prefix, verb, suffix string
	for _, attrs := range []*framework.DisplayAttributes{h.Properties().DisplayAttrs, p.DisplayAttrs} {
		if attrs == nil {
			continue
		}
		prefix = cmp.Or(prefix, attrs.OperationPrefix)
		verb = cmp.Or(verb, attrs.OperationVerb)
		suffix = cmp.Or(suffix, attrs.OperationSuffix)
	}
	switch {
	case verb == "" && suffix == "":
		return nil
	case verb == "" && op == logical.UpdateOperation:
		verb = "write"
	case verb == "":
		verb = string(op)
	}
	var out []string
	for _, s := range strings.Split(suffix, "|") {
		var parts []string
		for _, part := range []string{prefix, verb, s} {
			if part != "" {
				parts = append(parts, part)
			}
		}
		out = append(out, strings.ToLower(strings.Join(parts, "-")))
	}
	return out
}

// responseFieldDocs describes every field the engine's responses carry that is not also a request field (those are
// described with their path above). TestResponseFieldsAreDescribed keeps it in step with the code.
var responseFieldDocs = map[string]string{
	"seq":                         "History, per event: its place in the key's hash chain, from 1; absent in events stored before history was chained.",
	"prev_hash":                   "History, per event: the hex SHA-256 of the event before it in the chain; absent at seq 1.",
	"hash":                        "History, per event: the hex SHA-256 of the event's canonical JSON (members sorted, without `hash`), which covers `prev_hash` and so the whole chain before it.",
	"verified":                    "`history/verify`: every event matches its hash and follows the one before it, and the last is the one the head signed with a version of `audit_key`.",
	"unchained_events":            "`history/verify`: events stored before the engine chained history; listed, not vouched for.",
	"first_broken_index":          "`history/verify`: the place (from 0, as `history` lists them) of the first event that does not verify; the number of events when what is missing is at the end; -1 when none.",
	"first_broken_seq":            "`history/verify`: the seq of the first event that does not verify (0 when it has none, or none is broken).",
	"head_seq":                    "`history/verify`: the seq the signed head vouches for (0: no head).",
	"head_hash":                   "`history/verify`: the hash of the event the head vouches for.",
	"head_signed":                 "`history/verify`: the head's signature verified with `audit_key`'s public key of `head_audit_key_version`, which the token vouches for.",
	"head_signed_at":              "`history/verify`: when the head was signed (RFC 3339).",
	"head_audit_key_version":      "`history/verify`: the `audit_key` version that signed the head.",
	"access":                      "Key read and `inventory`: its access conditions (`keys/:name/access`) in one line, or \"none\".",
	"next_after":                  "`inventory`: present when more keys match: the `after` of the next page.",
	"generated_at":                "`reports/compliance`: when the report was made (RFC 3339).",
	"findings":                    "`reports/compliance`: how many findings the report holds, over all its lists, each finding a `key` and a `reason`.",
	"no_owner":                    "`reports/compliance`: the keys without an owner.",
	"old_versions_encrypting":     "`reports/compliance`: enabled AES and RSA keys whose latest version, the one that encrypts, is older than `max_version_age`, with its `version` and `creation_time`.",
	"pending_deletions":           "`reports/compliance`: keys whose deletion is scheduled (`deletion_scheduled_time`) and versions whose destruction is (`version`, `destruction_scheduled_time`).",
	"grants_outstanding":          "`reports/compliance`: the live grants of every key (`grant_id`, `expires_at`); each key's grants are read from storage the first time.",
	"keys_examined":               "`reports/compliance`: how many keys the report looked at.",
	"deprecated_types_in_use":     "`reports/compliance`: keys with versions of a type `config/keys` `deprecated_types` deprecates that still decrypt, verify or rewrap, with the `type` and the `versions`.",
	"algorithms":                  "`keys/:name/migration`: per key type, its `versions`, those `in_decrypt_window`, what they `made` and `opened`, `last_opened` and `deprecated_since`. `reports/compliance`: per key type over the mount, the `keys` whose current type it is, its `versions` not destroyed, those `in_decrypt_window` (retired ones included) and `deprecated_since`.",
	"made":                        "`keys/:name/migration`: encryptions, signatures and HMACs a version (or the versions of a type) made, as the usage analytics counted them.",
	"opened":                      "`keys/:name/migration`: decryptions (rewrap's included) and verifications that relied on a version (or the versions of a type).",
	"last_made":                   "`keys/:name/migration`, per version: when it last encrypted, signed or made an HMAC (RFC 3339; empty: not counted).",
	"last_opened":                 "`keys/:name/migration`: when a version (or the latest of a type's versions) last decrypted or verified (RFC 3339; empty: not counted).",
	"in_decrypt_window":           "`keys/:name/migration`: whether a version still decrypts and verifies (active or decrypt_only); per type, which versions do. `reports/compliance`: per type, how many versions still decrypt, verify or rewrap.",
	"counts_complete":             "`keys/:name/migration`, per version: its uses have been counted since it was made (false when usage analytics began later, were off for a while, or are off).",
	"counted_since":               "`keys/:name/migration`: since when every use of the key's versions is counted (empty: usage analytics are off, or nothing is counted yet).",
	"deprecated_since":            "`keys/:name/migration`: the day from which `config/keys` `deprecated_types` deprecates the version's (or type's) type; absent when it is not. `reports/compliance` `algorithms`: the same per type.",
	"pending_migration":           "`keys/:name/migration`: the versions below the latest, within the decrypt window or retired, that made something or whose counts are incomplete: rewrap (or sign again) what they protect before retiring them.",
	"decrypt_window_next_check":   "Key read, with a decrypt window: when the periodic function looks at it next (empty: at the next rotation).",
	"rotation_held_until":         "Key read: the scheduled rotation was refused by the mount's algorithm policy (`config/keys` `allowed_types`, `deprecated_types`) and is tried again then; `next_rotation_time` stays, so the key shows as overdue.",
	"grant_id":                    "`reports/compliance`, `grants_outstanding`: the live grant's id.",
	"versions_destroy_scheduled":  "`inventory`: the key's versions whose destruction is scheduled.",
	"summary":                     "`keys/:name/access`: the conditions in one line, or \"none\".",
	"denials":                     "`keys/:name/access`: uses the conditions denied since the plugin started on this node (`by_condition`, `last_denied_at`); kept in memory, so that a denied caller cannot make the engine write storage. `keys/:name/usage`: the uses denied, by the key's conditions, grants or an anomaly's action, since counting began (in all, per operation, per caller, per bucket).",
	"by_condition":                "`keys/:name/access` denials: how many uses each condition (allowed_cidrs, allowed_hours, entity, required_entity_metadata, allowed_entity_ids, allowed_groups, grants_required, grant) denied.",
	"last_denied_at":              "`keys/:name/access` denials: when the last use was denied.",
	"uses":                        "Grant: the uses made, including those a crash lost from a reserved block. `keys/:name/usage`: the uses admitted since counting began, a batch's items each (in all, per operation, per caller, per bucket).",
	"remaining_uses":              "Grant with max_uses: the uses it still allows.",
	"revoked_at":                  "Grant: when it was revoked.",
	"revoked_by":                  "Grant: who revoked it (entity_id, display_name, token_accessor_hmac).",
	"created_at":                  "Grant: when it was created. `audit_key`, per version: when the version was made in the HSM.",
	"approval_id":                 "A request held for dual control (HTTP 202) and `approvals/:id`: the approval's id, the Vault request id of the held request. `reports/compliance`, `pending_approvals`: the pending approval.",
	"approvals":                   "`approvals/:id`: the approvals so far, each with `entity_id`, `display_name`, `token_accessor_hmac` and `time`; in the LIST of `approvals`, per approval: how many.",
	"data":                        "`approvals/:id`, `result`: what the executed request answered.",
	"ended_at":                    "`approvals/:id`: when it was executed, rejected or expired.",
	"expires_at":                  "Grant: when it ends, judged by the engine's clock (RFC 3339). `approvals/:id` and a held request's answer: when it expires unexecuted (`approval_ttl` after it was held). `reports/compliance`: when a pending approval expires, or a live grant ends.",
	"fields":                      "`approvals/:id`: the held request's fields; a sensitive value (an import's wrapped key) only as its `sha256` and `length`.",
	"length":                      "`approvals/:id`, `fields`: the length of a sensitive value that is shown only by its hash.",
	"operation":                   "`approvals/:id`: the held request's operation (create, update, delete). An anomaly: the operation of the unusual use.",
	"path":                        "`approvals/:id`: the held request's path in the mount.",
	"rejected_by":                 "`approvals/:id`: who rejected (or withdrew) it, with `comment`.",
	"requested_at":                "`approvals/:id`: when the request was held.",
	"requested_by":                "`approvals/:id`: who sent the held request (`entity_id`, `display_name`, `token_accessor_hmac`).",
	"result":                      "`approvals/:id`, once executed: the request's HTTP `status` and its `data` and `warnings`, or its `error`.",
	"sha256":                      "`approvals/:id`, `fields`: the SHA-256 (hex) of a sensitive value as sent, to compare with what the approver was given.",
	"status":                      "`approvals/:id`, `result`: the HTTP status the executed request answered. `health`: \"ok\" (a token that does not serve answers 503 naming why).",
	"warnings":                    "`approvals/:id`, `result`: the warnings the executed request answered.",
	"label_prefix":                "config/hsm: the prefix of the CKA_LABEL of every object of the mount, cmk/<mount uuid>/",
	"import_supported":            "config/hsm key_types: whether the token can take an imported key of the type (BYOK)",
	"import_missing":              "config/hsm key_types: why the token cannot take an imported key of the type",
	"adoptable":                   "`reconcile`, per unreferenced object: `adopt=true` would adopt it by itself (generated on the token, never extractable, of the key's type, numbered right after the latest version).",
	"adoptable_by_operator":       "`reconcile`, per unreferenced object: the sudo path `reconcile/adopt-unverified` would adopt it on the operator's word (protected and of the key's type, in a row after the latest version), though the token cannot show it was generated there.",
	"adopted":                     "`reconcile`: the versions this request adopted (`key`, `version`, `hsm_id`, `label`).",
	"adopted_time":                "Key read, per version: when the version was adopted from the token after a storage restore lost it.",
	"allowed_mechanisms_stored":   "`config/hsm`: whether the token keeps `CKA_ALLOWED_MECHANISMS` on the objects the engine makes (probed once per token).",
	"batch_results":               "Batch requests: one result per `batch_input` item, in order, each with its own `error` when that item failed.",
	"cached_keys":                 "`cache-config`: how many keys' metadata the cache holds now.",
	"cause":                       "History event: why it happened, where more than one cause is possible: a rotation's \"manual\", \"scheduled\" or \"usage\"; an adoption's \"storage restore\", \"interrupted\" or \"operator\".",
	"class":                       "`reconcile`, per unreferenced object: its PKCS#11 class (secret key, private key, public key).",
	"connected":                   "`config/hsm`: whether the mount is logged in to its token now.",
	"count":                       "History: how many events the response holds.",
	"created_by":                  "Key read, per version: who made the version (display name and token accessor of the request). Grant: who granted it (entity_id, display_name, token_accessor_hmac). `audit_key`, per version: who rotated it in (the first version: the engine, at the mount's first history event).",
	"creation_time":               "Key read: when the key (or, per version, the version) was made, RFC 3339.",
	"deletion_in_progress":        "Key read: the key's deletion has begun and is being finished; the key serves nothing.",
	"deletion_scheduled_time":     "Key read and delete: when a deleted key's objects are destroyed (after `deletion_grace_period`); until then `cancel-deletion` brings it back. `inventory` and `reports/compliance` too.",
	"destroyed_time":              "Key read, per version: when the version's objects were destroyed on the token.",
	"destruction_scheduled_time":  "Key read, per version: when a version in state `destroy_scheduled` is destroyed.",
	"details":                     "History event: what else the event records (for example the import method). An anomaly, an anomaly action: what was unusual, in numbers.",
	"disabled":                    "Key read: the whole key is disabled and serves no operation until enabled.",
	"display_name":                "History event (and an approval's parties): the display name of the request's token. `keys/:name/usage`, per caller: the display name of its last token.",
	"encryptions":                 "Key read, per AES version: encryptions counted so far (counted in blocks reserved in storage, so it may run ahead of the real count, never behind). `inventory`: those of the latest version, as this node counts them (absent until the version's count is loaded by its first encryption since the node started).",
	"encryptions_unknown":         "Key read, per version: the version's encryption count was lost (it was adopted after a storage restore), so it encrypts no more; the next encryption rotates.",
	"error":                       "`config/hsm`: why the mount is not connected, or the last connection error; in `batch_results`: why that item failed; in an approval's `result`: why the executed request failed.",
	"event":                       "History event: what happened (\"created\", \"rotated\", \"version_imported\", \"version_adopted\", \"version_disabled\", \"deletion_scheduled\", \"approval_requested\", \"approval_granted\", \"approval_executed\", …).",
	"events":                      "History: the key's events, oldest first. `history/verify`: how many events the key's history holds.",
	"firmware_version":            "`config/hsm`, `token`: the token's firmware version.",
	"hardware_version":            "`config/hsm`, `token`: the token's hardware version.",
	"hmac_secret_on_token":        "Key read, per version: whether the version's HMAC secret exists on the token yet; it is made with the version's first HMAC, not at creation.",
	"hsm_id":                      "Key read, per version (and `reconcile`): the hex `CKA_ID` of the version's objects on the token.",
	"hsm_objects_missing":         "Key read, per version: the version's objects the token no longer holds (destroyed outside Vault), each with when the engine first found it missing. Absent when nothing is missing.",
	"import_method":               "Key read, per imported version: how the material was unwrapped: `hsm-unwrap` (both unwraps in the HSM) or `raw-rsa-oaep-decoded-in-plugin` (the operator's `raw_rsa_oaep_fallback`).",
	"imported_key":                "Key read: the key's material was imported (BYOK), not generated on the token.",
	"imported_key_allow_rotation": "Key read, imported keys: whether `rotate` may generate new versions in the HSM.",
	"key":                         "`reconcile`, per object or version: the key it belongs to; `approvals/:id`: the key the held request is about (empty for the mount's own settings). `reports/compliance`: the key a finding is about (empty for the mount's own settings). `keys/:name/usage`, an anomaly: the key.",
	"key_type":                    "`reconcile`, per unreferenced object: its key type as the token reports it.",
	"key_types":                   "`config/hsm`: per key type, whether the token can serve it (`supported`) and, if not, which mechanisms it lacks (`missing`).",
	"key_wrap_mechanism_in_use":   "`config/hsm`: the key-wrap mechanism imports use on this token (the configured one, or the one chosen from the token's list).",
	"keys":                        "Key read: Transit's map of version to creation time (Unix seconds; asymmetric keys: to `name`, `public_key`, `certificate_chain`, `creation_time`); export: version to exported value; `reconcile`: how many keys were compared.",
	"label":                       "Key read, per version (and `reconcile`): the `CKA_LABEL` of the version's objects, `cmk/<mount uuid>/<key>/v<N>`; in `config/hsm`'s `token`: the token's label. `audit_key`, per version: its private key's label, `cmk/<mount uuid>/audit_key:v<N>`.",
	"label_search":                "`config/hsm`: whether the token finds objects by `CKA_LABEL`, which adopting versions a storage restore lost needs (probed on first need).",
	"last_rotated":                "Key read: when the key was last rotated. `inventory` too.",
	"latest_version":              "Key read: the newest version's number. `inventory` too. `audit_key`: the version that signs new heads (0 before the mount's first history event).",
	"library":                     "`config/hsm`: the PKCS#11 module in use, read-only: it is set by the operator in the plugin's environment (`CMK_PKCS11_LIBRARY`), never through the API.",
	"manufacturer_id":             "`config/hsm`, `token`: the token's manufacturer.",
	"max_session_count":           "`config/hsm`, `token`: how many sessions the token allows at once.",
	"mechanisms":                  "`config/hsm`: the mechanisms the engine uses that the token offers.",
	"missing":                     "`config/hsm`, per entry of `key_types`: the mechanisms the token lacks for that key type.",
	"missing_objects":             "`reconcile`: stored versions whose material the token lacks (`key`, `version`, `hsm_id`, `label`).",
	"model":                       "`config/hsm`, `token`: the token's model.",
	"working_copies_probe":        "`config/hsm`: what the token's probe measured of working copies: `speedup` (a session-object copy's AES-GCM rate over its token object's, same session), `faster` (copies are used: at least 1.2×), `refused` (why copies cannot be made on this token, empty if they can).",
	"speedup":                     "`config/hsm` `working_copies_probe`: a session-object copy's AES-GCM rate over its token original's, measured in one session; 0 when not measured.",
	"faster":                      "`config/hsm` `working_copies_probe`: whether working copies are used on this token (measured at least 1.2× faster).",
	"refused":                     "`config/hsm` `working_copies_probe`: why the token makes no working copies (SoftHSM 2.6: it changes no attribute of an unmodifiable key); empty when it makes them.",
	"working_copies_held":         "`config/hsm`: the working copies the mount's connection holds on the token now.",
	"oaep_sha256":                 "`config/hsm`: whether the token's RSA-OAEP takes SHA-256, as `vault transit import` wraps; without it such imports need `raw_rsa_oaep_fallback`.",
	"objects":                     "`reconcile`: how many objects the token holds under the labels compared.",
	"pin_set":                     "`config/hsm`: whether a PIN is stored (the PIN itself is never returned).",
	"pool_size_in_use":            "`config/hsm`: the size of the session pool the connection uses.",
	"protection_level":            "Key read: always \"hsm\".",
	"public_key_only":             "Key read, per version: the version holds only a public key (imported with `public_key`): it verifies (RSA: also encrypts), and nothing is on the token until its private key is imported with `import_version`.",
	"random_bytes":                "`random`: the bytes from the HSM's generator, in the requested `format`.",
	"serial_number":               "`config/hsm`, `token`: the token's serial number.",
	"state":                       "Key read, per version: \"active\", \"decrypt_only\", \"disabled\", \"destroy_scheduled\" or \"destroyed\". Grant: \"live\", \"expired\", \"used_up\" or \"revoked\". `approvals/:id`: \"pending\", \"executing\", \"executed\", \"failed\", \"rejected\" or \"expired\". `inventory`: the key's state, \"active\", \"disabled\" or \"deletion_scheduled\".",
	"sum":                         "`hash`: the digest, in the requested `format`.",
	"supported":                   "`config/hsm`, per entry of `key_types`: whether the token serves that key type.",
	"supports_decryption":         "Key read, as Transit: the key type decrypts.",
	"supports_derivation":         "Key read, as Transit: always false (derived keys are refused).",
	"supports_encryption":         "Key read, as Transit: the key type encrypts.",
	"supports_signing":            "Key read, as Transit: the key type signs.",
	"time":                        "History event (and each of an approval's `approvals`): when it happened, RFC 3339. An anomaly: when it was found.",
	"token":                       "`config/hsm`: what the token says of itself (`label`, `slot`, `manufacturer_id`, `model`, `serial_number`, `hardware_version`, `firmware_version`, `max_session_count`).",
	"token_accessor_hmac":         "History event: the accessor of the request's token as an HMAC under the mount's salt (hmac-sha256:<hex>), never in clear; the same accessor gives the same value on one mount. It does not match Vault's audit hash: each audit device has a salt of its own.",
	"untrusted_objects":           "`reconcile`: objects on the token under a version's HMAC secret CKA_ID that the token does not prove it generated and no record of the engine vouches for; never used (the version's HMAC is a 409) until an operator removes them.",
	"unreferenced_objects":        "`reconcile`: objects on the token under the labels compared that no stored version references, each with `adoptable`, `adoptable_by_operator` and `reason`.",
	"document":                    "`keys/:name/evidence`: the evidence document's JSON text, the exact bytes signed (a string, so that no re-encoding of the response changes them): generated_at, mount, key, versions, access, grants, history (events, head, verification), usage, anomalies and the audit public keys.",
	"value":                       "`keys/:name/evidence`, `signature`: the audit key's signature over `document`, ASN.1 DER, base64.",
	"audit_key_version":           "`keys/:name/evidence`, `signature`: the audit key version that signed (read its public key from `audit_key`). `keys/:name/history/verify`: the version that signed the chain head.",
	"valid":                       "`verify`: whether the signature or HMAC is valid.",
	"actions":                     "`keys/:name/anomalies`: the actions in force on the key's callers (`caller`, `action`, `kind`, `since`, `until`, `details`).",
	"analytics_enabled":           "`keys/:name/usage`: whether `config/analytics` counts uses now.",
	"anomalies":                   "`keys/:name/anomalies`: the key's recent anomalies (the last 50), oldest first, each with `time`, `caller`, `kind`, `operation`, `details`, `action` and, for require_grant and block_caller, `until`.",
	"bounds":                      "`keys/:name/usage`: what analytics keep: `minute_buckets`, `hour_buckets`, `day_buckets`, `max_callers_per_key`, `max_callers_tracked`.",
	"callers":                     "`keys/:name/usage`, per operation: per caller (an entity id, `token:hmac-sha256:<hex>` (its accessor's HMAC) for a token without an entity, `_other` for the callers beyond the caps), its totals and buckets.",
	"callers_folded":              "`keys/:name/usage`: how many callers were counted under `_other`, beyond the callers a key or the mount tracks (counted once each while the key remembers 1024 of them).",
	"day_buckets":                 "`keys/:name/usage`, `bounds`: days kept per caller and operation.",
	"days":                        "`keys/:name/usage`, per caller: the same per day over the last 35 days.",
	"denials_by_condition":        "`keys/:name/usage`: the denials by the condition that refused them (allowed_cidrs, ..., grant, anomaly) since counting began.",
	"first_seen":                  "`keys/:name/usage`, per caller: its first use of the key counted.",
	"hour_buckets":                "`keys/:name/usage`, `bounds`: hours kept per caller and operation.",
	"hours":                       "`keys/:name/usage`, per caller: the same per hour over the last week.",
	"kind":                        "An anomaly: rate_above_limit, rate_above_baseline, new_caller or unusual_hour.",
	"last_seen":                   "`keys/:name/usage`, per caller: its last use of the key counted.",
	"lifted":                      "`keys/:name/anomalies/lift`: the action ended (`caller`, `action`, `kind`, `since`, `until`, `details`).",
	"max_callers_per_key":         "`keys/:name/usage`, `bounds`: callers tracked per key; the others are counted under `_other`.",
	"max_callers_tracked":         "`keys/:name/usage`, `bounds`: (key, caller) pairs tracked over the mount; the others are counted under their key's `_other`.",
	"minute_buckets":              "`keys/:name/usage`, `bounds`: minutes kept per caller and operation.",
	"minutes":                     "`keys/:name/usage`, per caller: its uses and denials per minute with any, over the last hour, oldest first (`start`, `uses`, `denials`).",
	"since":                       "`keys/:name/usage`: when the first use or denial of the key was counted (absent: none yet). An anomaly action: when it began.",
	"start":                       "`keys/:name/usage`, per bucket: when its minute, hour or day begins (UTC).",
	"until":                       "An anomaly and its action: when require_grant or block_caller lapses.",
	"versions":                    "Key read: per version, where it lives in the HSM and its state (the fields marked \"per version\" here). `audit_key`: every version the token vouches for, by number, with `public_key` (PEM, PKIX \"PUBLIC KEY\"), `created_at`, `created_by` and `label`.",
	"uri_path":                    "`xks/stores/:store`, `xks/stores/:store/credentials`: the store's XksProxyUriPath (path_prefix + /kms/xks/v1), what AWS KMS is given.",
	"access_key_ids":              "`xks/stores/:store`: the access key ids of the store's SigV4 credentials (never their secrets).",
	"external_keys":               "`xks/stores/:store`: how many keys the store exposes to AWS KMS.",
	"kms_console_file":            "`xks/stores/:store/credentials` (write): the JSON file the AWS KMS console accepts for the key store (URI path and the credential, secret included).",
	"kms_request_id":              "`xks/request`: the AWS KMS request id (CloudTrail's) the XKS request carried.",
	"kms_operation":               "`xks/request`: the AWS KMS call that led to the XKS request (Encrypt, GenerateDataKey, Decrypt, DescribeKey, KmsHealthCheck, ...).",
	"aws_principal_arn":           "`xks/request`: the AWS principal that called AWS KMS.",
	"error_name":                  "`xks/request`: the XKS error name answered (empty on success).",
	"unvouched_versions":          "`audit_key`: by number, the versions storage records whose key the token does not hold as recorded (not on the token, another CKA_ID or another public key), with why: never used to verify or sign.",
}

// alsoARequestField names the response fields described in responseFieldDocs though a path takes a request field of
// that name meaning something else: inventory filters by state, which responses give for keys, versions, grants and
// approvals; xks/request takes the path of the HTTP request it forwards, an XKS external key the key it exposes, and
// XKS stores and external keys a disabled switch of their own.
var alsoARequestField = map[string]bool{"state": true, "path": true, "key": true, "disabled": true}

// Every field the code puts into a response and that no path takes as a request field is described in
// responseFieldDocs (and so in docs/API.md), and every description is of a field the code emits.
func TestResponseFieldsAreDescribed(t *testing.T) {
	request := requestFields(t)
	for name := range responseFields(t) {
		if !request[name] && responseFieldDocs[name] == "" {
			t.Errorf("response field %s is not described in responseFieldDocs (api_doc_test.go)", name)
		}
	}
	emitted := responseFields(t)
	for name := range responseFieldDocs {
		switch {
		case !emitted[name]:
			t.Errorf("responseFieldDocs describes %s, which no response carries", name)
		case request[name] && !alsoARequestField[name]:
			t.Errorf("responseFieldDocs describes %s, which is a request field, described with its path", name)
		}
	}
}
