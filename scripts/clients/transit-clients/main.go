// Command transit-clients drives third-party Transit client libraries, unchanged, against one mount of a Vault
// server: the end-to-end suite runs it once against Vault's own transit/ and once against a cmk mount, with the
// same assertions. Every HTTP exchange goes through a recording proxy in this process, so that a failing step
// prints the requests and responses it made; it exits non-zero naming the client, the mount and the step.
//
//	transit-clients -addr http://127.0.0.1:8200 -token T -mount cmk1 -client vault-client-go -key k1
//	transit-clients -version
package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	wrapping "github.com/hashicorp/go-kms-wrapping/v2"
	"github.com/hashicorp/go-kms-wrapping/wrappers/transit/v2"
	vault "github.com/hashicorp/vault-client-go"
	"github.com/hashicorp/vault-client-go/schema"
	"github.com/hashicorp/vault/api"
	"github.com/sigstore/sigstore/pkg/signature/kms/hashivault"
)

// sourceStamp is set by scripts/build-clients.sh (-X) to a hash of this module's sources, so that the script
// can tell a binary built from other sources.
var sourceStamp = "dev"

// pinned are the client modules whose versions -version reports.
var pinned = []string{
	"github.com/hashicorp/go-kms-wrapping/wrappers/transit/v2",
	"github.com/hashicorp/vault-client-go",
	"github.com/sigstore/sigstore/pkg/signature/kms/hashivault",
}

var clients = map[string]func(*run) error{
	"go-kms-wrapping": runWrapping,
	"vault-client-go": runClientGo,
	"sigstore":        runSigstore,
}

func main() {
	addr := flag.String("addr", "", "Vault address, http://host:port")
	token := flag.String("token", "", "Vault token")
	mount := flag.String("mount", "", "mount path of the Transit-compatible engine, without slashes")
	client := flag.String("client", "", "client to exercise: go-kms-wrapping, vault-client-go or sigstore")
	key := flag.String("key", "", "key name (prefix) to create and use; must not exist on the mount")
	version := flag.Bool("version", false, "print the source stamp and the pinned client versions")
	flag.Parse()

	if *version {
		printVersion()
		return
	}
	f, ok := clients[*client]
	if !ok || *addr == "" || *token == "" || *mount == "" || *key == "" {
		fmt.Fprintln(os.Stderr, "usage: transit-clients -addr URL -token T -mount PATH -key NAME -client go-kms-wrapping|vault-client-go|sigstore")
		os.Exit(2)
	}
	*mount = strings.Trim(*mount, "/")

	rec, proxyURL, err := startRecorder(*addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL %s on %s/: recording proxy: %v\n", *client, *mount, err)
		os.Exit(1)
	}
	r := &run{client: *client, mount: *mount, key: *key, token: *token, addr: proxyURL, rec: rec}
	if err := f(r); err != nil {
		// Steps exit themselves; an error here comes from outside a step.
		r.fail("run", err)
	}
	fmt.Printf("PASS %s on %s/: %d steps\n", r.client, r.mount, r.steps)
}

func printVersion() {
	fmt.Printf("transit-clients %s\n", sourceStamp)
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return
	}
	for _, want := range pinned {
		for _, dep := range info.Deps {
			if dep.Path == want {
				fmt.Printf("%s %s\n", dep.Path, dep.Version)
			}
		}
	}
}

// run is one client's scenario against one mount.
type run struct {
	client, mount, key, token string
	addr                      string // the recording proxy's URL: clients are pointed here
	rec                       *recorder
	steps                     int
}

// step runs f as one named step; on failure it prints the step's HTTP exchanges and exits 1.
func (r *run) step(name string, f func() error) {
	r.rec.reset()
	if err := f(); err != nil {
		r.fail(name, err)
	}
	r.steps++
	fmt.Printf("ok   %s on %s/: %s\n", r.client, r.mount, name)
}

func (r *run) fail(name string, err error) {
	fmt.Fprintf(os.Stderr, "FAIL %s on %s/: step %q: %v\n", r.client, r.mount, name, err)
	for _, x := range r.rec.exchanges() {
		fmt.Fprintf(os.Stderr, "  request:  %s %s %s\n  response: %d %s\n", x.method, x.path, x.reqBody, x.status, x.respBody)
	}
	os.Exit(1)
}

// api returns a vault/api client for setup steps that are not the client under test (creating or rotating a
// key the way an operator would).
func (r *run) api() (*api.Client, error) {
	cfg := api.DefaultConfig()
	cfg.Address = r.addr
	cfg.MaxRetries = 0
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, err
	}
	c.SetToken(r.token)
	return c, nil
}

func (r *run) operatorWrite(path string, data map[string]interface{}) error {
	c, err := r.api()
	if err != nil {
		return err
	}
	_, err = c.Logical().Write(r.mount+"/"+path, data)
	return err
}

// runWrapping drives go-kms-wrapping's transit wrapper (what Vault's transit seal and Boundary use).
func runWrapping(r *run) error {
	ctx := context.Background()
	key := r.key
	r.step("create aes256-gcm96 key "+key+" (operator, vault/api)", func() error {
		return r.operatorWrite("keys/"+key, map[string]interface{}{"type": "aes256-gcm96"})
	})
	w := transit.NewWrapper()
	r.step("Wrapper.SetConfig (encrypts a probe)", func() error {
		_, err := w.SetConfig(ctx, wrapping.WithDisallowEnvVars(true), wrapping.WithConfigMap(map[string]string{
			"address": r.addr, "token": r.token, "mount_path": r.mount + "/", "key_name": key, "disable_renewal": "true",
		}))
		return err
	})
	defer w.Finalize(ctx)
	r.step("Wrapper.KeyId after SetConfig is v1", func() error {
		return wantKeyID(ctx, w, "v1")
	})

	plaintext := []byte("go-kms-wrapping plaintext")
	var blob1, blob2 *wrapping.BlobInfo
	r.step("Wrapper.Encrypt under v1", func() error {
		var err error
		if blob1, err = w.Encrypt(ctx, plaintext); err != nil {
			return err
		}
		if blob1.KeyInfo == nil || blob1.KeyInfo.KeyId != "v1" || !bytes.HasPrefix(blob1.Ciphertext, []byte("vault:v1:")) {
			return fmt.Errorf("blob %q key info %+v, want vault:v1: and key id v1", blob1.Ciphertext, blob1.KeyInfo)
		}
		return nil
	})
	r.step("Wrapper.Decrypt of the v1 blob", func() error {
		return wantDecrypt(ctx, w, blob1, plaintext)
	})
	r.step("rotate key (operator, vault/api)", func() error {
		return r.operatorWrite("keys/"+key+"/rotate", nil)
	})
	r.step("Wrapper.Encrypt after rotation is under v2", func() error {
		var err error
		if blob2, err = w.Encrypt(ctx, plaintext); err != nil {
			return err
		}
		if blob2.KeyInfo == nil || blob2.KeyInfo.KeyId != "v2" || !bytes.HasPrefix(blob2.Ciphertext, []byte("vault:v2:")) {
			return fmt.Errorf("blob %q key info %+v, want vault:v2: and key id v2", blob2.Ciphertext, blob2.KeyInfo)
		}
		return wantKeyID(ctx, w, "v2")
	})
	r.step("Wrapper.Decrypt of the v1 and v2 blobs", func() error {
		if err := wantDecrypt(ctx, w, blob1, plaintext); err != nil {
			return fmt.Errorf("v1 blob: %w", err)
		}
		return wantDecrypt(ctx, w, blob2, plaintext)
	})
	r.step("Wrapper.Decrypt of a tampered blob fails", func() error {
		bad := &wrapping.BlobInfo{Ciphertext: tamper(blob2.Ciphertext), KeyInfo: blob2.KeyInfo}
		if pt, err := w.Decrypt(ctx, bad); err == nil {
			return fmt.Errorf("tampered ciphertext %q decrypted to %q", bad.Ciphertext, pt)
		}
		return nil
	})
	return nil
}

func wantKeyID(ctx context.Context, w *transit.Wrapper, want string) error {
	id, err := w.KeyId(ctx)
	if err != nil {
		return err
	}
	if id != want {
		return fmt.Errorf("KeyId %q, want %q", id, want)
	}
	return nil
}

func wantDecrypt(ctx context.Context, w *transit.Wrapper, blob *wrapping.BlobInfo, want []byte) error {
	pt, err := w.Decrypt(ctx, blob)
	if err != nil {
		return err
	}
	if !bytes.Equal(pt, want) {
		return fmt.Errorf("decrypted %q, want %q", pt, want)
	}
	return nil
}

// tamper flips one bit in the middle of the base64 body of a vault:vN: string, keeping it valid base64.
func tamper(ct []byte) []byte {
	i := bytes.LastIndexByte(ct, ':') + 1
	raw, err := base64.StdEncoding.DecodeString(string(ct[i:]))
	if err != nil || len(raw) == 0 {
		return append([]byte(nil), ct...)
	}
	raw[len(raw)/2] ^= 0x01
	return append(append([]byte(nil), ct[:i]...), base64.StdEncoding.EncodeToString(raw)...)
}

// runClientGo drives vault-client-go's typed Transit methods.
func runClientGo(r *run) error {
	ctx := context.Background()
	c, err := vault.New(vault.WithAddress(r.addr), vault.WithRequestTimeout(60*time.Second))
	if err != nil {
		return err
	}
	if err := c.SetToken(r.token); err != nil {
		return err
	}
	on := vault.WithMountPath(r.mount)
	t := &c.Secrets
	aes, ec := r.key+"-aes", r.key+"-ec"

	r.step("TransitCreateKey "+aes+" aes256-gcm96 and "+ec+" ecdsa-p256", func() error {
		if _, err := t.TransitCreateKey(ctx, aes, schema.TransitCreateKeyRequest{Type: "aes256-gcm96"}, on); err != nil {
			return err
		}
		_, err := t.TransitCreateKey(ctx, ec, schema.TransitCreateKeyRequest{Type: "ecdsa-p256"}, on)
		return err
	})

	plaintext := "vault-client-go plaintext"
	var ct1 string
	r.step("TransitEncrypt", func() error {
		resp, err := t.TransitEncrypt(ctx, aes, schema.TransitEncryptRequest{Plaintext: b64(plaintext)}, on)
		if err != nil {
			return err
		}
		ct1 = str(resp.Data, "ciphertext")
		if !strings.HasPrefix(ct1, "vault:v1:") {
			return fmt.Errorf("ciphertext %q, want vault:v1:…", ct1)
		}
		return nil
	})
	decrypt := func(ct string) error {
		resp, err := t.TransitDecrypt(ctx, aes, schema.TransitDecryptRequest{Ciphertext: ct}, on)
		if err != nil {
			return err
		}
		if got := str(resp.Data, "plaintext"); got != b64(plaintext) {
			return fmt.Errorf("plaintext %q, want %q", got, b64(plaintext))
		}
		return nil
	}
	r.step("TransitDecrypt", func() error { return decrypt(ct1) })
	r.step("TransitRotateKey", func() error {
		_, err := t.TransitRotateKey(ctx, aes, schema.TransitRotateKeyRequest{}, on)
		return err
	})
	r.step("TransitReadKey after rotation", func() error {
		resp, err := t.TransitReadKey(ctx, aes, on)
		if err != nil {
			return err
		}
		d := resp.Data
		if num(d, "latest_version") != "2" || str(d, "type") != "aes256-gcm96" || d["supports_encryption"] != true {
			return fmt.Errorf("key %v: want latest_version 2, type aes256-gcm96, supports_encryption", d)
		}
		keys, _ := d["keys"].(map[string]interface{})
		if _, ok := keys["1"]; !ok || len(keys) != 2 {
			return fmt.Errorf("keys %v, want versions 1 and 2", d["keys"])
		}
		return nil
	})
	r.step("TransitRewrap moves the v1 ciphertext to v2", func() error {
		resp, err := t.TransitRewrap(ctx, aes, schema.TransitRewrapRequest{Ciphertext: ct1}, on)
		if err != nil {
			return err
		}
		ct2 := str(resp.Data, "ciphertext")
		if !strings.HasPrefix(ct2, "vault:v2:") {
			return fmt.Errorf("rewrapped %q, want vault:v2:…", ct2)
		}
		return decrypt(ct2)
	})
	r.step("TransitDecrypt of a tampered ciphertext is a 400", func() error {
		_, err := t.TransitDecrypt(ctx, aes, schema.TransitDecryptRequest{Ciphertext: string(tamper([]byte(ct1)))}, on)
		return wantStatus(err, http.StatusBadRequest)
	})

	message := []byte("vault-client-go signed message")
	var sig string
	r.step("TransitSign (ecdsa-p256)", func() error {
		resp, err := t.TransitSign(ctx, ec, schema.TransitSignRequest{Input: b64(string(message))}, on)
		if err != nil {
			return err
		}
		if sig = str(resp.Data, "signature"); !strings.HasPrefix(sig, "vault:v1:") {
			return fmt.Errorf("signature %q, want vault:v1:…", sig)
		}
		return nil
	})
	r.step("TransitVerify: the signature, then another input", func() error {
		resp, err := t.TransitVerify(ctx, ec, schema.TransitVerifyRequest{Input: b64(string(message)), Signature: sig}, on)
		if err != nil {
			return err
		}
		if resp.Data["valid"] != true {
			return fmt.Errorf("valid = %v for the signature just made", resp.Data["valid"])
		}
		resp, err = t.TransitVerify(ctx, ec, schema.TransitVerifyRequest{Input: b64("another message"), Signature: sig}, on)
		if err != nil {
			return err
		}
		if resp.Data["valid"] != false {
			return fmt.Errorf("valid = %v for another input", resp.Data["valid"])
		}
		return nil
	})
	var pub *ecdsa.PublicKey
	r.step("TransitExportKey public-key; the signature checks with it locally", func() error {
		resp, err := t.TransitExportKey(ctx, ec, "public-key", on)
		if err != nil {
			return err
		}
		keys, _ := resp.Data["keys"].(map[string]interface{})
		pemKey, _ := keys["1"].(string)
		if pub, err = parseECPublicKey(pemKey); err != nil {
			return fmt.Errorf("export %v: %w", resp.Data, err)
		}
		raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(sig, "vault:v1:"))
		if err != nil {
			return err
		}
		digest := sha256.Sum256(message)
		if !ecdsa.VerifyASN1(pub, digest[:], raw) {
			return errors.New("the Transit signature does not verify with the exported public key")
		}
		return nil
	})
	r.step("TransitGenerateCsrForKey: a CSR signed by the key", func() error {
		resp, err := t.TransitGenerateCsrForKey(ctx, ec, schema.TransitGenerateCsrForKeyRequest{}, on)
		if err != nil {
			return err
		}
		block, _ := pem.Decode([]byte(str(resp.Data, "csr")))
		if block == nil || block.Type != "CERTIFICATE REQUEST" {
			return fmt.Errorf("csr %v is not a PEM CERTIFICATE REQUEST", resp.Data["csr"])
		}
		csr, err := x509.ParseCertificateRequest(block.Bytes)
		if err != nil {
			return err
		}
		if err := csr.CheckSignature(); err != nil {
			return fmt.Errorf("csr signature: %w", err)
		}
		if !pub.Equal(csr.PublicKey) {
			return errors.New("csr public key differs from the exported public key")
		}
		return nil
	})

	var size string
	r.step("TransitReadCacheConfiguration", func() error {
		resp, err := t.TransitReadCacheConfiguration(ctx, on)
		if err != nil {
			return err
		}
		if size = num(resp.Data, "size"); size == "" {
			return fmt.Errorf("cache-config %v has no size", resp.Data)
		}
		return nil
	})
	r.step("TransitConfigureCache size=25, read back", func() error {
		if _, err := t.TransitConfigureCache(ctx, schema.TransitConfigureCacheRequest{Size: 25}, on); err != nil {
			return err
		}
		resp, err := t.TransitReadCacheConfiguration(ctx, on)
		if err != nil {
			return err
		}
		if got := num(resp.Data, "size"); got != "25" {
			return fmt.Errorf("size %q after setting 25", got)
		}
		return nil
	})
	r.step("TransitConfigureCache back to size="+size, func() error {
		var n int32
		if _, err := fmt.Sscan(size, &n); err != nil {
			return err
		}
		// size 0 is omitted by the typed request (omitempty): the engine's default applies, which is 0.
		if _, err := t.TransitConfigureCache(ctx, schema.TransitConfigureCacheRequest{Size: n}, on); err != nil {
			return err
		}
		resp, err := t.TransitReadCacheConfiguration(ctx, on)
		if err != nil {
			return err
		}
		if got := num(resp.Data, "size"); got != size {
			return fmt.Errorf("size %q after setting %s", got, size)
		}
		return nil
	})
	return nil
}

func wantStatus(err error, status int) error {
	if err == nil {
		return fmt.Errorf("succeeded, want HTTP %d", status)
	}
	var re *vault.ResponseError
	if !errors.As(err, &re) || re.StatusCode != status {
		return fmt.Errorf("error %v, want HTTP %d", err, status)
	}
	return nil
}

// runSigstore drives sigstore's hashivault KMS signer (what cosign uses for hashivault:// keys).
func runSigstore(r *run) error {
	for k, v := range map[string]string{"VAULT_ADDR": r.addr, "VAULT_TOKEN": r.token, "TRANSIT_SECRET_ENGINE_PATH": r.mount} {
		if err := os.Setenv(k, v); err != nil {
			return err
		}
	}
	ctx := context.Background()
	var sv *hashivault.SignerVerifier
	r.step("LoadSignerVerifier hashivault://"+r.key+" (TRANSIT_SECRET_ENGINE_PATH="+r.mount+")", func() error {
		var err error
		sv, err = hashivault.LoadSignerVerifier("hashivault://"+r.key, crypto.SHA256)
		return err
	})
	var created *ecdsa.PublicKey
	r.step("CreateKey ecdsa-p256", func() error {
		pk, err := sv.CreateKey(ctx, hashivault.AlgorithmECDSAP256)
		if err != nil {
			return err
		}
		var ok bool
		if created, ok = pk.(*ecdsa.PublicKey); !ok || created.Curve != elliptic.P256() {
			return fmt.Errorf("public key %T, want a P-256 *ecdsa.PublicKey", pk)
		}
		return nil
	})
	message := []byte("sigstore signed message")
	var sig []byte
	r.step("SignMessage", func() error {
		var err error
		sig, err = sv.SignMessage(bytes.NewReader(message))
		return err
	})
	r.step("VerifySignature (remote) of the signature", func() error {
		return sv.VerifySignature(bytes.NewReader(sig), bytes.NewReader(message))
	})
	r.step("VerifySignature (remote) of another message fails", func() error {
		if err := sv.VerifySignature(bytes.NewReader(sig), strings.NewReader("another message")); err == nil {
			return errors.New("verified a signature over another message")
		}
		return nil
	})
	r.step("PublicKey matches CreateKey's, and the signature checks with it locally", func() error {
		pk, err := sv.PublicKey()
		if err != nil {
			return err
		}
		if !created.Equal(pk) {
			return errors.New("PublicKey differs from the key CreateKey returned")
		}
		digest := sha256.Sum256(message)
		if !ecdsa.VerifyASN1(created, digest[:], sig) {
			return errors.New("the signature does not verify locally with the public key")
		}
		return nil
	})
	return nil
}

func parseECPublicKey(s string) (*ecdsa.PublicKey, error) {
	block, _ := pem.Decode([]byte(s))
	if block == nil {
		return nil, errors.New("no PEM public key")
	}
	pk, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	ec, ok := pk.(*ecdsa.PublicKey)
	if !ok || ec.Curve != elliptic.P256() {
		return nil, fmt.Errorf("public key %T, want P-256 ECDSA", pk)
	}
	return ec, nil
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func str(d map[string]interface{}, k string) string {
	s, _ := d[k].(string)
	return s
}

// num renders a JSON number field (float64 or json.Number, as the client decodes it) as decimal text.
func num(d map[string]interface{}, k string) string {
	switch v := d[k].(type) {
	case json.Number:
		return v.String()
	case float64:
		return fmt.Sprintf("%.0f", v)
	case int, int32, int64:
		return fmt.Sprint(v)
	}
	return ""
}

// recorder is a reverse proxy on 127.0.0.1 in front of Vault that keeps each exchange of the current step
// (never headers, so never the token), for the failure report.
type recorder struct {
	mu  sync.Mutex
	log []exchange
}

type exchange struct {
	method, path, reqBody string
	status                int
	respBody              string
}

func startRecorder(target string) (*recorder, string, error) {
	u, err := url.Parse(target)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return nil, "", fmt.Errorf("vault address %q is not a URL", target)
	}
	rec := &recorder{}
	proxy := httputil.NewSingleHostReverseProxy(u)
	proxy.Transport = rec
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, "", err
	}
	// The proxy is the handler itself (no ServeMux): paths reach Vault exactly as the client wrote them.
	go func() { _ = http.Serve(l, proxy) }()
	return rec, "http://" + l.Addr().String(), nil
}

func (rec *recorder) RoundTrip(req *http.Request) (*http.Response, error) {
	var reqBody []byte
	if req.Body != nil {
		reqBody, _ = io.ReadAll(req.Body)
		req.Body.Close()
		req.Body = io.NopCloser(bytes.NewReader(reqBody))
	}
	x := exchange{method: req.Method, path: req.URL.RequestURI(), reqBody: strings.TrimSpace(string(reqBody))}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		x.respBody = "transport error: " + err.Error()
		rec.add(x)
		return nil, err
	}
	respBody, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(respBody))
	x.status, x.respBody = resp.StatusCode, strings.TrimSpace(string(respBody))
	rec.add(x)
	return resp, nil
}

func (rec *recorder) add(x exchange) {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.log = append(rec.log, x)
}

func (rec *recorder) reset() {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.log = nil
}

func (rec *recorder) exchanges() []exchange {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([]exchange(nil), rec.log...)
}
