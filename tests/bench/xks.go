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
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/vault/api"
	"golang.org/x/sys/unix"

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
	proxyPprof, err := vaulttest.FreeAddr()
	check(err)
	cmd.Env = append(os.Environ(), "CMK_PPROF_ADDR="+proxyPprof)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM} // gone with this process, even on a fatal error
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
		// The front end's profile beside the plugin's and Vault's; then the plugin's and Vault's again under the
		// engine's own encrypt, to set one against the other.
		proxyDone := make(chan struct{})
		go func() {
			defer close(proxyDone)
			fetchFrom(proxyPprof, fmt.Sprintf("profile?seconds=%d", profileSeconds()), *cpuProfile+".proxy")
		}()
		profile(srv, *cpuProfile, 16, xksEncrypt)
		<-proxyDone
		profile(srv, *cpuProfile+".engine", 16, engineEncrypt)
		return nil
	}
	// A second reference, with the front end's kind of token: the engine's encrypt under a policy, not the root
	// token, whose requests Vault checks against no policy.
	check(c.Sys().PutPolicy("bench-encrypt", `path "`+cmk.Path+`/encrypt/bench" { capabilities = ["update"] }`))
	appTok, err := c.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{"bench-encrypt"}, NoDefaultPolicy: true})
	check(err)
	engineAsApp := func(cl *api.Client) error {
		cl.SetToken(appTok.Auth.ClientToken)
		return engineEncrypt(cl)
	}
	// Each process's CPU time per request, read in the same windows: where an XKS request's cost goes.
	procs := func() map[string][]int {
		return map[string][]int{"Vault": {srv.PID()}, "the plugin": srv.CMKPluginPIDs(), "cmk-xks-proxy": {cmd.Process.Pid},
			"the load generator": {os.Getpid()}}
	}
	var xksCPU, engineCPU []map[string]float64
	w := alternate(cpuWindow(srv, 16, xksEncrypt, procs, &xksCPU), window(srv, 16, xksDecrypt),
		cpuWindow(srv, 16, engineEncrypt, procs, &engineCPU), window(srv, 16, engineAsApp))
	rows := []row{
		ratioRow("XKS encrypt through cmk-xks-proxy (TLS, SigV4), requests/s (16 clients)", w[0], "the engine's single encrypt", w[2], rate, 0.7),
		ratioRow("", w[0], "the engine's single encrypt under a policy token", w[3], rate, 0),
		ratioRow("XKS decrypt through cmk-xks-proxy (TLS, SigV4), requests/s (16 clients)", w[1], "the engine's single encrypt", w[2], rate, 0.7),
		ratioRow("", w[1], "the engine's single encrypt under a policy token", w[3], rate, 0),
	}
	for _, name := range []string{"Vault", "the plugin", "Vault and the plugin", "cmk-xks-proxy", "the load generator", "all"} {
		rows = append(rows, cpuRow("CPU time per XKS encrypt, "+name+", ms", name, xksCPU, engineCPU, name != "cmk-xks-proxy"))
	}
	rows = append(rows, pinnedRows(srv, cmd.Process.Pid, procs, xksEncrypt, xksDecrypt, engineEncrypt, engineAsApp)...)
	return append(rows, latencyRows(srv, xksEncrypt, xksDecrypt, w)...)
}

// pinnedRows take the throughput again with Vault and its plugins on one of this process's CPUs and the front end
// and the load generator on another, for these windows alone: deployed, the front end runs beside AWS's load
// balancer, not on the Vault node. Go's runtime follows a process's CPU affinity within about a second (GOMAXPROCS
// becomes 1 for the pinned ones), so each change is given that long before a window. Informational: with one CPU,
// or if the affinity cannot be set, there are none.
func pinnedRows(srv *vaulttest.Server, proxyPID int, procs func() map[string][]int, xksEncrypt, xksDecrypt, engineEncrypt, engineAsApp func(*api.Client) error) []row {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		log.Printf("no figures with Vault on a CPU of its own: %v", err)
		return nil
	}
	var cpus []string
	for i := 0; i < 1024 && len(cpus) < set.Count(); i++ {
		if set.IsSet(i) {
			cpus = append(cpus, strconv.Itoa(i))
		}
	}
	if len(cpus) < 2 {
		log.Printf("no figures with Vault on a CPU of its own: this process has one CPU")
		return nil
	}
	// pin sets every process it can, whatever fails for another, so that a restore leaves none behind.
	pin := func(vaultCPUs, otherCPUs string) error {
		var errs []error
		for _, pid := range append([]int{srv.PID()}, srv.PluginPIDs()...) {
			errs = append(errs, taskset(vaultCPUs, pid))
		}
		for _, pid := range []int{proxyPID, os.Getpid()} {
			errs = append(errs, taskset(otherCPUs, pid))
		}
		time.Sleep(1500 * time.Millisecond)
		return errors.Join(errs...)
	}
	defer func() {
		// Every process back on all of this process's CPUs, which they inherited from it; twice, since a thread
		// started while taskset walked a process's threads keeps the mask it was cloned with.
		all := strings.Join(cpus, ",")
		for i := 0; i < 2; i++ {
			if err := pin(all, all); err != nil {
				log.Printf("restoring the CPU affinity: %v", err)
			}
		}
	}()
	if err := pin(cpus[0], cpus[1]); err != nil {
		log.Printf("no figures with Vault on a CPU of its own: %v", err)
		return nil
	}
	var xksCPU, engineCPU []map[string]float64
	p := alternate(cpuWindow(srv, 16, xksEncrypt, procs, &xksCPU), window(srv, 16, xksDecrypt),
		cpuWindow(srv, 16, engineEncrypt, procs, &engineCPU), window(srv, 16, engineAsApp))
	return []row{
		ratioRow("XKS encrypt, Vault on one CPU, the front end and the clients on another, requests/s (16 clients)", p[0], "the engine's single encrypt, alike", p[2], rate, 0),
		ratioRow("", p[0], "the engine's single encrypt under a policy token, alike", p[3], rate, 0),
		ratioRow("XKS decrypt, alike", p[1], "the engine's single encrypt, alike", p[2], rate, 0),
		ratioRow("", p[1], "the engine's single encrypt under a policy token, alike", p[3], rate, 0),
		cpuRow("CPU time per XKS encrypt, Vault and the plugin, ms, alike", "Vault and the plugin", xksCPU, engineCPU, true),
	}
}

// latencyRows are the XKS latencies against AWS KMS's timeout: with one client, and with 16 (the windows w).
func latencyRows(srv *vaulttest.Server, xksEncrypt, xksDecrypt func(*api.Client) error, w [][]result) []row {
	var rows []row
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

// cpuWindow is window, adding to *perRequest each process's CPU time per successful request in that window, in ms,
// with "Vault and the plugin" and "all" summed; a window in which a process came or went adds nothing.
func cpuWindow(srv *vaulttest.Server, clients int, fn func(*api.Client) error, procs func() map[string][]int, perRequest *[]map[string]float64) func() result {
	return func() result {
		at := procs()
		before, err := cpuTimes(at)
		r := load(srv, clients, fn)
		after, err2 := cpuTimes(at)
		switch {
		case err != nil || err2 != nil:
			log.Printf("CPU time per request: %v", errors.Join(err, err2))
		case !reflect.DeepEqual(at, procs()):
			log.Printf("CPU time per request: the processes changed during a window")
		case r.ops == 0:
			log.Printf("CPU time per request: no request succeeded in a window")
		default:
			m := map[string]float64{}
			for name := range at {
				m[name] = (after[name] - before[name]) * 1000 / float64(r.ops)
				m["all"] += m[name]
			}
			m["Vault and the plugin"] = m["Vault"] + m["the plugin"]
			*perRequest = append(*perRequest, m)
		}
		return r
	}
}

// cpuRow is one process's median CPU time per request under XKS, against the engine's encrypt (withRef), as the
// ratio of the two medians.
func cpuRow(name, proc string, xksCPU, engineCPU []map[string]float64, withRef bool) row {
	var o, rf []float64
	for _, m := range xksCPU {
		o = append(o, m[proc])
	}
	for _, m := range engineCPU {
		rf = append(rf, m[proc])
	}
	if len(o) == 0 {
		return row{name: name, ours: "–"}
	}
	r := row{name: name, ours: fmt.Sprintf("%.3f", median(o))}
	if withRef && len(rf) > 0 && median(rf) > 0 {
		r.ref, r.ratio = fmt.Sprintf("the engine's single encrypt: %.3f", median(rf)), fmt.Sprintf("%.2f", median(o)/median(rf))
	}
	return r
}

// cpuTimes is each named group's CPU time (user and system, in seconds) from /proc/<pid>/stat.
func cpuTimes(procs map[string][]int) (map[string]float64, error) {
	out := map[string]float64{}
	for name, pids := range procs {
		if len(pids) == 0 {
			return nil, fmt.Errorf("no process for %s", name)
		}
		for _, pid := range pids {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if err != nil {
				return nil, err
			}
			f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
			utime, _ := strconv.ParseFloat(f[11], 64)
			stime, _ := strconv.ParseFloat(f[12], 64)
			out[name] += (utime + stime) / clockTicks
		}
	}
	return out, nil
}

// clockTicks is USER_HZ, the unit of /proc's CPU times: 100 on every Linux architecture Go runs on.
const clockTicks = 100

// taskset sets the CPUs every thread of a process may run on.
func taskset(cpus string, pid int) error {
	if out, err := exec.Command("taskset", "-a", "-c", "-p", cpus, strconv.Itoa(pid)).CombinedOutput(); err != nil {
		return fmt.Errorf("taskset %s %d: %v: %s", cpus, pid, err, bytes.TrimSpace(out))
	}
	return nil
}
