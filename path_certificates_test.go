package cmk

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A CSR for each signing key type is signed in the HSM: Go's parser and OpenSSL's `req -verify` accept its
// signature, it carries the version's public key and the template's subject and names.
func TestCSRSignedInTheHSM(t *testing.T) {
	e := newTestBackend(t)
	template := &x509.CertificateRequest{Subject: pkix.Name{CommonName: "cmk test", Organization: []string{"Example"}}, DNSNames: []string{"cmk.example"}}
	throwaway, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader) // signs the template only; its key is not used
	tmplDER, err := x509.CreateCertificateRequest(rand.Reader, template, throwaway)
	if err != nil {
		t.Fatal(err)
	}
	tmplPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: tmplDER}))
	for _, typ := range []string{"ecdsa-p256", "ecdsa-p384", "rsa-2048", "ed25519"} {
		t.Run(typ, func(t *testing.T) {
			e.ok(e.write("keys/"+typ, map[string]interface{}{"type": typ}))
			e.ok(e.write("keys/"+typ+"/rotate", nil))
			resp := e.ok(e.write("keys/"+typ+"/csr", map[string]interface{}{"csr": tmplPEM, "version": 1}))
			csrPEM := resp.Data["csr"].(string)
			block, _ := pem.Decode([]byte(csrPEM))
			csr, err := x509.ParseCertificateRequest(block.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			if err := csr.CheckSignature(); err != nil {
				t.Fatalf("the CSR's signature does not verify: %v", err)
			}
			if csr.Subject.CommonName != "cmk test" || len(csr.DNSNames) != 1 || csr.DNSNames[0] != "cmk.example" {
				t.Fatalf("template not copied: %v %v", csr.Subject, csr.DNSNames)
			}
			pub := e.ok(e.read("export/public-key/" + typ + "/1")).Data["keys"].(map[string]interface{})["1"].(string)
			if !publicKeyPEMEqual(t, typ, pub, csr.PublicKey) {
				t.Fatal("the CSR's public key is not version 1's")
			}
			// An implementation other than Go's must accept it too; a missing openssl fails the test, never skips the check.
			openssl, err := exec.LookPath("openssl")
			if err != nil {
				t.Fatalf("openssl (installed by make deps): %v", err)
			}
			f := filepath.Join(t.TempDir(), "req.pem")
			if err := os.WriteFile(f, []byte(csrPEM), 0o600); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command(openssl, "req", "-in", f, "-verify", "-noout").CombinedOutput(); err != nil {
				t.Fatalf("openssl req -verify: %v\n%s", err, out)
			}
		})
	}
	if code := status(e.write("keys/none/csr", nil)); code != 400 {
		t.Fatalf("CSR for a missing key: %d", code)
	}
	e.ok(e.write("keys/aes", nil))
	if code := status(e.write("keys/aes/csr", nil)); code != 400 {
		t.Fatalf("CSR for an AES key: %d", code)
	}
}

// publicKeyPEMEqual compares an exported public key (PEM, or base64 for Ed25519) with a parsed one.
func publicKeyPEMEqual(t *testing.T, typ, exported string, pub interface{}) bool {
	t.Helper()
	want, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	if typ == "ed25519" {
		return strings.HasSuffix(string(want), string(mustB64(t, exported)))
	}
	block, _ := pem.Decode([]byte(exported))
	return block != nil && string(block.Bytes) == string(want)
}

func mustB64(t *testing.T, s string) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// set-certificate takes a chain whose leaf certifies the version's key, in order; the chain is shown on the key
// and exported; anything else is a 400 that says what is wrong.
func TestSetCertificateAndExport(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ecdsa-p256"}))
	csrPEM := e.ok(e.write("keys/s/csr", map[string]interface{}{})).Data["csr"].(string)
	block, _ := pem.Decode([]byte(csrPEM))
	csr, _ := x509.ParseCertificateRequest(block.Bytes)

	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader) // a test CA outside the HSM
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	ca, _ := x509.ParseCertificate(caDER)
	leafTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "cmk leaf"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	leafDER, _ := x509.CreateCertificate(rand.Reader, leafTmpl, ca, csr.PublicKey, caKey)
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherDER, _ := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &otherKey.PublicKey, caKey)
	pemOf := func(ders ...[]byte) string {
		var b strings.Builder
		for _, d := range ders {
			_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: d})
		}
		return b.String()
	}

	for _, c := range []struct{ chain, want string }{
		{pemOf(otherDER, caDER), "does not certify"},
		{pemOf(caDER, leafDER), "not signed by"},
		{"not PEM", "no PEM certificate"},
		{csrPEM, "CERTIFICATE REQUEST block"},
	} {
		resp, err := e.write("keys/s/set-certificate", map[string]interface{}{"certificate_chain": c.chain})
		if status(resp, err) != 400 || !strings.Contains(respText(resp), c.want) {
			t.Fatalf("chain refused with %d %s, want 400 with %q", status(resp, err), respText(resp), c.want)
		}
	}
	if code := status(e.read("export/certificate-chain/s")); code != 400 {
		t.Fatalf("export of a chain never set: %d", code)
	}
	chain := pemOf(leafDER, caDER)
	e.ok(e.write("keys/s/set-certificate", map[string]interface{}{"certificate_chain": chain}))
	keyRead := e.ok(e.read("keys/s")).Data["keys"].(map[string]interface{})["1"].(map[string]interface{})
	if keyRead["certificate_chain"] != chain {
		t.Fatalf("key read shows %v", keyRead["certificate_chain"])
	}
	exported := e.ok(e.read("export/certificate-chain/s/latest")).Data["keys"].(map[string]interface{})
	if exported["1"] != chain {
		t.Fatalf("export shows %v", exported)
	}
	if ev := lastEvent(e.history("s")); ev["event"] != "certificate_chain_set" {
		t.Fatalf("history: %v", ev)
	}
	for _, typ := range []string{"encryption-key", "signing-key", "hmac-key", "bogus"} {
		if code := status(e.read("export/" + typ + "/s")); code != 400 {
			t.Fatalf("export/%s: %d", typ, code)
		}
	}
	e.ok(e.write("keys/aes", nil))
	if code := status(e.read("export/public-key/aes")); code != 400 {
		t.Fatalf("public-key export of an AES key: %d", code)
	}
}

// Issue 19 item 11: a CSR is a signature, so it follows sign's version rule: a version below
// min_encryption_version signs no CSR, as it signs nothing else; the latest still does.
func TestCSRRefusesVersionBelowMinEncryptionVersion(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ecdsa-p256"}))
	e.ok(e.write("keys/s/rotate", nil))
	e.ok(e.write("keys/s/config", map[string]interface{}{"min_encryption_version": 2}))
	resp, err := e.write("sign/s", map[string]interface{}{"input": b64("x"), "key_version": 1})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "min_encryption_version") {
		t.Fatalf("sign with version 1: %d %s", status(resp, err), respText(resp))
	}
	resp, err = e.write("keys/s/csr", map[string]interface{}{"version": 1})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "min_encryption_version") {
		t.Fatalf("CSR with version 1: %d %s", status(resp, err), respText(resp))
	}
	e.ok(e.write("keys/s/csr", nil))
}
