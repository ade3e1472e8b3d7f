package main

import (
	"encoding/json"
	"fmt"
	"log"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
)

// wrkWindow measures one endpoint with wrk, an HTTP load generator of its own (C, its own event loop): the server's
// throughput as a client outside Go's HTTP stack and outside this process sees it. conns connections over two
// threads, for the measurement duration after a short warm-up. An answer other than 2xx, or a socket error, fails
// the benchmark: a rate of errors is no rate.
func wrkWindow(srv *vaulttest.Server, conns int, method, path string, body map[string]interface{}) func() result {
	bin, err := exec.LookPath("wrk")
	if err != nil {
		log.Fatal("wrk is missing: make deps installs it")
	}
	script := fmt.Sprintf("wrk.method = %q\nwrk.headers[\"X-Vault-Token\"] = %q\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
		method, srv.RootToken)
	if body != nil {
		b, err := json.Marshal(body)
		check(err)
		script += fmt.Sprintf("wrk.body = %q\n", string(b))
	}
	f, err := os.CreateTemp(srv.Dir, "wrk-*.lua") // removed with the server's directory
	check(err)
	lua := f.Name()
	_, err = f.WriteString(script)
	check(err)
	check(f.Close())
	url := "http://" + srv.Addr + "/v1/" + path
	run := func(d time.Duration) float64 {
		out, err := exec.Command(bin, "-t", "2", "-c", strconv.Itoa(conns), "-d", fmt.Sprintf("%ds", max(1, int(d.Round(time.Second).Seconds()))), // whole seconds only
			"--timeout", "10s", "-s", lua, url).CombinedOutput()
		if err != nil {
			log.Fatalf("wrk %s: %v\n%s", path, err, out)
		}
		if m := wrkFailures.FindSubmatch(out); m != nil {
			log.Fatalf("wrk %s: %s\n%s", path, m[0], out)
		}
		m := wrkRate.FindSubmatch(out)
		if m == nil {
			log.Fatalf("wrk %s: no Requests/sec in its output:\n%s", path, out)
		}
		rate, err := strconv.ParseFloat(string(m[1]), 64)
		check(err)
		return rate
	}
	return func() result {
		run(min(*duration/5, time.Second)) // warm-up: connections made, caches filled
		return result{rate: run(*duration)}
	}
}

var (
	wrkRate     = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkFailures = regexp.MustCompile(`(Non-2xx or 3xx responses: \d+|Socket errors: .*)`)
)
