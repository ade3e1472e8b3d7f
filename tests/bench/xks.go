package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/xks/xkstest"
)

// xksHost is the name the front end's certificate carries; the client reaches it on loopback.
const xksHost = "xks.bench.internal"

// xksRows measures AWS's External Key Store path as AWS KMS would drive it: requests signed with SigV4 (xkstest,
// per request), over TLS with kept-alive connections, through cmk-xks-proxy, to the engine; beside the engine's
// own single encrypt in the same windows. AWS KMS gives up on a request after 250 ms, network included.
func xksRows(srv *vaulttest.Server, proxyBin, dir string, cmk vaulttest.Mount, engineEncrypt func(*api.Client) error) []row {
	c := srv.Client
	st := write(c, cmk.Path+"/xks/stores/bench", nil)
	cred := write(c, cmk.Path+"/xks/stores/bench/credentials", nil)
	write(c, cmk.Path+"/xks/stores/bench/keys/bench-ext", map[string]interface{}{"key": "bench"})
	uriPath := st.Data["uri_path"].(string)
	akid, secret := cred.Data["access_key_id"].(string), cred.Data["secret_access_key"].(string)

	policy, err := os.ReadFile("examples/policies/cmk-xks-proxy.hcl")
	check(err)
	check(c.Sys().PutPolicy("bench-xks-proxy", string(bytes.ReplaceAll(policy, []byte(`"cmk/`), []byte(`"`+cmk.Path+`/`)))))
	tok, err := c.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{"bench-xks-proxy"}, NoDefaultPolicy: true})
	check(err)
	tokenFile := filepath.Join(dir, "xks-token")
	check(os.WriteFile(tokenFile, []byte(tok.Auth.ClientToken), 0o600))
	certFile, keyFile, pool := selfSigned(dir)

	addr, err := vaulttest.FreeAddr()
	check(err)
	logFile, err := os.Create(filepath.Join(dir, "xks-proxy.log"))
	check(err)
	cmd := exec.Command(proxyBin, "-listen", addr, "-tls-cert", certFile, "-tls-key", keyFile, "-vault-addr", "http://"+srv.Addr,
		"-token-file", tokenFile, "-mount", cmk.Path)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	check(cmd.Start())
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); logFile.Close() }()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if conn, err := net.Dial("tcp", addr); err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			check(fmt.Errorf("cmk-xks-proxy did not listen: %s", vaulttest.Tail(logFile.Name(), 10)))
		}
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: xksHost}, MaxIdleConnsPerHost: 64}}

	var seq atomic.Int64
	send := func(op string, fields map[string]interface{}) (map[string]interface{}, error) {
		body := map[string]interface{}{"requestMetadata": map[string]interface{}{"awsPrincipalArn": "arn:aws:iam::111122223333:role/bench",
			"kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/bench", "kmsOperation": "GenerateDataKey",
			"kmsRequestId": fmt.Sprintf("bench-%d", seq.Add(1))}, "encryptionAlgorithm": "AES_GCM"}
		for k, v := range fields {
			body[k] = v
		}
		raw, _ := json.Marshal(body)
		r := xkstest.NewRequest(xksHost, uriPath+"/keys/bench-ext/"+op, raw, akid, secret, "us-east-1", time.Now())
		req, err := http.NewRequest(http.MethodPost, "https://"+addr+r.Path, bytes.NewReader(raw))
		if err != nil {
			return nil, err
		}
		req.Host = xksHost
		req.Header = r.Header
		resp, err := client.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		out, err := io.ReadAll(resp.Body)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("XKS %s: %d %s", op, resp.StatusCode, out)
		}
		var answer map[string]interface{}
		return answer, json.Unmarshal(out, &answer)
	}
	dataKey := base64.StdEncoding.EncodeToString(make([]byte, 32)) // what AWS KMS asks to encrypt: a data key
	aad := base64.StdEncoding.EncodeToString([]byte("aws:kms ciphertext blob header"))
	xksEncrypt := func(*api.Client) error {
		_, err := send("encrypt", map[string]interface{}{"plaintext": dataKey, "additionalAuthenticatedData": aad})
		return err
	}
	enc, err := send("encrypt", map[string]interface{}{"plaintext": dataKey, "additionalAuthenticatedData": aad})
	check(err)
	dec := map[string]interface{}{"additionalAuthenticatedData": aad}
	for _, k := range []string{"ciphertext", "ciphertextMetadata", "initializationVector", "authenticationTag"} {
		dec[k] = enc[k]
	}
	xksDecrypt := func(*api.Client) error {
		_, err := send("decrypt", dec)
		return err
	}
	if *cpuProfile != "" && *profLoad == "xks" {
		profile(srv, 16, xksEncrypt)
		return nil
	}
	w := alternate(window(srv, 16, xksEncrypt), window(srv, 16, xksDecrypt), window(srv, 16, engineEncrypt))
	rows := []row{
		ratioRow("XKS encrypt through cmk-xks-proxy (TLS, SigV4), requests/s (16 clients)", w[0], "the engine's single encrypt", w[2], rate, 0.7),
		ratioRow("XKS decrypt through cmk-xks-proxy (TLS, SigV4), requests/s (16 clients)", w[1], "the engine's single encrypt", w[2], rate, 0.7),
	}
	one := alternate(window(srv, 1, xksEncrypt), window(srv, 1, xksDecrypt))
	timeout := []result{{p50: 250, p99: 250}}
	for _, l := range []struct {
		name string
		r    []result
	}{{"XKS encrypt latency %s, ms (1 client)", one[0]}, {"XKS decrypt latency %s, ms (1 client)", one[1]},
		{"XKS encrypt latency %s, ms (16 clients)", w[0]}, {"XKS decrypt latency %s, ms (16 clients)", w[1]}} {
		for _, q := range []struct {
			name string
			f    func(result) float64
		}{{"p50", p50}, {"p99", p99}} {
			ref := make([]result, len(l.r))
			for i := range ref {
				ref[i] = timeout[0]
			}
			rows = append(rows, ratioRow(fmt.Sprintf(l.name, q.name), l.r, "AWS KMS's timeout", ref, q.f, -1))
		}
	}
	return rows
}

// selfSigned writes a P-256 certificate for xksHost and its key, and returns their files and a pool trusting it.
func selfSigned(dir string) (certFile, keyFile string, pool *x509.CertPool) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	check(err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: xksHost}, DNSNames: []string{xksHost},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	check(err)
	cert, err := x509.ParseCertificate(der)
	check(err)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	keyDER, err := x509.MarshalECPrivateKey(key)
	check(err)
	certFile, keyFile = filepath.Join(dir, "xks-cert.pem"), filepath.Join(dir, "xks-key.pem")
	check(os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600))
	check(os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600))
	return certFile, keyFile, pool
}
