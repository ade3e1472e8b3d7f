// Command soak runs mixed load (encrypt, decrypt, rewrap, rotate, sign, verify) against a real Vault server for a
// set time, with PKCS#11 faults injected at random inside the plugin (a build with -tags cmkfaults) and the
// plugin process killed with SIGKILL half-way, then checks that every ciphertext and signature a client received
// still decrypts or verifies. It prints operations and errors by class, and exits non-zero if anything was lost,
// if a decryption returned other data, if a valid ciphertext or signature was refused with a 400, if a request got
// no HTTP answer at all, if a 500 came from anything but the plugin kill, or if the plugin restarted for any other
// reason than the kill (a crash: its trace is printed from Vault's log, which keeps the plugin's stderr at debug
// level). make soak runs it.
package main

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/softhsmtest"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
)

var (
	vaultBin  = flag.String("vault", ".build/vault/vault", "vault binary")
	pluginBin = flag.String("plugin", ".build/faults/vault-plugin-secrets-cmk", "plugin binary built with -tags cmkfaults")
	duration  = flag.Duration("duration", 10*time.Minute, "how long the load runs")
	faultRate = flag.Float64("fault-rate", 0.01, "chance that a PKCS#11 call in the plugin fails with a recoverable error")
	keepLog   = flag.String("keep-log", "", "copy Vault's log (with the plugin's) to this file at the end")
)

// tally counts outcomes of one kind of operation.
type tally struct {
	ok, user, unavailable, internal, killWindow, transport atomic.Int64
}

type soak struct {
	srv   *vaulttest.Server
	path  string
	tally map[string]*tally

	mu         sync.Mutex
	issued     map[string]string // ciphertext → plaintext, for every encryption or rewrap a client got back
	order      []string          // issued's ciphertexts, to pick from
	signatures map[string]string // signature → signed input
	wrong      []string          // decryptions during the load that returned other data, and signatures that did not verify
	internal   []string          // 500s outside the plugin kill, with their message
	refused    []string          // 400s on ciphertexts and signatures this run issued, with their message
	transport  []string          // requests that got no HTTP answer, with when and why
	why503     map[string]int    // 503s by the cause their message names

	killedAt atomic.Int64 // unix nanoseconds of the plugin kill
	start    time.Time
}

func main() {
	flag.Parse()
	log.SetFlags(0)
	os.Exit(run())
}

// run is the soak; its exit code is main's. On failure the run's directory (Vault's log, the SoftHSM token) is
// kept for inspection with pkcs11-tool, and its path printed.
func run() (code int) {
	dir, err := os.MkdirTemp("", "cmk-soak-")
	check(err)
	defer func() {
		if code == 0 {
			os.RemoveAll(dir)
		} else {
			fmt.Printf("kept for inspection: %s (Vault's log: vault/vault.log; the token: softhsm)\n", dir)
		}
	}()
	env, err := softhsmtest.Setup(filepath.Join(dir, "softhsm"))
	check(err)
	srv, err := vaulttest.NewServer(filepath.Join(dir, "vault"), abs(*vaultBin), abs(*pluginBin), env)
	check(err)
	faultFile := filepath.Join(dir, "fault-rate")
	check(os.WriteFile(faultFile, []byte(fmt.Sprint(*faultRate)), 0o600))
	if *keepLog != "" {
		defer func() { _ = copyFile(srv.LogPath, *keepLog) }() // after srv.Stop: the whole log
	}
	srv.PluginEnv = []string{"CMK_FAULT_RATE_FILE=" + faultFile}
	srv.LogLevel = "debug" // keeps the plugin's stderr, and so any crash trace, in Vault's log
	check(srv.StartDevMode("soak-root"))
	defer srv.Stop()
	srv.StopOnInterrupt()
	check(srv.RegisterPlugin(abs(*pluginBin), "", ""))
	m, err := srv.NewMount("soak")
	check(err)
	s := &soak{srv: srv, path: m.Path, start: time.Now(), issued: map[string]string{}, signatures: map[string]string{}, tally: map[string]*tally{}, why503: map[string]int{}}
	for _, op := range []string{"encrypt", "encrypt batch", "decrypt", "rewrap", "rotate", "sign", "verify"} {
		s.tally[op] = &tally{}
	}
	s.must("keys/aes", nil)
	s.must("keys/ec", map[string]interface{}{"type": "ecdsa-p256"})
	log.Printf("soak: %s of mixed load on Vault %s, PKCS#11 fault rate %g, the plugin killed once half-way", *duration, srv.Addr, *faultRate)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	worker := func(every time.Duration, fn func(c *api.Client, n int)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, _ := srv.Client.Clone()
			c.SetToken(srv.RootToken)
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				case <-time.After(every):
				}
				fn(c, n)
			}
		}()
	}
	for w := range 2 {
		worker(0, func(c *api.Client, n int) { s.encrypt(c, fmt.Sprintf("w%d-%d", w, n)) })
	}
	worker(0, func(c *api.Client, n int) { s.encryptBatch(c, fmt.Sprintf("b-%d", n)) })
	worker(0, func(c *api.Client, _ int) { s.decrypt(c) })
	worker(5*time.Millisecond, func(c *api.Client, _ int) { s.rewrap(c) })
	worker(5*time.Millisecond, func(c *api.Client, n int) { s.sign(c, fmt.Sprintf("s-%d", n)) })
	worker(2*time.Second, func(c *api.Client, n int) {
		key := "aes"
		if n%3 == 2 {
			key = "ec"
		}
		_, err := c.Logical().Write(s.path+"/keys/"+key+"/rotate", nil)
		s.count("rotate", err)
	})

	start := time.Now()
	time.Sleep(*duration / 2)
	pids := srv.PluginPIDs()
	for _, pid := range pids {
		s.killedAt.Store(time.Now().UnixNano())
		check(syscall.Kill(pid, syscall.SIGKILL))
	}
	log.Printf("killed the plugin (pids %v) after %s", pids, time.Since(start).Round(time.Second))
	time.Sleep(*duration - time.Since(start))
	close(stop)
	wg.Wait()
	check(os.WriteFile(faultFile, []byte("0"), 0o600)) // the HSM is well again: everything issued must decrypt
	time.Sleep(time.Second)

	lost, checked := s.checkEverything()
	crashes := s.report(lost, checked, time.Since(start), len(pids))
	if lost > 0 || len(s.wrong) > 0 || len(s.internal) > 0 || len(s.refused) > 0 || len(s.transport) > 0 || crashes > 0 || len(pids) == 0 {
		return 1
	}
	return 0
}

// count files an operation's outcome under its class. A 500 within 20 s of the plugin kill is Vault's own
// answer while the plugin restarts; any other 500 is a defect.
func (s *soak) count(op string, err error) bool {
	t := s.tally[op]
	var re *api.ResponseError
	switch {
	case err == nil:
		t.ok.Add(1)
		return true
	case errors.As(err, &re) && re.StatusCode == 400:
		t.user.Add(1)
		if op == "decrypt" || op == "rewrap" || op == "verify" { // every input of theirs was issued by this run
			s.mu.Lock()
			s.refused = append(s.refused, op+": "+strings.Join(re.Errors, "; "))
			s.mu.Unlock()
		}
	case errors.As(err, &re) && re.StatusCode == 503:
		t.unavailable.Add(1)
		s.mu.Lock()
		s.why503[cause503(strings.Join(re.Errors, "; "))]++
		s.mu.Unlock()
	case errors.As(err, &re) && re.StatusCode == 500:
		if k := s.killedAt.Load(); k != 0 && time.Since(time.Unix(0, k)) < 20*time.Second {
			t.killWindow.Add(1)
			break
		}
		t.internal.Add(1)
		s.mu.Lock()
		if len(s.internal) < 10 {
			s.internal = append(s.internal, op+": "+strings.Join(re.Errors, "; "))
		} else {
			s.internal = append(s.internal, "")
		}
		s.mu.Unlock()
	default:
		// No HTTP answer at all (a timeout, a refused or reset connection): Vault itself should always answer.
		t.transport.Add(1)
		s.mu.Lock()
		s.transport = append(s.transport, fmt.Sprintf("%s after %s: %v", op, time.Since(s.start).Round(time.Millisecond), err))
		s.mu.Unlock()
	}
	return false
}

func (s *soak) encrypt(c *api.Client, pt string) {
	r, err := c.Logical().Write(s.path+"/encrypt/aes", map[string]interface{}{"plaintext": b64(pt)})
	if s.count("encrypt", err) {
		s.keep(r.Data["ciphertext"].(string), pt)
	}
}

func (s *soak) encryptBatch(c *api.Client, prefix string) {
	in := make([]interface{}, 20)
	for i := range in {
		in[i] = map[string]interface{}{"plaintext": b64(fmt.Sprintf("%s-%d", prefix, i))}
	}
	raw, _ := json.Marshal(map[string]interface{}{"batch_input": in})
	resp, err := c.Logical().WriteRaw(s.path+"/encrypt/aes", raw)
	var body struct {
		Data struct {
			BatchResults []map[string]interface{} `json:"batch_results"`
		} `json:"data"`
	}
	if resp != nil {
		defer resp.Body.Close()
		_ = resp.DecodeJSON(&body)
	}
	var re *api.ResponseError
	if errors.As(err, &re) && len(re.Errors) == 0 {
		// Every item failed: the reasons are the items' own (the response has no top-level errors).
		for _, item := range body.Data.BatchResults {
			if e, _ := item["error"].(string); e != "" {
				re.Errors = append(re.Errors, e)
				break
			}
		}
	}
	if !s.count("encrypt batch", err) {
		return
	}
	for i, item := range body.Data.BatchResults {
		if ct, _ := item["ciphertext"].(string); ct != "" {
			s.keep(ct, fmt.Sprintf("%s-%d", prefix, i))
		}
	}
}

func (s *soak) keep(ct, pt string) {
	s.mu.Lock()
	if _, dup := s.issued[ct]; !dup {
		s.order = append(s.order, ct)
	}
	s.issued[ct] = pt
	s.mu.Unlock()
}

// pick returns a random issued ciphertext.
func (s *soak) pick() (string, string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.order) == 0 {
		return "", "", false
	}
	ct := s.order[rand.IntN(len(s.order))]
	return ct, s.issued[ct], true
}

func (s *soak) decrypt(c *api.Client) {
	ct, pt, ok := s.pick()
	if !ok {
		return
	}
	r, err := c.Logical().Write(s.path+"/decrypt/aes", map[string]interface{}{"ciphertext": ct})
	if s.count("decrypt", err) && r.Data["plaintext"] != b64(pt) {
		s.mu.Lock()
		s.wrong = append(s.wrong, ct)
		s.mu.Unlock()
	}
}

func (s *soak) rewrap(c *api.Client) {
	ct, pt, ok := s.pick()
	if !ok {
		return
	}
	r, err := c.Logical().Write(s.path+"/rewrap/aes", map[string]interface{}{"ciphertext": ct})
	if s.count("rewrap", err) {
		s.keep(r.Data["ciphertext"].(string), pt)
	}
}

func (s *soak) sign(c *api.Client, input string) {
	r, err := c.Logical().Write(s.path+"/sign/ec", map[string]interface{}{"input": b64(input)})
	if !s.count("sign", err) {
		return
	}
	sig := r.Data["signature"].(string)
	s.mu.Lock()
	s.signatures[sig] = input
	s.mu.Unlock()
	r, err = c.Logical().Write(s.path+"/verify/ec", map[string]interface{}{"input": b64(input), "signature": sig})
	if s.count("verify", err) && r.Data["valid"] != true {
		s.mu.Lock()
		s.wrong = append(s.wrong, sig)
		s.mu.Unlock()
	}
}

// checkEverything decrypts every issued ciphertext and verifies every signature, in batches. An item answered
// with an error is tried again, up to ten times a second apart: the injected faults pass, an undecryptable
// ciphertext does not. What still fails then is lost; an answer with other data (or "valid": false) is lost at
// once.
func (s *soak) checkEverything() (lost, checked int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	type item struct{ ref, input, want, lastErr string }
	var decrypts, verifies []item
	for ct, pt := range s.issued {
		decrypts = append(decrypts, item{ref: ct, want: b64(pt)})
	}
	for sig, in := range s.signatures {
		verifies = append(verifies, item{ref: sig, input: b64(in)})
	}
	lose := func(path string, it item, why interface{}) {
		lost++
		if lost <= 5 {
			// The item alone, once more: its own error, which a batch whose items all fail does not carry
			// through the client library.
			single := map[string]interface{}{"ciphertext": it.ref}
			if it.input != "" {
				single = map[string]interface{}{"input": it.input, "signature": it.ref}
			}
			_, err := s.srv.Client.Logical().Write(s.path+path, single)
			log.Printf("lost: %s %.60s… → %v; alone: %v", path, it.ref, why, err)
		}
	}
	run := func(path string, items []item, body func(it item) map[string]interface{}, good func(r map[string]interface{}, it item) bool) {
		for attempt := 0; attempt < 10 && len(items) > 0; attempt++ {
			if attempt > 0 {
				time.Sleep(time.Second)
			}
			var retry []item
			for i := 0; i < len(items); i += 250 {
				chunk := items[i:min(i+250, len(items))]
				in := make([]interface{}, len(chunk))
				for j, it := range chunk {
					in[j] = body(it)
				}
				results, err := s.batch(path, in)
				if err != nil {
					for _, it := range chunk {
						it.lastErr = err.Error()
						retry = append(retry, it)
					}
					continue
				}
				for j, res := range results {
					it := chunk[j]
					switch msg, _ := res["error"].(string); {
					case msg != "":
						it.lastErr = msg
						retry = append(retry, it)
					case good(res, it):
						checked++
					default:
						lose(path, it, res)
					}
				}
			}
			items = retry
		}
		for _, it := range items {
			lose(path, it, it.lastErr)
		}
	}
	run("/decrypt/aes", decrypts, func(it item) map[string]interface{} { return map[string]interface{}{"ciphertext": it.ref} },
		func(r map[string]interface{}, it item) bool { return r["plaintext"] == it.want })
	run("/verify/ec", verifies, func(it item) map[string]interface{} {
		return map[string]interface{}{"input": it.input, "signature": it.ref}
	}, func(r map[string]interface{}, _ item) bool { return r["valid"] == true })
	return lost, checked
}

// cause503 names what a 503's message says failed: the backoff after a failed reconnection, or the PKCS#11 error.
func cause503(msg string) string {
	switch {
	case strings.Contains(msg, "next reconnection attempt"):
		return "waiting for the next reconnection"
	case strings.Contains(msg, "keeps being replaced"):
		return "connection replaced under the call"
	}
	if i := strings.Index(msg, "CKR_"); i >= 0 {
		end := i
		for end < len(msg) && (msg[end] == '_' || msg[end] >= 'A' && msg[end] <= 'Z') {
			end++
		}
		return msg[i:end]
	}
	if len(msg) > 60 {
		msg = msg[:60]
	}
	return msg
}

// batch sends a batch request and returns its per-item results, also when Vault answers 400 because every item
// failed (the client library then returns only the status).
func (s *soak) batch(path string, in []interface{}) ([]map[string]interface{}, error) {
	raw, err := json.Marshal(map[string]interface{}{"batch_input": in, "partial_failure_response_code": 207})
	if err != nil {
		return nil, err
	}
	resp, err := s.srv.Client.Logical().WriteRaw(s.path+path, raw)
	if resp == nil {
		return nil, err
	}
	defer resp.Body.Close()
	var body struct {
		Data struct {
			BatchResults []map[string]interface{} `json:"batch_results"`
		} `json:"data"`
		Errors []string `json:"errors"`
	}
	if derr := resp.DecodeJSON(&body); derr != nil || len(body.Data.BatchResults) != len(in) {
		if err == nil {
			err = fmt.Errorf("status %d: %v (%d results for %d items)", resp.StatusCode, body.Errors, len(body.Data.BatchResults), len(in))
		}
		return nil, err
	}
	return body.Data.BatchResults, nil
}

// crashes reads Vault's log for plugin processes that exited other than by the soak's kill, and prints the first
// crash trace found.
func (s *soak) crashes() (exits int, trace string) {
	text, _ := os.ReadFile(s.srv.LogPath)
	lines := strings.Split(string(text), "\n")
	for i, l := range lines {
		if strings.Contains(l, "plugin process exited") && strings.Contains(l, "error=") && !strings.Contains(l, "signal: killed") {
			exits++
		}
		if trace == "" && (strings.Contains(l, "SIGSEGV") || strings.Contains(l, "panic:") || strings.Contains(l, "fatal error:")) {
			trace = strings.Join(lines[max(i-10, 0):min(i+40, len(lines))], "\n")
		}
	}
	return exits, trace
}

func (s *soak) report(lost, checked int, elapsed time.Duration, kills int) (crashes int) {
	fmt.Printf("\nsoak: %s, PKCS#11 fault rate %g, plugin killed %d time(s)\n\n", elapsed.Round(time.Second), *faultRate, kills)
	fmt.Printf("| operation | ok | 400 | 503 | 500 (plugin restarting) | 500 (other) | transport |\n|---|---|---|---|---|---|---|\n")
	ops := make([]string, 0, len(s.tally))
	for op := range s.tally {
		ops = append(ops, op)
	}
	sort.Strings(ops)
	for _, op := range ops {
		t := s.tally[op]
		fmt.Printf("| %s | %d | %d | %d | %d | %d | %d |\n", op, t.ok.Load(), t.user.Load(), t.unavailable.Load(),
			t.killWindow.Load(), t.internal.Load(), t.transport.Load())
	}
	logText, _ := os.ReadFile(s.srv.LogPath)
	fmt.Printf("\nrecoveries in the server log: %d connection losses, %d reconnections, %d object retries\n",
		strings.Count(string(logText), "HSM connection lost"), strings.Count(string(logText), "reconnected to the HSM token"),
		strings.Count(string(logText), "repeating it"))
	k, err := s.srv.Client.Logical().Read(s.path + "/keys/aes")
	if err == nil && k != nil {
		latest := k.Data["latest_version"]
		fmt.Printf("key aes: latest version %v, %d versions stored\n", latest, len(k.Data["versions"].(map[string]interface{})))
		if fmt.Sprint(len(k.Data["versions"].(map[string]interface{}))) != fmt.Sprint(latest) {
			fmt.Println("VERSIONS NOT CONTIGUOUS")
			lost++
		}
	}
	if len(s.why503) > 0 {
		fmt.Println("503s by cause:")
		causes := make([]string, 0, len(s.why503))
		for c := range s.why503 {
			causes = append(causes, c)
		}
		sort.Slice(causes, func(i, j int) bool { return s.why503[causes[i]] > s.why503[causes[j]] })
		for _, c := range causes {
			fmt.Printf("  %7d  %s\n", s.why503[c], c)
		}
	}
	crashes, trace := s.crashes()
	fmt.Printf("ciphertexts and signatures checked: %d; lost: %d; wrong answers during the load: %d; "+
		"400s on valid ciphertexts or signatures: %d; unexplained 500s: %d; requests without an answer: %d; "+
		"plugin restarts other than the kill: %d\n",
		checked, lost, len(s.wrong), len(s.refused), len(s.internal), len(s.transport), crashes)
	for _, msg := range s.internal {
		if msg != "" {
			fmt.Println("  500:", msg)
		}
	}
	for i, msg := range s.refused {
		if i < 10 {
			fmt.Println("  400:", msg)
		}
	}
	for i, msg := range s.transport {
		if i < 30 {
			fmt.Println("  no answer:", msg)
		}
	}
	if trace != "" {
		fmt.Printf("crash trace from Vault's log:\n%s\n", trace)
	}
	if lost == 0 && len(s.wrong) == 0 && len(s.internal) == 0 && len(s.refused) == 0 && len(s.transport) == 0 && crashes == 0 {
		fmt.Println("PASS: nothing lost")
	} else {
		fmt.Println("FAIL")
	}
	return crashes
}

func (s *soak) must(path string, data map[string]interface{}) {
	if _, err := s.srv.Client.Logical().Write(s.path+"/"+path, data); err != nil {
		log.Fatalf("write %s: %v", path, err)
	}
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o600)
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func abs(p string) string {
	a, err := filepath.Abs(p)
	check(err)
	return a
}

func check(err error) {
	if err != nil {
		log.Fatal(err)
	}
}
