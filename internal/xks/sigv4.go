package xks

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
)

// SigV4 verification of a request as it reached the front end: the signature is computed again with AWS's own
// signer over the same method, path, signed headers and raw body, and compared. Nothing of the request is trusted
// before that but the access key id, which only chooses the secret.

// Service is the SigV4 service name AWS KMS signs XKS requests for.
const Service = "kms-xks-proxy"

// MaxClockSkew is how far a request's X-Amz-Date may be from the engine's clock, either way (the specification's
// replay window).
const MaxClockSkew = 5 * time.Minute

const amzDateFormat = "20060102T150405Z"

// Request is an HTTP request as the front end received it, byte for byte where SigV4 covers it.
type Request struct {
	Method string
	Path   string // as on the wire: escaped, without the query
	Query  string // raw query, usually empty
	Host   string
	Header http.Header
	Body   []byte
}

// Authorization is a parsed SigV4 Authorization header.
type Authorization struct {
	AccessKeyID   string
	Date          string // yyyymmdd, from the credential scope
	Region        string
	Service       string
	SignedHeaders []string
	Signature     string
}

// ParseAuthorization reads "AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request,
// SignedHeaders=a;b, Signature=hex".
func ParseAuthorization(h string) (*Authorization, error) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(h), "AWS4-HMAC-SHA256 ")
	if !ok {
		return nil, fmt.Errorf("the Authorization header is not AWS4-HMAC-SHA256")
	}
	a := &Authorization{}
	var credential string
	for _, part := range strings.Split(rest, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return nil, fmt.Errorf("malformed Authorization header")
		}
		switch k {
		case "Credential":
			credential = v
		case "SignedHeaders":
			a.SignedHeaders = strings.Split(v, ";")
		case "Signature":
			a.Signature = v
		}
	}
	scope := strings.Split(credential, "/")
	if len(scope) != 5 || scope[4] != "aws4_request" || a.Signature == "" || len(a.SignedHeaders) == 0 {
		return nil, fmt.Errorf("the Authorization header lacks a credential scope, signed headers or a signature")
	}
	a.AccessKeyID, a.Date, a.Region, a.Service = scope[0], scope[1], scope[2], scope[3]
	return a, nil
}

// AuthError is a request whose signature does not verify: AuthenticationFailedException.
type AuthError struct{ Reason string }

func (e *AuthError) Error() string { return "authentication failed: " + e.Reason }

// Verify checks r's SigV4 signature with the secret that secretOf gives for its access key id, for service Service
// and any region, at now. It returns the parsed header; an *AuthError says why a request is refused.
func Verify(r *Request, secretOf func(accessKeyID string) (string, bool), now time.Time) (*Authorization, error) {
	fail := func(format string, args ...interface{}) (*Authorization, error) {
		return nil, &AuthError{Reason: fmt.Sprintf(format, args...)}
	}
	a, err := ParseAuthorization(r.Header.Get("Authorization"))
	if err != nil {
		return fail("%v", err)
	}
	if a.Service != Service {
		return fail("the credential scope names service %q, not %s", a.Service, Service)
	}
	if !slices.Contains(a.SignedHeaders, "host") || !slices.Contains(a.SignedHeaders, "x-amz-date") {
		return fail("the signature must cover the host and x-amz-date headers")
	}
	at, err := time.Parse(amzDateFormat, r.Header.Get("X-Amz-Date"))
	if err != nil {
		return fail("X-Amz-Date is not a yyyymmddThhmmssZ timestamp")
	}
	if d := now.Sub(at); d > MaxClockSkew || d < -MaxClockSkew {
		return fail("the request was signed at %s, more than %s from this engine's clock", at.Format(time.RFC3339), MaxClockSkew)
	}
	if a.Date != at.Format("20060102") {
		return fail("the credential scope's date is not X-Amz-Date's")
	}
	secret, ok := secretOf(a.AccessKeyID)
	if !ok {
		return fail("unknown access key id")
	}
	want, err := sign(r, a, secret, at)
	if err != nil {
		return fail("%v", err)
	}
	if !hmac.Equal([]byte(want), []byte(a.Signature)) {
		return fail("the signature does not match")
	}
	return a, nil
}

// sign computes the signature of r, as AWS's signer computes it, over exactly the headers a names.
func sign(r *Request, a *Authorization, secret string, at time.Time) (string, error) {
	u := &url.URL{Scheme: "https", Host: r.Host, RawQuery: r.Query}
	if err := setPath(u, r.Path); err != nil {
		return "", err
	}
	req := &http.Request{Method: r.Method, URL: u, Host: r.Host, Header: http.Header{}}
	for _, h := range a.SignedHeaders {
		switch h {
		case "host", "x-amz-date": // the signer sets both: host from the request, the date from at
		case "content-length":
			n, err := strconv.ParseInt(r.Header.Get("Content-Length"), 10, 64)
			if err != nil || n <= 0 || n != int64(len(r.Body)) {
				return "", fmt.Errorf("signed content-length is not the body's length")
			}
			req.ContentLength = n
		case "authorization", "user-agent", "x-amzn-trace-id", "expect", "transfer-encoding":
			return "", fmt.Errorf("header %q cannot be signed", h)
		default:
			v, ok := r.Header[http.CanonicalHeaderKey(h)]
			if !ok {
				return "", fmt.Errorf("signed header %q is missing", h)
			}
			req.Header[http.CanonicalHeaderKey(h)] = v
		}
	}
	sum := sha256.Sum256(r.Body)
	// A signer per verification: a signer caches the keys it derives by access key id, region and service, not by
	// secret, so a shared one would go on verifying a replaced secret under a reused access key id for the day.
	signer := v4.NewSigner()
	creds := aws.Credentials{AccessKeyID: a.AccessKeyID, SecretAccessKey: secret}
	if err := signer.SignHTTP(context.Background(), creds, req, hex.EncodeToString(sum[:]), a.Service, a.Region, at); err != nil {
		return "", err
	}
	got, err := ParseAuthorization(req.Header.Get("Authorization"))
	if err != nil {
		return "", err
	}
	if !slices.Equal(got.SignedHeaders, a.SignedHeaders) {
		return "", fmt.Errorf("the signed headers are not in canonical order")
	}
	return got.Signature, nil
}

func setPath(u *url.URL, escaped string) error {
	p, err := url.PathUnescape(escaped)
	if err != nil {
		return fmt.Errorf("the path is not validly escaped")
	}
	u.Path, u.RawPath = p, escaped
	return nil
}
