// Package xkstest signs XKS requests for tests and the benchmark with SigV4 written from AWS's description, apart
// from the engine's verifier (which uses AWS's own signer): a test that signs here checks the verifier against a
// second implementation, as the end-to-end tests do with curl's.
package xkstest

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/xks"
)

// Sign sets r's X-Amz-Date and Authorization headers: a SigV4 signature at time at, for region, over the host,
// x-amz-date and (when set) content-type headers and the body.
func Sign(r *xks.Request, accessKeyID, secret, region string, at time.Time) {
	date := at.UTC().Format("20060102")
	r.Header.Set("X-Amz-Date", at.UTC().Format("20060102T150405Z"))
	names := []string{"host", "x-amz-date"}
	if r.Header.Get("Content-Type") != "" {
		names = append(names, "content-type")
	}
	sort.Strings(names)
	var canon strings.Builder
	for _, n := range names {
		v := r.Host
		if n != "host" {
			v = r.Header.Get(n)
		}
		canon.WriteString(n + ":" + strings.TrimSpace(v) + "\n")
	}
	body := sha256.Sum256(r.Body)
	creq := strings.Join([]string{r.Method, r.Path, r.Query, canon.String(), strings.Join(names, ";"), hex.EncodeToString(body[:])}, "\n")
	ch := sha256.Sum256([]byte(creq))
	scope := date + "/" + region + "/" + xks.Service + "/aws4_request"
	sts := "AWS4-HMAC-SHA256\n" + r.Header.Get("X-Amz-Date") + "\n" + scope + "\n" + hex.EncodeToString(ch[:])
	mac := func(k []byte, s string) []byte { h := hmac.New(sha256.New, k); h.Write([]byte(s)); return h.Sum(nil) }
	k := mac(mac(mac(mac([]byte("AWS4"+secret), date), region), xks.Service), "aws4_request")
	r.Header.Set("Authorization", "AWS4-HMAC-SHA256 Credential="+accessKeyID+"/"+scope+", SignedHeaders="+strings.Join(names, ";")+
		", Signature="+hex.EncodeToString(mac(k, sts)))
}

// NewRequest is a POST of body to path on host, as JSON, signed.
func NewRequest(host, path string, body []byte, accessKeyID, secret, region string, at time.Time) *xks.Request {
	r := &xks.Request{Method: http.MethodPost, Path: path, Host: host, Header: http.Header{}, Body: body}
	r.Header.Set("Content-Type", "application/json")
	Sign(r, accessKeyID, secret, region, at)
	return r
}
