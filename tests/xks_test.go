package tests

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
)

// AWS KMS's External Key Store end to end: the front end (cmd/cmk-xks-proxy) serves TLS with a certificate from a
// test CA and asks for AWS's client certificate (mutual TLS); its Vault token comes from Vault Agent's auto-auth
// (AppRole, a file sink) under examples/policies/cmk-xks-proxy.hcl; requests are signed by curl's own SigV4
// (--aws-sigv4 "aws:amz:REGION:kms-xks-proxy"), as AWS's test client signs them, never by code of ours.

const xksHost = "xks.cmk-test.internal"

type xksE2E struct {
	t               *testing.T
	dir, addr       string
	akid, secret    string
	uriPath         string
	clientCert, key string
	ca              string
	requests        int
}

// curl sends body to path (under the store's URI path) signed with the given credential; it returns the HTTP
// status and the JSON body.
func (x *xksE2E) curl(method, path, body, akid, secret string, extra ...string) (int, map[string]interface{}) {
	x.t.Helper()
	x.requests++
	bodyFile := filepath.Join(x.dir, fmt.Sprintf("body-%d.json", x.requests))
	if err := os.WriteFile(bodyFile, []byte(body), 0o600); err != nil {
		x.t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(x.addr)
	args := []string{"-sS", "--cacert", x.ca, "--resolve", xksHost + ":" + port + ":127.0.0.1",
		"--aws-sigv4", "aws:amz:us-east-1:kms-xks-proxy", "--user", akid + ":" + secret,
		"-X", method, "-H", "Content-Type:application/json", "-w", "\n%{http_code}"}
	if method == "POST" {
		args = append(args, "--data-binary", "@"+bodyFile)
	}
	if x.clientCert != "" {
		args = append(args, "--cert", x.clientCert, "--key", x.key)
	}
	args = append(args, extra...)
	args = append(args, "https://"+xksHost+":"+port+x.uriPath+path)
	out, err := exec.Command("curl", args...).CombinedOutput()
	if err != nil {
		x.t.Fatalf("curl %s: %v\n%s", path, err, out)
	}
	text := strings.TrimSpace(string(out))
	i := strings.LastIndex(text, "\n")
	status, err := strconv.Atoi(text[i+1:])
	if err != nil {
		x.t.Fatalf("curl output %q", text)
	}
	var answer map[string]interface{}
	if i > 0 && strings.TrimSpace(text[:i]) != "" {
		if err := json.Unmarshal([]byte(text[:i]), &answer); err != nil {
			x.t.Fatalf("answer %q: %v", text[:i], err)
		}
	}
	return status, answer
}

func (x *xksE2E) call(op, keyID string, fields map[string]interface{}) (int, map[string]interface{}) {
	x.t.Helper()
	body := map[string]interface{}{"requestMetadata": map[string]interface{}{
		"awsPrincipalArn": "arn:aws:iam::111122223333:role/S3", "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/e2e",
		"kmsOperation": "GenerateDataKey", "kmsRequestId": fmt.Sprintf("e2e-%d", x.requests+1), "kmsViaService": "s3"}}
	if op != "metadata" {
		body["encryptionAlgorithm"] = "AES_GCM"
	}
	for k, v := range fields {
		body[k] = v
	}
	raw, _ := json.Marshal(body)
	return x.curl("POST", "/keys/"+keyID+"/"+op, string(raw), x.akid, x.secret)
}

// openssl runs openssl in the test's directory.
func openssl(t *testing.T, dir string, args ...string) {
	t.Helper()
	cmd := exec.Command("openssl", args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("openssl %v: %v\n%s", args, err, out)
	}
}

// testCA makes a CA, a server certificate for xksHost and a client certificate with subject CN cn.
func testCA(t *testing.T, dir, cn string) {
	openssl(t, dir, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
		"-subj", "/CN=cmk XKS test CA", "-keyout", "ca.key", "-out", "ca.pem")
	for _, c := range []struct{ name, subj, ext string }{
		{"server", "/CN=" + xksHost, "subjectAltName=DNS:" + xksHost},
		{"client", "/CN=" + cn, "extendedKeyUsage=clientAuth"},
		{"stranger", "/CN=cks.kms.eu-west-1.amazonaws.com", "extendedKeyUsage=clientAuth"},
	} {
		openssl(t, dir, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", c.subj,
			"-keyout", c.name+".key", "-out", c.name+".csr")
		if err := os.WriteFile(filepath.Join(dir, c.name+".ext"), []byte(c.ext+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		openssl(t, dir, "x509", "-req", "-in", c.name+".csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
			"-days", "1", "-extfile", c.name+".ext", "-out", c.name+".pem")
	}
}

// bogusClientCerts writes two client certificates with subject CN cn that mutual TLS must refuse: one issued by
// the test CA but expired, and one self-signed.
func bogusClientCerts(t *testing.T, dir, cn string) (expired, selfSigned struct{ cert, key string }) {
	t.Helper()
	caPair, err := tls.LoadX509KeyPair(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(caPair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	make1 := func(name string, notAfter time.Time, parent *x509.Certificate, parentKey interface{}) struct{ cert, key string } {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
			NotBefore: notAfter.Add(-48 * time.Hour), NotAfter: notAfter, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
			KeyUsage: x509.KeyUsageDigitalSignature}
		if parent == nil {
			parent, parentKey = tmpl, key
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		out := struct{ cert, key string }{filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")}
		for file, block := range map[string]*pem.Block{out.cert: {Type: "CERTIFICATE", Bytes: der}, out.key: {Type: "EC PRIVATE KEY", Bytes: keyDER}} {
			if err := os.WriteFile(file, pem.EncodeToMemory(block), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		return out
	}
	return make1("expired", time.Now().Add(-24*time.Hour), caCert, caPair.PrivateKey),
		make1("selfsigned", time.Now().Add(24*time.Hour), nil, nil)
}

// startAgent runs Vault Agent with AppRole auto-auth for a role holding policy, and returns the sink file once
// it holds a token. The agent is stopped by its pid when the test ends.
func startAgent(t *testing.T, root *api.Client, dir, policy string) string {
	t.Helper()
	auth := "approle-" + filepath.Base(dir)
	if err := root.Sys().EnableAuthWithOptions(auth, &api.EnableAuthOptions{Type: "approle"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = root.Sys().DisableAuth(auth) })
	mustWrite(t, root, "auth/"+auth+"/role/xks-proxy", map[string]interface{}{"token_policies": policy, "token_ttl": "20m"})
	roleID, err := root.Logical().Read("auth/" + auth + "/role/xks-proxy/role-id")
	if err != nil {
		t.Fatal(err)
	}
	secretID := mustWrite(t, root, "auth/"+auth+"/role/xks-proxy/secret-id", nil)
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	roleFile := write("role-id", roleID.Data["role_id"].(string))
	secretFile := write("secret-id", secretID.Data["secret_id"].(string))
	sink := filepath.Join(dir, "token")
	cfg := write("agent.hcl", fmt.Sprintf(`
vault { address = %q }
auto_auth {
  method "approle" {
    mount_path = "auth/%s"
    config = {
      role_id_file_path = %q
      secret_id_file_path = %q
      remove_secret_id_file_after_reading = false
    }
  }
  sink "file" { config = { path = %q } }
}
`, root.Address(), auth, roleFile, secretFile, sink))
	logFile, err := os.Create(filepath.Join(dir, "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(vaultBin, "agent", "-config="+cfg)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); logFile.Close() })
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if b, err := os.ReadFile(sink); err == nil && len(strings.TrimSpace(string(b))) > 0 {
			return sink
		}
	}
	t.Fatalf("Vault Agent wrote no token:\n%s", vaulttest.Tail(filepath.Join(dir, "agent.log"), 20))
	return ""
}

// startProxy builds and runs cmk-xks-proxy; it is stopped by its pid when the test ends.
func startProxy(t *testing.T, dir string, args ...string) string {
	t.Helper()
	bin := filepath.Join(dir, "cmk-xks-proxy")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/cmk-xks-proxy").CombinedOutput(); err != nil {
		t.Fatalf("build cmk-xks-proxy: %v\n%s", err, out)
	}
	addr, err := vaulttest.FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	logFile, err := os.Create(filepath.Join(dir, "proxy.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, append([]string{"-listen", addr}, args...)...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); logFile.Close() })
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return addr
		}
	}
	t.Fatalf("cmk-xks-proxy did not listen:\n%s", vaulttest.Tail(filepath.Join(dir, "proxy.log"), 20))
	return ""
}

func TestXKSThroughTheFrontEndWithCurl(t *testing.T) {
	m := newMount(t, dev)
	root := dev.Client
	dir := t.TempDir()
	mustWrite(t, root, m.Path+"/keys/s3-bucket-key", nil)
	st := mustWrite(t, root, m.Path+"/xks/stores/acct1", map[string]interface{}{"path_prefix": "/keystores/acct1"})
	cred := mustWrite(t, root, m.Path+"/xks/stores/acct1/credentials", nil)
	mustWrite(t, root, m.Path+"/xks/stores/acct1/keys/bucket-key-1", map[string]interface{}{"key": "s3-bucket-key"})

	policy, err := os.ReadFile("../examples/policies/cmk-xks-proxy.hcl")
	if err != nil {
		t.Fatal(err)
	}
	if err := root.Sys().PutPolicy(m.Path+"-xks-proxy", strings.ReplaceAll(string(policy), `"cmk/`, `"`+m.Path+`/`)); err != nil {
		t.Fatal(err)
	}
	sink := startAgent(t, root, dir, m.Path+"-xks-proxy")
	const awsCN = "cks.kms.us-east-1.amazonaws.com"
	testCA(t, dir, awsCN)
	healthAddr, err := vaulttest.FreeAddr()
	if err != nil {
		t.Fatal(err)
	}
	addr := startProxy(t, dir, "-tls-cert", filepath.Join(dir, "server.pem"), "-tls-key", filepath.Join(dir, "server.key"),
		"-client-ca", filepath.Join(dir, "ca.pem"), "-client-cn", awsCN, "-health-listen", healthAddr,
		"-vault-addr", root.Address(), "-token-file", sink, "-mount", m.Path)
	x := &xksE2E{t: t, dir: dir, addr: addr, akid: cred.Data["access_key_id"].(string), secret: cred.Data["secret_access_key"].(string),
		uriPath: st.Data["uri_path"].(string), ca: filepath.Join(dir, "ca.pem"),
		clientCert: filepath.Join(dir, "client.pem"), key: filepath.Join(dir, "client.key")}

	status, h := x.curl("POST", "/health", `{"requestMetadata":{"kmsRequestId":"h-1","kmsOperation":"KmsHealthCheck"}}`, x.akid, x.secret)
	if status != 200 || !strings.Contains(fmt.Sprint(h["ekmFleetDetails"]), "ACTIVE") {
		t.Fatalf("health: %d %v", status, h)
	}
	status, md := x.call("metadata", "bucket-key-1", nil)
	if status != 200 || md["keySpec"] != "AES_256" || md["keyStatus"] != "ENABLED" {
		t.Fatalf("metadata: %d %v", status, md)
	}
	// A round trip with 4,300 bytes and 8 KiB of AAD, its CDIV checked here.
	pt := make([]byte, 4300)
	for i := range pt {
		pt[i] = byte(i * 7)
	}
	aad := []byte(strings.Repeat("bucket=payments,", 512))
	status, enc := x.call("encrypt", "bucket-key-1", map[string]interface{}{"plaintext": base64.StdEncoding.EncodeToString(pt),
		"additionalAuthenticatedData": base64.StdEncoding.EncodeToString(aad), "ciphertextDataIntegrityValueAlgorithm": "SHA_256"})
	if status != 200 {
		t.Fatalf("encrypt: %d %v", status, enc)
	}
	h256 := sha256.New()
	h256.Write(aad)
	for _, k := range []string{"ciphertextMetadata", "initializationVector", "ciphertext", "authenticationTag"} {
		b, _ := base64.StdEncoding.DecodeString(enc[k].(string))
		h256.Write(b)
	}
	if enc["ciphertextDataIntegrityValue"] != base64.StdEncoding.EncodeToString(h256.Sum(nil)) {
		t.Fatalf("CDIV %v", enc["ciphertextDataIntegrityValue"])
	}
	dec := map[string]interface{}{"additionalAuthenticatedData": base64.StdEncoding.EncodeToString(aad)}
	for _, k := range []string{"ciphertext", "ciphertextMetadata", "initializationVector", "authenticationTag"} {
		dec[k] = enc[k]
	}
	status, out := x.call("decrypt", "bucket-key-1", dec)
	if status != 200 || out["plaintext"] != base64.StdEncoding.EncodeToString(pt) {
		t.Fatalf("decrypt: %d", status)
	}
	// Rotation is invisible to AWS: the old ciphertext still decrypts after a rotation.
	mustWrite(t, root, m.Path+"/keys/s3-bucket-key/rotate", nil)
	if status, _ := x.call("decrypt", "bucket-key-1", dec); status != 200 {
		t.Fatalf("decrypt after rotation: %d", status)
	}
	wrong := map[string]interface{}{}
	for k, v := range dec {
		wrong[k] = v
	}
	wrong["additionalAuthenticatedData"] = base64.StdEncoding.EncodeToString([]byte("bucket=other"))
	if status, e := x.call("decrypt", "bucket-key-1", wrong); status != 400 || e["errorName"] != "InvalidCiphertextException" {
		t.Fatalf("wrong AAD: %d %v", status, e)
	}
	if status, e := x.call("encrypt", "no-such-key", map[string]interface{}{"plaintext": "AAAA"}); status != 404 || e["errorName"] != "KeyNotFoundException" {
		t.Fatalf("unknown key: %d %v", status, e)
	}
	if status, e := x.curl("POST", "/health", `{"requestMetadata":{"kmsRequestId":"h","kmsOperation":"KmsHealthCheck"}}`, x.akid, "Invalid"+x.secret); status != 401 || e["errorName"] != "AuthenticationFailedException" {
		t.Fatalf("wrong secret: %d %v", status, e)
	}
	// curl signs with the X-Amz-Date it is given: six minutes ago is past the replay window.
	old := time.Now().UTC().Add(-6 * time.Minute).Format("20060102T150405Z")
	if status, e := x.curl("POST", "/health", `{"requestMetadata":{"kmsRequestId":"h","kmsOperation":"KmsHealthCheck"}}`, x.akid, x.secret, "-H", "X-Amz-Date: "+old); status != 401 || e["errorName"] != "AuthenticationFailedException" {
		t.Fatalf("a request signed six minutes ago: %d %v", status, e)
	}
	recent := time.Now().UTC().Add(-2 * time.Minute).Format("20060102T150405Z")
	if status, e := x.curl("POST", "/health", `{"requestMetadata":{"kmsRequestId":"h","kmsOperation":"KmsHealthCheck"}}`, x.akid, x.secret, "-H", "X-Amz-Date: "+recent); status != 200 {
		t.Fatalf("a request signed two minutes ago: %d %v", status, e)
	}
	bad := *x
	bad.uriPath = "/keystores/acct1/invalid/kms/xks/v1"
	if status, e := bad.curl("POST", "/health", `{"requestMetadata":{"kmsRequestId":"h","kmsOperation":"KmsHealthCheck"}}`, x.akid, x.secret); status != 404 || e["errorName"] != "InvalidUriPathException" {
		t.Fatalf("wrong prefix: %d %v", status, e)
	}
	if status, _ := x.curl("GET", "/health", "", x.akid, x.secret); status != 405 {
		t.Fatalf("GET: %d", status)
	}
	// Mutual TLS: no client certificate, one with another subject, an expired one or a self-signed one with AWS's
	// subject (the test client's bogus-mtls cases) ends the handshake.
	expired, selfSigned := bogusClientCerts(t, dir, awsCN)
	for _, who := range []struct{ cert, key string }{{"", ""}, {filepath.Join(dir, "stranger.pem"), filepath.Join(dir, "stranger.key")},
		expired, selfSigned} {
		anon := *x
		anon.clientCert, anon.key = who.cert, who.key
		args := []string{"-sS", "--cacert", x.ca, "--resolve", xksHost + ":" + strings.Split(addr, ":")[1] + ":127.0.0.1", "-o", "/dev/null"}
		if who.cert != "" {
			args = append(args, "--cert", who.cert, "--key", who.key)
		}
		if out, err := exec.Command("curl", append(args, "https://"+xksHost+":"+strings.Split(addr, ":")[1]+x.uriPath+"/health")...).CombinedOutput(); err == nil {
			t.Fatalf("a client without AWS's certificate (%q) got through: %s", who.cert, out)
		}
	}
	// A load balancer's check: no token, no signature, and (on -health-listen) no client certificate.
	_, port, _ := net.SplitHostPort(addr)
	if out, err := exec.Command("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", x.ca, "--cert", x.clientCert, "--key", x.key,
		"--resolve", xksHost+":"+port+":127.0.0.1", "https://"+xksHost+":"+port+"/healthz").CombinedOutput(); err != nil || string(out) != "200" {
		t.Fatalf("/healthz: %s %v", out, err)
	}
	if out, err := exec.Command("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "http://"+healthAddr+"/healthz").CombinedOutput(); err != nil || string(out) != "200" {
		t.Fatalf("/healthz on -health-listen: %s %v", out, err)
	}
	// The customer's kill switch.
	mustWrite(t, root, m.Path+"/keys/s3-bucket-key/disable", nil)
	if status, e := x.call("decrypt", "bucket-key-1", dec); status != 400 || e["errorName"] != "InvalidStateException" {
		t.Fatalf("decrypt with the key disabled: %d %v", status, e)
	}
	if _, md := x.call("metadata", "bucket-key-1", nil); md["keyStatus"] != "DISABLED" {
		t.Fatalf("metadata with the key disabled: %v", md)
	}
	mustWrite(t, root, m.Path+"/keys/s3-bucket-key/enable", nil)
	// The front end's token can do nothing but forward: it cannot read the store's credentials.
	tok, err := os.ReadFile(sink)
	if err != nil {
		t.Fatal(err)
	}
	proxyClient, _ := root.Clone()
	proxyClient.SetToken(strings.TrimSpace(string(tok)))
	if _, err := proxyClient.Logical().Read(m.Path + "/xks/stores/acct1/credentials/" + x.akid); statusOf(err) != 403 {
		t.Fatalf("the proxy's token read a credential: %v", err)
	}
	// Its access log joins requests to CloudTrail by kmsRequestId, and never carries a body.
	logText, _ := os.ReadFile(filepath.Join(dir, "proxy.log"))
	if !strings.Contains(string(logText), `"kms_request_id":"e2e-`) || strings.Contains(string(logText), enc["ciphertext"].(string)[:16]) {
		t.Fatalf("proxy log:\n%s", logText)
	}
	sc := bufio.NewScanner(strings.NewReader(string(logText)))
	for sc.Scan() {
		if strings.Contains(sc.Text(), base64.StdEncoding.EncodeToString(pt)[:16]) {
			t.Fatal("the proxy logged plaintext")
		}
	}
}
