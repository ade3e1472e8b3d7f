package cmk

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/time/rate"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/xks"
)

// AWS KMS External Key Store, the API: cmd/cmk-xks-proxy forwards each request's bytes to xks/request; the engine
// verifies SigV4 over them, routes the request to its store and external key, and serves it through the door
// every use of a key passes (keys.Manager.Use), with the store's and the key's rules on the request's metadata
// judged there beside the key's own access conditions.

const xksRequestPath = "xks/request"

// xksState is the mount's XKS configuration as serving reads it (cached, dropped on every change), the stores'
// throttles, and the last deep health check.
type xksState struct {
	writeMu sync.Mutex // serialises configuration writes

	mu         sync.Mutex
	cfg        *xksConfig
	generation uint64                   // counts drops: a snapshot read across one is not kept
	limiters   map[string]*rate.Limiter // by store

	healthMu      sync.Mutex
	healthAt      time.Time // when the last deep check completed (zero: none has)
	healthOK      error     // its outcome
	healthRunning bool      // a check is under way
	healthKeyMu   sync.Mutex
}

type xksConfig struct {
	stores      map[string]*xksStore
	credentials map[string]*xksCredential     // by access key id
	keys        map[string]map[string]*xksKey // store → external key id → key
}

func (x *xksState) drop() {
	x.mu.Lock()
	x.cfg = nil
	x.generation++
	x.mu.Unlock()
}

// config returns the cached configuration, reading it from storage if a change dropped it. A read that a change
// overtook is used for its own request but not kept: the next request reads again, so a deleted credential or a
// tightened rule holds from the change on.
func (x *xksState) config(ctx context.Context, s logical.Storage) (*xksConfig, error) {
	x.mu.Lock()
	cfg, gen := x.cfg, x.generation
	x.mu.Unlock()
	if cfg != nil {
		return cfg, nil
	}
	cfg = &xksConfig{stores: map[string]*xksStore{}, credentials: map[string]*xksCredential{}, keys: map[string]map[string]*xksKey{}}
	names, err := s.List(ctx, xksStoresPrefix)
	if err != nil {
		return nil, err
	}
	for _, n := range names {
		st, err := getJSON[xksStore](ctx, s, xksStoresPrefix+n)
		if err != nil {
			return nil, err
		}
		if st == nil {
			continue
		}
		cfg.stores[n] = st
		ids, err := s.List(ctx, xksKeysPrefix+n+"/")
		if err != nil {
			return nil, err
		}
		cfg.keys[n] = map[string]*xksKey{}
		for _, id := range ids {
			xk, err := getJSON[xksKey](ctx, s, xksKeysPrefix+n+"/"+id)
			if err != nil {
				return nil, err
			}
			if xk != nil {
				cfg.keys[n][id] = xk
			}
		}
	}
	ids, err := s.List(ctx, xksCredentialsPrefix)
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		c, err := getJSON[xksCredential](ctx, s, xksCredentialsPrefix+id)
		if err != nil {
			return nil, err
		}
		if c != nil {
			cfg.credentials[id] = c
		}
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.generation != gen {
		return cfg, nil
	}
	if x.limiters == nil {
		x.limiters = map[string]*rate.Limiter{}
	}
	for n, st := range cfg.stores {
		if st.RequestsPerSecond == 0 {
			delete(x.limiters, n)
			continue
		}
		burst := st.Burst
		if burst == 0 {
			burst = st.RequestsPerSecond
		}
		l := x.limiters[n]
		if l == nil || l.Limit() != rate.Limit(st.RequestsPerSecond) || l.Burst() != burst {
			x.limiters[n] = rate.NewLimiter(rate.Limit(st.RequestsPerSecond), burst)
		}
	}
	x.cfg = cfg
	return cfg, nil
}

func (x *xksState) allow(store string) bool {
	x.mu.Lock()
	l := x.limiters[store]
	x.mu.Unlock()
	return l == nil || l.Allow()
}

func (b *backend) pathXKSRequest() *framework.Path {
	return &framework.Path{
		Pattern:      xksRequestPath,
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: "cmk", OperationVerb: "serve", OperationSuffix: "xks-request"},
		Fields: map[string]*framework.FieldSchema{
			"method":  {Type: framework.TypeString, Required: true, Description: "The HTTP method AWS KMS used."},
			"path":    {Type: framework.TypeString, Required: true, Description: "The request's path as received (escaped, without the query)."},
			"query":   {Type: framework.TypeString, Description: "The request's raw query, if any."},
			"host":    {Type: framework.TypeString, Required: true, Description: "The Host header as received."},
			"headers": {Type: framework.TypeMap, Description: "The request's headers, name → value or list of values, as received."},
			"body":    {Type: framework.TypeString, Description: "The request's body, Base64: the bytes SigV4 signed."},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: handle(b.pathXKSRequestWrite), Summary: "Serve one AWS XKS proxy API request, forwarded by cmk-xks-proxy."},
		},
		HelpSynopsis: "Serve an AWS KMS External Key Store request forwarded byte for byte by cmk-xks-proxy.",
		HelpDescription: xksHelp + " Vault parses a request body before a plugin sees it, so the front end forwards the method, " +
			"path, host, headers and Base64 body of each request it receives, and relays the answer: status is the HTTP " +
			"status to give AWS and body the JSON body. A policy for the front end's token needs update on this path only. " +
			"The answer also names, for Vault's audit log, kms_request_id (CloudTrail's request id), kms_operation, " +
			"aws_principal_arn, store, external_key_id, key, key_version and error_name; audit devices HMAC them unless the " +
			"mount is tuned with audit_non_hmac_response_keys. Plaintext is never logged.",
	}
}

// xksAnswer is what serving a request gives the front end, and the audit log.
type xksAnswer struct {
	status int
	body   []byte
	info   map[string]interface{}
}

func (a *xksAnswer) fail(e *xks.Error) *xksAnswer {
	a.status, a.body = e.Status, e.Body()
	a.info["error_name"] = e.Name
	return a
}

func (a *xksAnswer) ok(v interface{}) *xksAnswer {
	body, err := json.Marshal(v)
	if err != nil {
		return a.fail(xks.Errorf(xks.InternalException, "%v", err))
	}
	a.status, a.body = http.StatusOK, body
	return a
}

func (b *backend) pathXKSRequestWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	r := &xks.Request{Method: d.Get("method").(string), Path: d.Get("path").(string), Query: d.Get("query").(string),
		Host: d.Get("host").(string), Header: http.Header{}}
	for name, v := range d.Get("headers").(map[string]interface{}) {
		if _, dup := r.Header[http.CanonicalHeaderKey(name)]; dup {
			return respond(callerf("headers: %s is given twice, in different cases", name))
		}
		switch v := v.(type) {
		case string:
			r.Header.Add(name, v)
		case []interface{}:
			for _, s := range v {
				r.Header.Add(name, fmt.Sprint(s))
			}
		default:
			return respond(callerf("headers: %s is neither a string nor a list of strings", name))
		}
	}
	var err error
	if r.Body, err = base64.StdEncoding.DecodeString(d.Get("body").(string)); err != nil {
		return respond(callerf("body is not valid Base64"))
	}
	started := time.Now()
	a := b.serveXKS(ctx, req, r)
	b.metrics.xksServed(a.info["operation"], a.info["error_name"], time.Since(started))
	data := map[string]interface{}{"status": a.status, "body": string(a.body)}
	for k, v := range a.info {
		data[k] = v
	}
	return &logical.Response{Data: data}, nil
}

// serveXKS answers one request, in the order the specification implies: the method, the signature (nothing else
// is looked at for a request that does not verify, and the caller learns only that it did not), the path under the
// credential's store, the store's throttle, the body, then the operation. Inputs are read whole before the door, so
// that what it admits and counts is a use that reaches the HSM.
func (b *backend) serveXKS(ctx context.Context, req *logical.Request, r *xks.Request) *xksAnswer {
	a := &xksAnswer{info: map[string]interface{}{"operation": "unknown", "error_name": ""}}
	if r.Method != http.MethodPost {
		a.status, a.body = http.StatusMethodNotAllowed, xks.Errorf(xks.ValidationException, "XKS requests are POSTs").Body()
		a.info["error_name"] = "MethodNotAllowed"
		return a
	}
	cfg, err := b.xks.config(ctx, req.Storage)
	if err != nil {
		return a.fail(xksError(err))
	}
	auth, err := xks.Verify(r, func(id string) (string, bool) {
		c := cfg.credentials[id]
		if c == nil {
			return "", false
		}
		return c.Secret, true
	}, time.Now())
	var authErr *xks.AuthError
	if errors.As(err, &authErr) {
		// Why stays here: telling the caller would let it find access key ids, or the engine's clock.
		b.logger.Warn("XKS request refused: its signature does not verify", "reason", authErr.Reason, "path", r.Path)
		return a.fail(xks.Errorf(xks.AuthenticationFailedException, "the request's SigV4 signature does not verify"))
	}
	store := cfg.stores[cfg.credentials[auth.AccessKeyID].Store]
	if store == nil {
		return a.fail(xks.Errorf(xks.InvalidURIPathException, "the credential's key store is gone"))
	}
	a.info["store"] = store.Name
	op, id, xerr := xks.Route(r.Path, store.uriPath())
	if xerr != nil {
		return a.fail(xerr)
	}
	a.info["operation"] = string(op)
	if !b.xks.allow(store.Name) {
		return a.fail(xks.Errorf(xks.ThrottlingException, "key store %s is past its %d requests per second", store.Name, store.RequestsPerSecond))
	}
	body, xerr := xks.Parse(op, r.Body)
	if xerr != nil {
		return a.fail(xerr)
	}
	md := body.RequestMetadata
	a.info["kms_request_id"] = md.KMSRequestID
	a.info["kms_operation"] = md.KMSOperation
	if store.Disabled {
		return a.fail(xks.Errorf(xks.InvalidStateException, "key store %s is disabled", store.Name))
	}
	if op == xks.OpHealth {
		return a.ok(b.xksHealth(ctx, req.Storage))
	}
	a.info["aws_principal_arn"] = md.AWSPrincipalARN
	a.info["external_key_id"] = id
	xk := cfg.keys[store.Name][id]
	if xk == nil {
		return a.fail(xks.Errorf(xks.KeyNotFoundException, "key store %s has no external key %s", store.Name, id))
	}
	a.info["key"] = xk.Key
	k, err := b.keys.Get(ctx, req.Storage, xk.Key)
	switch {
	case err != nil:
		return a.fail(xksError(err))
	case k == nil || !k.CreatedAt.Equal(xk.KeyCreatedAt):
		// Deleted, or deleted and made again under the name: not the material AWS's ciphertexts were made with.
		return a.fail(xks.Errorf(xks.KeyNotFoundException, "external key %s's key %s is no longer on the mount", id, xk.Key))
	}
	judge := func(*keys.Key) (string, string) { return xksJudge(store, xk, md, op) }
	if op == xks.OpMetadata {
		// Reads no key material, so it does not pass the door; the rules on the request's metadata apply.
		if cond, why := judge(k); cond != "" {
			b.xksDenied(ctx, req, k.Name, md, op, id, why)
			return a.fail(xks.Errorf(xks.AccessDeniedException, "%s", why))
		}
		status := "ENABLED"
		if k.Usable() != nil || xk.Disabled {
			status = "DISABLED"
		}
		return a.ok(xks.KeyMetadata{KeySpec: "AES_256", KeyUsage: xk.KeyUsage, KeyStatus: status})
	}
	if !slices.Contains(xk.KeyUsage, strings.ToUpper(string(op))) {
		return a.fail(xks.Errorf(xks.InvalidKeyUsageException, "external key %s does not allow %s (key_usage %s)", id, op, strings.Join(xk.KeyUsage, ",")))
	}
	if xk.Disabled {
		return a.fail(xks.Errorf(xks.InvalidStateException, "external key %s is disabled", id))
	}
	if err := k.Usable(); err != nil {
		return a.fail(xks.Errorf(xks.InvalidStateException, "%v", err))
	}
	in, xerr := readCrypto(op, body)
	if xerr != nil {
		return a.fail(xerr)
	}
	defer clear(in.plaintext)
	c := b.callerOf(req)
	c.Protocol = judge
	kop := keys.OpEncrypt
	if op == xks.OpDecrypt {
		kop = keys.OpDecrypt
	}
	u, err := b.keys.Use(ctx, req.Storage, k.Name, c, kop, 1)
	if err != nil {
		var denied *keys.DeniedError
		switch {
		case errors.As(err, &denied):
			b.xksDenied(ctx, req, k.Name, md, op, id, err.Error())
			return a.fail(xks.Errorf(xks.AccessDeniedException, "%v", err))
		case keys.IsCaller(err): // deleted, disabled or scheduled for deletion since the read above
			now, gerr := b.keys.Get(ctx, req.Storage, k.Name)
			switch {
			case gerr != nil:
				return a.fail(xksError(gerr))
			case now == nil || !now.CreatedAt.Equal(xk.KeyCreatedAt):
				return a.fail(xks.Errorf(xks.KeyNotFoundException, "external key %s's key %s is no longer on the mount", id, xk.Key))
			}
			return a.fail(xks.Errorf(xks.InvalidStateException, "%v", err))
		}
		return a.fail(xksError(err))
	}
	if op == xks.OpEncrypt {
		return b.xksEncrypt(ctx, u, in, a)
	}
	return b.xksDecrypt(ctx, u, in, a)
}

// xksCrypto is an encrypt or decrypt request's inputs, decoded and checked.
type xksCrypto struct {
	plaintext, aad, ciphertext, iv, tag, metadata []byte
	version                                       int
	cdiv                                          bool
}

func readCrypto(op xks.Operation, body *xks.Body) (*xksCrypto, *xks.Error) {
	in := &xksCrypto{cdiv: body.CDIVAlgorithm != nil}
	var xerr *xks.Error
	if in.aad, xerr = xks.Decode("additionalAuthenticatedData", body.AAD, xks.MaxAAD); xerr != nil {
		return nil, xerr
	}
	if op == xks.OpEncrypt {
		in.plaintext, xerr = xks.Decode("plaintext", body.Plaintext, xks.MaxPlaintext)
		return in, xerr
	}
	for _, f := range []struct {
		name string
		v    *string
		max  int
		dst  *[]byte
	}{
		{"ciphertext", body.Ciphertext, xks.MaxPlaintext, &in.ciphertext},
		{"initializationVector", body.IV, 16, &in.iv},
		{"authenticationTag", body.Tag, 16, &in.tag},
		{"ciphertextMetadata", body.Metadata, xks.MaxMetadata, &in.metadata},
	} {
		if *f.dst, xerr = xks.Decode(f.name, f.v, f.max); xerr != nil {
			return nil, xerr
		}
	}
	if len(in.iv) != 12 || len(in.tag) != 16 {
		return nil, xks.Errorf(xks.InvalidCiphertextException, "the initialization vector (%d bytes) or authentication tag (%d bytes) is not one this engine made (12 and 16)", len(in.iv), len(in.tag))
	}
	v, ok := xks.VersionOf(in.metadata)
	if !ok {
		return nil, xks.Errorf(xks.InvalidCiphertextException, "the ciphertext metadata is missing or not this engine's")
	}
	in.version = v
	return in, nil
}

func (b *backend) xksEncrypt(ctx context.Context, u *keys.Use, in *xksCrypto, a *xksAnswer) *xksAnswer {
	v, iv, sealed, err := u.SealGCM(ctx, in.plaintext, func(v int) []byte { return xks.HSMAAD(in.aad, xks.Metadata(v)) }, keys.TypeAES256GCM96)
	if err != nil {
		if keys.IsCaller(err) { // the version's encryption limit, or a rotation to another type
			return a.fail(xks.Errorf(xks.InvalidStateException, "%v", err))
		}
		return a.fail(xksError(err))
	}
	a.info["key_version"] = v
	md := xks.Metadata(v)
	ct, tag := xks.Sealed(sealed)
	out := xks.EncryptResponse{Ciphertext: base64Of(ct), Metadata: base64Of(md), IV: base64Of(iv), Tag: base64Of(tag)}
	if in.cdiv {
		// Appendix C: the value first, over what is returned, then a decryption of exactly that in the HSM, so that
		// a corruption after the encryption is caught rather than vouched for.
		out.CDIV = base64Of(xks.CDIV(in.aad, md, iv, ct, tag))
		if err := u.CheckSealed(ctx, v, iv, xks.HSMAAD(in.aad, md), xks.Join(ct, tag), in.plaintext); err != nil {
			return a.fail(xks.Errorf(xks.InternalException, "the ciphertext did not decrypt to the plaintext in the HSM: %v", err))
		}
	}
	return a.ok(out)
}

func (b *backend) xksDecrypt(ctx context.Context, u *keys.Use, in *xksCrypto, a *xksAnswer) *xksAnswer {
	a.info["key_version"] = in.version
	invalid := func(format string, args ...interface{}) *xksAnswer {
		return a.fail(xks.Errorf(xks.InvalidCiphertextException, format, args...))
	}
	if err := u.AdoptNamed(ctx, in.version, 1); err != nil {
		if keys.IsCaller(err) {
			return invalid("%v", err)
		}
		return a.fail(xksError(err))
	}
	pt, err := u.OpenGCM(ctx, in.version, in.iv, xks.HSMAAD(in.aad, in.metadata), xks.Join(in.ciphertext, in.tag))
	switch {
	case errors.Is(err, hsm.ErrInvalidCiphertext):
		return invalid("the key does not authenticate the ciphertext, AAD, metadata, initialization vector and tag given: one is altered, missing or another's")
	case keys.IsCaller(err):
		return invalid("%v", err)
	case err != nil:
		return a.fail(xksError(err))
	}
	defer clear(pt)
	return a.ok(map[string]string{"plaintext": base64Of(pt)})
}

func base64Of(p []byte) string { return base64.StdEncoding.EncodeToString(p) }

// xksError maps what is not the caller's doing: the HSM unreachable or out of time is DependencyTimeoutException
// (AWS retries), anything else InternalException.
func xksError(err error) *xks.Error {
	if errors.Is(err, hsm.ErrUnavailable) || errors.Is(err, errNotConfigured) || errors.Is(err, context.DeadlineExceeded) {
		return xks.Errorf(xks.DependencyTimeoutException, "the HSM cannot be reached: %v", err)
	}
	return xks.Errorf(xks.InternalException, "%v", err)
}

// xksJudge applies the store's and the external key's rules to a request's metadata: the condition that refuses
// it and why, "" when they allow it.
func xksJudge(st *xksStore, xk *xksKey, md *xks.RequestMetadata, op xks.Operation) (string, string) {
	for _, r := range []struct {
		rules xksRules
		whose string
	}{{st.xksRules, "key store " + st.Name}, {xk.xksRules, "the external key"}} {
		if len(r.rules.AllowedPrincipalARNs) > 0 && !matchesAny(r.rules.AllowedPrincipalARNs, md.AWSPrincipalARN) {
			return "xks_principal", fmt.Sprintf("awsPrincipalArn %s is not allowed by %s", md.AWSPrincipalARN, r.whose)
		}
		if len(r.rules.AllowedVPCEndpoints) > 0 && !matchesAny(r.rules.AllowedVPCEndpoints, md.AWSSourceVPCE) {
			src := md.AWSSourceVPCE
			if src == "" {
				src = "(none: not through a VPC endpoint)"
			}
			return "xks_vpc_endpoint", fmt.Sprintf("awsSourceVpce %s is not allowed by %s", src, r.whose)
		}
		if len(r.rules.AllowedKMSKeyARNs) > 0 && !(op == xks.OpMetadata && md.KMSKeyARN == "") &&
			!matchesAny(r.rules.AllowedKMSKeyARNs, md.KMSKeyARN) {
			return "xks_kms_key", fmt.Sprintf("kmsKeyArn %s is not allowed by %s", md.KMSKeyARN, r.whose)
		}
	}
	return "", ""
}

// matchesAny reports whether v matches one of the patterns, where '*' matches any run of characters.
func matchesAny(patterns []string, v string) bool {
	if v == "" {
		return false
	}
	for _, p := range patterns {
		if wildcardMatch(p, v) {
			return true
		}
	}
	return false
}

// wildcardMatch matches v against p, whose '*' match any run of characters: the pieces between them in order, the
// first at the start and the last at the end. No regular expression is compiled on the request path.
func wildcardMatch(p, v string) bool {
	pieces := strings.Split(p, "*")
	if len(pieces) == 1 {
		return p == v
	}
	first, last := pieces[0], pieces[len(pieces)-1]
	if !strings.HasPrefix(v, first) || len(v) < len(first)+len(last) || !strings.HasSuffix(v, last) {
		return false
	}
	rest := v[len(first) : len(v)-len(last)]
	for _, piece := range pieces[1 : len(pieces)-1] {
		i := strings.Index(rest, piece)
		if i < 0 {
			return false
		}
		rest = rest[i+len(piece):]
	}
	return true
}

// xksDenied records a refused request in the key's history, with the ids that join it to CloudTrail, and logs it.
func (b *backend) xksDenied(ctx context.Context, req *logical.Request, name string, md *xks.RequestMetadata, op xks.Operation, id, why string) {
	details := fmt.Sprintf("XKS %s of external key %s refused: %s (kmsRequestId %s, kmsOperation %s, awsPrincipalArn %s",
		op, id, why, md.KMSRequestID, md.KMSOperation, md.AWSPrincipalARN)
	if md.AWSSourceVPCE != "" {
		details += ", awsSourceVpce " + md.AWSSourceVPCE
	}
	if md.KMSKeyARN != "" {
		details += ", kmsKeyArn " + md.KMSKeyARN
	}
	details += ")"
	b.logger.Warn("XKS request refused", "key", name, "external_key_id", id, "operation", op, "reason", why,
		"kms_request_id", md.KMSRequestID, "aws_principal_arn", md.AWSPrincipalARN)
	if err := b.keys.RecordEvent(ctx, req.Storage, name, actorOf(req), "xks_denied", 0, details); err != nil {
		b.logger.Warn("could not record the refused XKS request in the key's history", "key", name, "error", err)
	}
}

// The deep health check: an encryption and a decryption with a key kept on the token for it alone (never a key
// AWS uses, so that the checks do not appear as that key's use), at most every xksHealthTTL.
const xksHealthTTL = 30 * time.Second

const xksHealthKeyPath = "xks/health_key"

// xksHealthTimeout bounds one deep check: the request that runs it may be given up (AWS KMS waits 250 ms), the
// check is not, and its outcome serves the requests after it.
const xksHealthTimeout = 10 * time.Second

// xksHealthMaxAge is the oldest outcome a health answer may give (the specification's one minute).
const xksHealthMaxAge = time.Minute

func (b *backend) xksHealth(ctx context.Context, s logical.Storage) xks.Health {
	x := &b.xks
	x.healthMu.Lock()
	run := !x.healthRunning && (x.healthAt.IsZero() || time.Since(x.healthAt) > xksHealthTTL)
	if run {
		x.healthRunning = true // one check at a time: the requests meanwhile take the last outcome
	}
	checkErr := x.healthOK
	if x.healthAt.IsZero() || time.Since(x.healthAt) > xksHealthMaxAge {
		// No outcome yet, or one older than the specification lets a cached answer be (a check hanging in the HSM).
		checkErr = errors.New("no deep health check has completed within the last minute")
	}
	x.healthMu.Unlock()
	if run {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), xksHealthTimeout)
		checkErr = b.xksDeepCheck(cctx, s)
		cancel()
		if checkErr != nil {
			b.logger.Warn("XKS health check failed: AWS KMS is told the HSM is UNAVAILABLE", "error", checkErr)
		}
		x.healthMu.Lock()
		x.healthOK, x.healthAt, x.healthRunning = checkErr, time.Now(), false
		x.healthMu.Unlock()
	}
	status := "ACTIVE"
	if checkErr != nil {
		status = "UNAVAILABLE"
	}
	detail := xks.FleetDetails{ID: "unknown", Model: "PKCS#11 token", HealthStatus: status}
	vendor := "unknown"
	if tok := b.connectedToken(); tok != nil {
		info := tok.Info()
		detail.ID = strings.TrimSpace(info.Label + " " + info.SerialNumber)
		detail.Model = strings.TrimSpace(fmt.Sprintf("%s %s (firmware %s)", info.ManufacturerID, info.Model, info.FirmwareVersion))
		if m := strings.TrimSpace(info.ManufacturerID); m != "" {
			vendor = m
		}
	}
	return xks.Health{FleetSize: 1, ProxyVendor: "vault-plugin-secrets-cmk", ProxyModel: "cmk-xks-proxy " + Version,
		EKMVendor: vendor, FleetDetails: []xks.FleetDetails{detail}}
}

func (b *backend) xksDeepCheck(ctx context.Context, s logical.Storage) error {
	tok, nonces, err := b.getToken(ctx, s)
	if err != nil {
		return err
	}
	id, err := b.xksHealthKey(ctx, s, tok, nil)
	if err != nil {
		return err
	}
	probe := make([]byte, 32)
	if _, err := rand.Read(probe); err != nil {
		return err
	}
	nonce, err := nonces.Next(ctx)
	if err != nil {
		return err
	}
	used, sealed, err := tok.EncryptGCM(ctx, id, nonce, []byte("xks health"), probe)
	if errors.Is(err, hsm.ErrObjectNotFound) {
		// The token no longer holds the key (storage restored, or another token): a new one, once.
		if id, err = b.xksHealthKey(ctx, s, tok, id); err != nil {
			return err
		}
		used, sealed, err = tok.EncryptGCM(ctx, id, nonce, []byte("xks health"), probe)
	}
	if err != nil {
		return err
	}
	back, err := tok.DecryptGCM(ctx, id, used, []byte("xks health"), sealed)
	if err != nil {
		return err
	}
	if !bytes.Equal(back, probe) {
		return fmt.Errorf("the HSM decrypted its own encryption to other bytes")
	}
	return nil
}

// xksHealthKey is the CKA_ID of the health check's AES-256 key, generated on first use, or again when the token
// lost the one with CKA_ID lost. Its label is the mount's, without a version: reconcile and adoption never take it
// for a key's. A generation whose id storage never recorded is found again by its label, so a crash between the
// two leaves nothing behind.
func (b *backend) xksHealthKey(ctx context.Context, s logical.Storage, tok hsmToken, lost []byte) ([]byte, error) {
	type healthKey struct {
		HSMID string `json:"hsm_id"`
	}
	stored := func() ([]byte, error) {
		hk, err := getJSON[healthKey](ctx, s, xksHealthKeyPath)
		if err != nil || hk == nil {
			return nil, err
		}
		id, err := hex.DecodeString(hk.HSMID)
		if err != nil || bytes.Equal(id, lost) {
			return nil, err
		}
		return id, nil
	}
	if id, err := stored(); err != nil || id != nil {
		return id, err
	}
	b.xks.healthKeyMu.Lock() // one generation at a time; never the configuration's lock, held across an HSM call
	defer b.xks.healthKeyMu.Unlock()
	if id, err := stored(); err != nil || id != nil { // another check made it meanwhile
		return id, err
	}
	label := keys.LabelPrefix(b.mountID) + "xks_health_key"
	var ids [][]byte
	var err error
	if lost == nil {
		if ids, err = tok.LabelledIDs(ctx, label); err != nil {
			return nil, err
		}
	}
	var id []byte
	if len(ids) > 0 {
		id = ids[0]
	} else {
		id = make([]byte, 16) // an identifier, not a secret
		if _, err := rand.Read(id); err != nil {
			return nil, err
		}
		if _, err := tok.GenerateVersion(ctx, hsm.AES256, id, label, 0); err != nil {
			return nil, fmt.Errorf("generate the XKS health check's key: %w", err)
		}
	}
	if err := putJSON(ctx, s, xksHealthKeyPath, healthKey{HSMID: hex.EncodeToString(id)}); err != nil {
		return nil, err
	}
	return id, nil
}
