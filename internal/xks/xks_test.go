package xks_test

import (
	"encoding/base64"
	"encoding/hex"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/xks"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/xks/xkstest"
)

// A request curl 7.88.1 signed (`curl --aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy"` with the key of the
// specification's console-file example and a fixed X-Amz-Date), as a listener received it: an independent SigV4
// implementation's known answer.
func curlSigned() *xks.Request {
	h := http.Header{}
	h.Set("Authorization", "AWS4-HMAC-SHA256 Credential=AKIAI2SFODNN7EXAMPLE/20221012/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=a205e53752ba67915c6c775ad5595299c92f3276c7dfa391d408f97bce2b4f05")
	h["X-Amz-Date"] = []string{"20221012T101500Z", "20221012T101500Z"} // curl sends its own and the one it was given
	h.Set("User-Agent", "curl/7.88.1")
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", "79")
	return &xks.Request{Method: "POST", Path: "/tenant1/kms/xks/v1/health", Host: "127.0.0.1:18777", Header: h,
		Body: []byte(`{"requestMetadata":{"kmsRequestId":"4112f4d6","kmsOperation":"KmsHealthCheck"}}`)}
}

const curlSecret = "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE"

var curlTime = time.Date(2022, 10, 12, 10, 16, 0, 0, time.UTC)

func secrets(m map[string]string) func(string) (string, bool) {
	return func(id string) (string, bool) { s, ok := m[id]; return s, ok }
}

func TestVerifyAcceptsCurlsSignature(t *testing.T) {
	a, err := xks.Verify(curlSigned(), secrets(map[string]string{"AKIAI2SFODNN7EXAMPLE": curlSecret}), curlTime)
	if err != nil {
		t.Fatal(err)
	}
	if a.Region != "us-east-1" || a.AccessKeyID != "AKIAI2SFODNN7EXAMPLE" {
		t.Fatalf("parsed %+v", a)
	}
}

func TestVerifyRefuses(t *testing.T) {
	ok := secrets(map[string]string{"AKIAI2SFODNN7EXAMPLE": curlSecret})
	cases := map[string]struct {
		change  func(r *xks.Request)
		secrets func(string) (string, bool)
		now     time.Time
		reason  string
	}{
		"body changed":       {change: func(r *xks.Request) { r.Body[len(r.Body)-3] = 'X' }, reason: "does not match"},
		"path changed":       {change: func(r *xks.Request) { r.Path = "/tenant2/kms/xks/v1/health" }, reason: "does not match"},
		"host changed":       {change: func(r *xks.Request) { r.Host = "127.0.0.1:18778" }, reason: "does not match"},
		"method changed":     {change: func(r *xks.Request) { r.Method = "PUT" }, reason: "does not match"},
		"signed header gone": {change: func(r *xks.Request) { r.Header.Del("Content-Type") }, reason: "missing"},
		"content-length not the body's": {change: func(r *xks.Request) {
			r.Header.Set("Authorization", strings.Replace(r.Header.Get("Authorization"), "content-type;", "content-length;content-type;", 1))
			r.Header.Set("Content-Length", "78")
		}, reason: "content-length"},
		"signed header edited": {change: func(r *xks.Request) { r.Header.Set("Content-Type", "text/plain") }, reason: "does not match"},
		"wrong secret":         {secrets: secrets(map[string]string{"AKIAI2SFODNN7EXAMPLE": "Invalid" + curlSecret}), reason: "does not match"},
		"unknown access key":   {secrets: secrets(map[string]string{"InvalidAKIAI2SFODNN7EXAMPLE": curlSecret}), reason: "unknown access key"},
		"six minutes late":     {now: curlTime.Add(6 * time.Minute), reason: "more than 5m0s"},
		"six minutes early":    {now: curlTime.Add(-7 * time.Minute), reason: "more than 5m0s"},
		"no authorization":     {change: func(r *xks.Request) { r.Header.Del("Authorization") }, reason: "not AWS4-HMAC-SHA256"},
		"other service": {change: func(r *xks.Request) {
			r.Header.Set("Authorization", strings.Replace(r.Header.Get("Authorization"), "kms-xks-proxy", "kms", 1))
		}, reason: "service"},
		"date not covered": {change: func(r *xks.Request) {
			r.Header.Set("Authorization", strings.Replace(r.Header.Get("Authorization"), ";x-amz-date", "", 1))
		}, reason: "must cover"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			r := curlSigned()
			if c.change != nil {
				c.change(r)
			}
			s := ok
			if c.secrets != nil {
				s = c.secrets
			}
			now := curlTime
			if !c.now.IsZero() {
				now = c.now
			}
			_, err := xks.Verify(r, s, now)
			var auth *xks.AuthError
			if !errors.As(err, &auth) || !strings.Contains(auth.Reason, c.reason) {
				t.Fatalf("got %v, want an authentication failure naming %q", err, c.reason)
			}
		})
	}
}

func TestVerifyAcceptsASecondImplementationsSignature(t *testing.T) {
	now := time.Now()
	for _, region := range []string{"us-east-1", "eu-west-1", "ap-southeast-2"} {
		r := xkstest.NewRequest("xks.example.com", "/kms/xks/v1/keys/k-1.x_y/encrypt", []byte(`{"plaintext":"AAAA"}`),
			"ABCDEFGHIJKLMNOPQRSTUVWX", "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=", region, now.Add(-4*time.Minute))
		a, err := xks.Verify(r, secrets(map[string]string{"ABCDEFGHIJKLMNOPQRSTUVWX": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI="}), now)
		if err != nil || a.Region != region {
			t.Fatalf("%s: %v %+v", region, err, a)
		}
	}
}

// The specification's Appendix C example: its fields, and the xks.CDIV it gives.
func TestCDIVOfTheSpecificationsExample(t *testing.T) {
	d := func(s string) []byte {
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	aad := d("cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n")
	got := xks.CDIV(aad, d("a2V5X3ZlcnNpb249MQ=="), d("HMrlRw85cAJUd5Ax"), d("ghxkK1txeDNn3q8Y"), d("vBxN2ncH1oEkR8WVXpmyYQ=="))
	if want := "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="; base64.StdEncoding.EncodeToString(got) != want {
		t.Fatalf("xks.CDIV %s, want %s", base64.StdEncoding.EncodeToString(got), want)
	}
	if len(aad) != 33 {
		t.Fatalf("AAD is %d bytes, the specification says 33", len(aad))
	}
}

func TestHSMAADKeepsAADAndMetadataApart(t *testing.T) {
	md := xks.Metadata(7)
	a := xks.HSMAAD(nil, md)
	b := xks.HSMAAD(md, nil)
	if string(a) == string(b) {
		t.Fatal("AAD and metadata can stand in for each other")
	}
	if got := hex.EncodeToString(xks.HSMAAD([]byte("ab"), md)); got != "0002616205"+"0100000007" {
		t.Fatalf("HSM AAD %s", got)
	}
	if v, ok := xks.VersionOf(md); !ok || v != 7 {
		t.Fatalf("version %d %v", v, ok)
	}
	for _, bad := range [][]byte{nil, {1, 0, 0, 0}, {2, 0, 0, 0, 1}, {1, 0, 0, 0, 0}, {1, 0x80, 0, 0, 0}} {
		if _, ok := xks.VersionOf(bad); ok {
			t.Fatalf("metadata %x read as a version", bad)
		}
	}
	if len(xks.Metadata(1<<31-1)) > xks.MaxMetadata {
		t.Fatal("metadata longer than the specification allows")
	}
}

func TestRouteAndURIPaths(t *testing.T) {
	for _, p := range []string{"/kms/xks/v1", "/tenant-1/kms/xks/v1", "/keystores/4a0d79d6-1d1b/kms/xks/v1"} {
		if err := xks.CheckURIPath(p); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
	}
	for _, p := range []string{"kms/xks/v1", "/a b/kms/xks/v1", "/x/kms/xks/v2", "//kms/xks/v1", "/" + strings.Repeat("a", 120) + "/kms/xks/v1", "/a.b/kms/xks/v1"} {
		if err := xks.CheckURIPath(p); err == nil {
			t.Fatalf("%s accepted", p)
		}
	}
	routes := map[string]struct {
		op  xks.Operation
		id  string
		err string
	}{
		"/t/kms/xks/v1/health":                 {op: xks.OpHealth},
		"/t/kms/xks/v1/keys/abc.D-9_x/encrypt": {op: xks.OpEncrypt, id: "abc.D-9_x"},
		"/t/kms/xks/v1/keys/k/decrypt":         {op: xks.OpDecrypt, id: "k"},
		"/t/kms/xks/v1/keys/k/metadata":        {op: xks.OpMetadata, id: "k"},
		"/t/invalid/kms/xks/v1/health":         {err: xks.InvalidURIPathException},
		"/t/kms/xks/v1/keys/k/sign":            {err: xks.InvalidURIPathException},
		"/t/kms/xks/v1/keys/k%20x/encrypt":     {err: xks.InvalidURIPathException},
		"/t/kms/xks/v1/keys//encrypt":          {err: xks.InvalidURIPathException},
	}
	for path, want := range routes {
		op, id, err := xks.Route(path, "/t/kms/xks/v1")
		if want.err != "" {
			if err == nil || err.Name != want.err || err.Status != 404 {
				t.Fatalf("%s: %v", path, err)
			}
			continue
		}
		if err != nil || op != want.op || id != want.id {
			t.Fatalf("%s: %s %s %v", path, op, id, err)
		}
	}
}

func TestParseChecksWhatTheSpecificationRequires(t *testing.T) {
	md := `"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::1:user/A","kmsKeyArn":"arn:aws:kms:us-east-1:1:key/x","kmsOperation":"SomeFutureOperation","kmsRequestId":"r1","newField":"ignored"}`
	cases := map[string]struct {
		op   xks.Operation
		body string
		err  string
	}{
		"encrypt":                 {xks.OpEncrypt, `{` + md + `,"plaintext":"AAAA","encryptionAlgorithm":"AES_GCM"}`, ""},
		"encrypt, no plaintext":   {xks.OpEncrypt, `{` + md + `,"encryptionAlgorithm":"AES_GCM"}`, xks.ValidationException},
		"encrypt, other cipher":   {xks.OpEncrypt, `{` + md + `,"plaintext":"AAAA","encryptionAlgorithm":"AES_CBC"}`, xks.UnsupportedOperationException},
		"encrypt, other xks.CDIV": {xks.OpEncrypt, `{` + md + `,"plaintext":"AAAA","encryptionAlgorithm":"AES_GCM","ciphertextDataIntegrityValueAlgorithm":"MD5"}`, xks.UnsupportedOperationException},
		"decrypt, no tag":         {xks.OpDecrypt, `{` + md + `,"ciphertext":"AAAA","initializationVector":"AAAA","encryptionAlgorithm":"AES_GCM"}`, xks.ValidationException},
		"metadata":                {xks.OpMetadata, `{` + md + `}`, ""},
		"no metadata":             {xks.OpMetadata, `{}`, xks.ValidationException},
		"not JSON":                {xks.OpMetadata, `plaintext`, xks.ValidationException},
		"health":                  {xks.OpHealth, `{"requestMetadata":{"kmsRequestId":"r","kmsOperation":"KmsHealthCheck"}}`, ""},
		"health, no request id":   {xks.OpHealth, `{"requestMetadata":{"kmsOperation":"KmsHealthCheck"}}`, xks.ValidationException},
		"metadata, no principal":  {xks.OpMetadata, `{"requestMetadata":{"kmsOperation":"DescribeKey","kmsRequestId":"r"}}`, xks.ValidationException},
		"encrypt, no kms key arn": {xks.OpEncrypt, `{"requestMetadata":{"awsPrincipalArn":"a","kmsOperation":"Encrypt","kmsRequestId":"r"},"plaintext":"AAAA","encryptionAlgorithm":"AES_GCM"}`, xks.ValidationException},
	}
	for name, c := range cases {
		_, err := xks.Parse(c.op, []byte(c.body))
		switch {
		case c.err == "" && err != nil:
			t.Fatalf("%s: %v", name, err)
		case c.err != "" && (err == nil || err.Name != c.err):
			t.Fatalf("%s: got %v, want %s", name, err, c.err)
		}
	}
}

func TestDecodeLimits(t *testing.T) {
	big := base64.StdEncoding.EncodeToString(make([]byte, xks.MaxPlaintext+1))
	if _, err := xks.Decode("plaintext", &big, xks.MaxPlaintext); err == nil || err.Name != xks.UnsupportedOperationException {
		t.Fatalf("oversized: %v", err)
	}
	bad := "not base64!"
	if _, err := xks.Decode("plaintext", &bad, xks.MaxPlaintext); err == nil || err.Name != xks.ValidationException {
		t.Fatalf("bad base64: %v", err)
	}
	ok := base64.StdEncoding.EncodeToString(make([]byte, 4300))
	if b, err := xks.Decode("plaintext", &ok, xks.MaxPlaintext); err != nil || len(b) != 4300 {
		t.Fatalf("4300 bytes: %v", err)
	}
}

func TestErrorMessagesArePrintableASCII(t *testing.T) {
	e := xks.Errorf(xks.AccessDeniedException, "caller \x00é %s", strings.Repeat("x", 1000))
	if e.Status != 403 || len(e.Message) >= 512 || strings.ContainsAny(e.Message, "\x00é") {
		t.Fatalf("%d %q", e.Status, e.Message)
	}
}
