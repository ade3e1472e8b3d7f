// Command cmk-xks-proxy is the front end of the cmk secrets engine's AWS KMS External Key Store: it terminates TLS
// (mutual TLS if asked, as AWS KMS offers), and forwards each XKS request byte for byte — method, path, host,
// headers and body — to the engine's xks/request path with its own Vault token, then relays the engine's answer.
// Vault parses a request's JSON body before a plugin sees it, and SigV4 signs the raw body: so the bytes travel
// to the engine, which verifies the signature. The front end holds no AWS credential and no key, and its token
// needs update on <mount>/xks/request only. It reads the token from a file that Vault Agent's auto-auth keeps
// fresh, again whenever the file changes.
//
//	cmk-xks-proxy -listen 127.0.0.1:8443 -tls-cert cert.pem -tls-key key.pem \
//	    -vault-addr https://vault:8200 -token-file /run/vault-agent/token [-mount cmk] \
//	    [-client-ca aws-ca.pem -client-cn cks.kms.us-east-1.amazonaws.com]
//
// GET /healthz (no authentication, for load balancers; on -health-listen in plain HTTP when mutual TLS is on) answers
// 200 while the proxy's token is good and the engine's HSM serves, 503 when not.
//
// CMK_PPROF_ADDR=127.0.0.1:<port> serves Go's profiler there, for benchmarks (tests/bench); nothing else listens on it,
// and an address off loopback is ignored.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	_ "net/http/pprof" // served only when CMK_PPROF_ADDR is set
	"os"
	"os/signal"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/xks"
)

// xksShaped is the form of an XKS path; the engine judges the rest (the store's prefix, the key id).
var xksShaped = regexp.MustCompile(`^(/[A-Za-z0-9_-]+)*/kms/xks/v1/(health|keys/[A-Za-z0-9._-]+/(metadata|encrypt|decrypt))$`)

// maxBody bounds a request: the specification's largest (4,300 bytes of plaintext, 8,192 of AAD, Base64, and ARNs
// of 2,048 characters) is about 25 KB; the engine's own limits are higher.
const maxBody = 256 << 10

type config struct {
	listen, healthListen, certFile, keyFile, clientCA, vaultAddr, vaultCACert, tokenFile, mount string
	clientCNs                                                                                   []string
	timeout                                                                                     time.Duration
}

func main() {
	var c config
	var cns string
	flag.StringVar(&c.listen, "listen", "127.0.0.1:8443", "address to serve HTTPS on")
	flag.StringVar(&c.healthListen, "health-listen", "", "address to serve GET /healthz on in plain HTTP, for a load balancer that cannot present AWS's client certificate (with mutual TLS); empty: /healthz on -listen")
	flag.StringVar(&c.certFile, "tls-cert", "", "TLS certificate (PEM, with its chain) for the name AWS KMS calls (required)")
	flag.StringVar(&c.keyFile, "tls-key", "", "its private key (PEM, required)")
	flag.StringVar(&c.clientCA, "client-ca", "", "mutual TLS: CA certificates (PEM) a client certificate must chain to")
	flag.StringVar(&cns, "client-cn", "", "mutual TLS: comma-separated subject common names accepted (AWS KMS presents cks.kms.<region>.amazonaws.com)")
	flag.StringVar(&c.vaultAddr, "vault-addr", os.Getenv("VAULT_ADDR"), "Vault's address")
	flag.StringVar(&c.vaultCACert, "vault-cacert", os.Getenv("VAULT_CACERT"), "CA certificate to verify Vault's TLS with")
	flag.StringVar(&c.tokenFile, "token-file", "", "file holding the Vault token (Vault Agent's auto-auth sink; required)")
	flag.StringVar(&c.mount, "mount", "cmk", "the cmk engine's mount path")
	flag.DurationVar(&c.timeout, "timeout", 2*time.Second, "how long to wait for Vault (AWS KMS gives up after 250 ms)")
	flag.Parse()
	if cns != "" {
		c.clientCNs = strings.Split(cns, ",")
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "cmk-xks-proxy", Output: os.Stderr, JSONFormat: true})
	// Profiling for benchmarks, as the plugin's: only when CMK_PPROF_ADDR is set, only on loopback.
	if addr := os.Getenv("CMK_PPROF_ADDR"); strings.HasPrefix(addr, "127.0.0.1:") {
		go func() { log.Warn("pprof listener ended", "error", http.ListenAndServe(addr, nil)) }()
	}
	if err := run(c, log); err != nil {
		log.Error("exiting", "error", err)
		os.Exit(1)
	}
}

func run(c config, log hclog.Logger) error {
	if c.certFile == "" || c.keyFile == "" || c.tokenFile == "" || c.vaultAddr == "" {
		return errors.New("-tls-cert, -tls-key, -token-file and -vault-addr (or VAULT_ADDR) are required")
	}
	if (c.clientCA == "") != (len(c.clientCNs) == 0) {
		return errors.New("mutual TLS needs both -client-ca and -client-cn")
	}
	p, err := newProxy(c, log)
	if err != nil {
		return err
	}
	tlsCfg, err := serverTLS(c)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", c.listen)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: p, TLSConfig: tlsCfg, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		ErrorLog: log.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true})}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-stop
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}()
	if c.healthListen != "" {
		hl, err := net.Listen("tcp", c.healthListen)
		if err != nil {
			return err
		}
		hsrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/healthz" || r.Method != http.MethodGet {
				http.NotFound(w, r)
				return
			}
			p.serveHealthz(w, r)
		}), ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = hsrv.Serve(hl) }()
		defer hsrv.Close()
		log.Info("serving /healthz", "address", hl.Addr().String())
	}
	log.Info("serving", "address", ln.Addr().String(), "mutual_tls", c.clientCA != "", "vault", c.vaultAddr, "mount", c.mount)
	if err := srv.ServeTLS(ln, "", ""); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// serverTLS is TLS 1.2 or later: for 1.2 the specification's AES-256-GCM suites first, then the AES-128-GCM ones
// HTTP/2 requires (1.3's suites are Go's, the specification's among them); with a client CA, a client certificate
// chained to it whose subject CN is one of those given.
func serverTLS(c config) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return nil, fmt.Errorf("load the TLS certificate: %w", err)
	}
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256},
		NextProtos: []string{"h2", "http/1.1"},
	}
	if c.clientCA == "" {
		return cfg, nil
	}
	pem, err := os.ReadFile(c.clientCA)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", c.clientCA)
	}
	cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	cfg.VerifyPeerCertificate = func(_ [][]byte, chains [][]*x509.Certificate) error {
		if len(chains) == 0 || len(chains[0]) == 0 || !slices.Contains(c.clientCNs, chains[0][0].Subject.CommonName) {
			return errors.New("the client certificate's subject common name is not one this proxy accepts")
		}
		return nil
	}
	return cfg, nil
}

type proxy struct {
	cfg    config
	log    hclog.Logger
	client *api.Client

	tokenMu  sync.Mutex
	tokenMod time.Time
	tokenLen int64
}

func newProxy(c config, log hclog.Logger) (*proxy, error) {
	vc := api.DefaultConfig()
	if vc.Error != nil {
		return nil, vc.Error
	}
	vc.Address = c.vaultAddr
	vc.AgentAddress = "" // -vault-addr, never VAULT_AGENT_ADDR's
	vc.MaxRetries = 0    // AWS KMS retries; a retry here would outlast its 250 ms
	vc.Timeout = c.timeout
	if err := vc.ConfigureTLS(&api.TLSConfig{CACert: c.vaultCACert}); err != nil {
		return nil, err
	}
	// Always verified: VAULT_SKIP_VERIFY, which DefaultConfig honours (and ConfigureTLS can only turn on), would send
	// the token and AWS's data keys to whoever answers.
	transport, ok := vc.HttpClient.Transport.(*http.Transport)
	if !ok || transport.TLSClientConfig == nil {
		return nil, errors.New("the Vault client's transport is not the one this proxy configures")
	}
	transport.TLSClientConfig.InsecureSkipVerify = false
	// AWS KMS keeps many requests in flight: keep as many connections to Vault open over HTTP/1.1 (Vault's default
	// pool keeps GOMAXPROCS+1 idle, and opens and closes the rest per request).
	transport.MaxIdleConns, transport.MaxIdleConnsPerHost = 256, 256
	client, err := api.NewClient(vc)
	if err != nil {
		return nil, err
	}
	client.ClearToken() // the token is the file's alone, never VAULT_TOKEN's
	p := &proxy{cfg: c, log: log, client: client}
	if err := p.loadToken(true); err != nil {
		return nil, err
	}
	return p, nil
}

// loadToken reads the token file again if it changed (or if forced).
func (p *proxy) loadToken(force bool) error {
	fi, err := os.Stat(p.cfg.tokenFile)
	if err != nil {
		return fmt.Errorf("the token file: %w", err)
	}
	p.tokenMu.Lock()
	defer p.tokenMu.Unlock()
	if !force && fi.ModTime().Equal(p.tokenMod) && fi.Size() == p.tokenLen {
		return nil
	}
	b, err := os.ReadFile(p.cfg.tokenFile)
	if err != nil {
		return fmt.Errorf("the token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return errors.New("the token file is empty (has Vault Agent authenticated yet?)")
	}
	p.client.SetToken(tok)
	p.tokenMod, p.tokenLen = fi.ModTime(), fi.Size()
	return nil
}

func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/healthz" && r.Method == http.MethodGet {
		p.serveHealthz(w, r)
		return
	}
	started := time.Now()
	// What is refused without asking Vault: every other request costs a Vault request under the proxy's token.
	switch {
	case r.Method != http.MethodPost:
		p.answer(w, r, started, http.StatusMethodNotAllowed, xksError("ValidationException", "XKS requests are POSTs"), nil)
		return
	case !xksShaped.MatchString(r.URL.EscapedPath()):
		p.answer(w, r, started, http.StatusNotFound, xksError("InvalidUriPathException", "no XKS operation at this path"), nil)
		return
	case !strings.HasPrefix(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256 "):
		p.answer(w, r, started, http.StatusUnauthorized, xksError("AuthenticationFailedException", "the request is not signed with SigV4"), nil)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		p.answer(w, r, started, http.StatusRequestEntityTooLarge, xksError("ValidationException", "the body is over %d bytes", maxBody), nil)
		return
	}
	data := map[string]interface{}{"method": r.Method, "path": r.URL.EscapedPath(), "host": r.Host,
		"headers": signedHeaders(r.Header), "body": base64.StdEncoding.EncodeToString(body)}
	if r.URL.RawQuery != "" {
		data["query"] = r.URL.RawQuery
	}
	if err := p.loadToken(false); err != nil {
		p.log.Error("no Vault token", "error", err)
		p.answer(w, r, started, http.StatusInternalServerError, xksError("InternalException", "the proxy has no Vault token"), nil)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), p.cfg.timeout)
	defer cancel()
	path := strings.Trim(p.cfg.mount, "/") + "/xks/request"
	secret, err := p.client.Logical().WriteWithContext(ctx, path, data)
	var re *api.ResponseError
	if errors.As(err, &re) && re.StatusCode == http.StatusForbidden {
		// The token may have been renewed into a new one a moment ago: read the file again, once.
		if p.loadToken(true) == nil {
			secret, err = p.client.Logical().WriteWithContext(ctx, path, data)
		}
	}
	if err != nil {
		status, e := vaultFailure(err)
		p.log.Warn("Vault did not answer the request", "error", err)
		p.answer(w, r, started, status, e, nil)
		return
	}
	if secret == nil || secret.Data == nil {
		p.answer(w, r, started, http.StatusInternalServerError, xksError("InternalException", "the engine gave no answer"), nil)
		return
	}
	status, _ := secret.Data["status"].(json.Number)
	answer, _ := secret.Data["body"].(string)
	code, err := status.Int64()
	if err != nil || code < 100 || code > 599 {
		p.answer(w, r, started, http.StatusInternalServerError, xksError("InternalException", "the engine gave no status"), nil)
		return
	}
	p.answer(w, r, started, int(code), []byte(answer), secret.Data)
}

// signedHeaders is what the engine needs of the headers to verify the signature: Authorization, X-Amz-Date and
// those the signature covers (host travels apart). The rest stay here, sparing three hops a few hundred bytes.
func signedHeaders(h http.Header) map[string]interface{} {
	out := map[string]interface{}{}
	keep := func(name string) {
		if vs, ok := h[http.CanonicalHeaderKey(name)]; ok {
			out[http.CanonicalHeaderKey(name)] = vs
		}
	}
	keep("Authorization")
	keep("X-Amz-Date")
	if a, err := xks.ParseAuthorization(h.Get("Authorization")); err == nil {
		for _, name := range a.SignedHeaders {
			keep(name)
		}
	}
	return out
}

// vaultFailure maps Vault's refusal to what AWS KMS understands: throttled, a dependency not answering (Vault
// sealed, a standby, a timeout), or internal (the front end's token refused, which is its operator's to mend).
func vaultFailure(err error) (int, []byte) {
	var re *api.ResponseError
	switch {
	case errors.As(err, &re) && re.StatusCode == http.StatusTooManyRequests:
		return http.StatusTooManyRequests, xksError("ThrottlingException", "Vault is rate limiting the proxy")
	case errors.As(err, &re) && re.StatusCode == http.StatusForbidden:
		return http.StatusInternalServerError, xksError("InternalException", "Vault refused the proxy's token")
	case errors.As(err, &re) && re.StatusCode != http.StatusServiceUnavailable && re.StatusCode != http.StatusBadGateway && re.StatusCode != http.StatusGatewayTimeout:
		return http.StatusInternalServerError, xksError("InternalException", "Vault refused the forwarded request (%d)", re.StatusCode)
	}
	// Sealed, a standby without an active node, a timeout, no connection: AWS KMS may retry.
	return http.StatusServiceUnavailable, xksError("DependencyTimeoutException", "Vault did not answer in time")
}

func xksError(name, format string, args ...interface{}) []byte {
	return []byte(fmt.Sprintf(`{"errorName":%q,"errorMessage":%q}`, name, fmt.Sprintf(format, args...)))
}

// answer writes the response and the access log line: never a body, only the ids that join it to CloudTrail and
// to Vault's audit log.
func (p *proxy) answer(w http.ResponseWriter, r *http.Request, started time.Time, status int, body []byte, info map[string]interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
	fields := []interface{}{"remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path, "status", status,
		"duration_ms", float64(time.Since(started).Microseconds()) / 1000}
	for _, k := range []string{"operation", "error_name", "kms_request_id", "kms_operation", "external_key_id", "key_version"} {
		if v, ok := info[k]; ok && fmt.Sprint(v) != "" {
			fields = append(fields, k, fmt.Sprint(v))
		}
	}
	p.log.Info("request", fields...)
}

// serveHealthz answers a load balancer: 200 while the proxy's token is good and the engine's HSM token serves (its
// unauthenticated health path), 503 otherwise.
func (p *proxy) serveHealthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), p.cfg.timeout)
	defer cancel()
	if err := p.loadToken(false); err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	if _, err := p.client.Auth().Token().LookupSelfWithContext(ctx); err != nil {
		p.log.Warn("the proxy's Vault token does not look itself up", "error", err)
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	resp, err := p.client.Logical().ReadRawWithContext(ctx, strings.Trim(p.cfg.mount, "/")+"/health")
	status := http.StatusServiceUnavailable
	if err == nil {
		status = resp.StatusCode
		resp.Body.Close()
	} else if resp != nil {
		status = resp.StatusCode
		resp.Body.Close()
	}
	if status != http.StatusOK {
		status = http.StatusServiceUnavailable
	}
	w.WriteHeader(status)
}
