package main

import (
	"encoding/base64"
	"fmt"
	"os"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/rawhsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
)

// callsPerOperation is what one encryption, decryption or signature costs in PKCS#11 v2.40 round trips at the
// least: C_EncryptInit + C_Encrypt (Decrypt, Sign alike). A network HSM's ceiling for one session is one
// operation per two round trips.
const callsPerOperation = 2

// networkHSM measures the engine as a network HSM (Luna, nShield, CloudHSM) would see it: the plugin built with
// -tags cmkfaults, every PKCS#11 call delayed by delay (CMK_HSM_LATENCY) as by a round trip, on a token of its
// own, at each pool size. Each load is compared with its ceiling, the least of: pool_size operations per two
// round trips; the raw HSM through the same delay on as many sessions (a sleep overshoots its delay by about a
// tenth, so the model's true round trip is what the raw loop meets); and, where two cores cannot drive that much,
// the same load on the undelayed mount at the same pool size (taken in turn with it). A ratio under 0.8 means
// something keeps calls from being in flight together: a lock held across a call, a session per key, a lookup
// per request.
func networkHSM(srv *vaulttest.Server, bin string, delay time.Duration, sizes []int, plain vaulttest.Mount) []row {
	c := srv.Client
	const plugin = "cmk-network-hsm"
	check(srv.RegisterPluginOn(bin, plugin, []string{"CMK_PKCS11_LIBRARY=" + srv.SoftHSM.Library,
		"SOFTHSM2_CONF=" + srv.SoftHSM.Conf, "CMK_HSM_LATENCY=" + delay.String()}))
	m := vaulttest.Mount{Path: "nethsm", Label: fmt.Sprintf("nethsm-%d", os.Getpid()), PIN: "pin-nethsm-7Qx"}
	check(srv.SoftHSM.CreateToken(m.Label, m.PIN))
	check(c.Sys().Mount(m.Path, &api.MountInput{Type: plugin}))
	write(c, m.Path+"/config/hsm", map[string]interface{}{"token_label": m.Label, "pin": m.PIN})
	for _, p := range []string{m.Path, plain.Path} {
		write(c, p+"/keys/net", nil)
		write(c, p+"/keys/net-ec", map[string]interface{}{"type": "ecdsa-p256"})
	}
	raw, err := rawhsm.Open(srv.SoftHSM.Library, m.Label, m.PIN)
	check(err)
	defer raw.Close()
	defer func() { check(c.Sys().Unmount(m.Path)) }() // its plugin process ends with it
	raw.Delay = delay

	msg := base64.StdEncoding.EncodeToString(make([]byte, 64))
	batch := make([]interface{}, 1000)
	for i := range batch {
		batch[i] = map[string]interface{}{"plaintext": msg}
	}
	ciphertexts := func(p string) []interface{} {
		s := write(c, p+"/encrypt/net", map[string]interface{}{"batch_input": batch})
		out := make([]interface{}, len(batch))
		for i, it := range s.Data["batch_results"].([]interface{}) {
			out[i] = map[string]interface{}{"ciphertext": it.(map[string]interface{})["ciphertext"]}
		}
		return out
	}
	decIn := map[string][]interface{}{m.Path: ciphertexts(m.Path), plain.Path: ciphertexts(plain.Path)}
	type load struct {
		name    string
		clients func(pool int) int
		per     func(result) float64 // operations per second from a window's result
		fn      func(p string) func(*api.Client) error
	}
	loads := []load{
		{"batch encrypt, items/s (1,000 × 64 B, 4 clients)", func(int) int { return 4 }, items, func(p string) func(*api.Client) error {
			return func(cl *api.Client) error {
				_, err := cl.Logical().Write(p+"/encrypt/net", map[string]interface{}{"batch_input": batch})
				return err
			}
		}},
		{"batch decrypt, items/s (1,000 × 64 B, 4 clients)", func(int) int { return 4 }, items, func(p string) func(*api.Client) error {
			return func(cl *api.Client) error {
				_, err := cl.Logical().Write(p+"/decrypt/net", map[string]interface{}{"batch_input": decIn[p]})
				return err
			}
		}},
		{"single encrypt, requests/s (4 × pool_size clients)", func(n int) int { return 4 * n }, rate, func(p string) func(*api.Client) error {
			return func(cl *api.Client) error {
				_, err := cl.Logical().Write(p+"/encrypt/net", map[string]interface{}{"plaintext": msg})
				return err
			}
		}},
		{"sign ecdsa-p256, requests/s (4 × pool_size clients)", func(n int) int { return 4 * n }, rate, func(p string) func(*api.Client) error {
			return func(cl *api.Client) error {
				_, err := cl.Logical().Write(p+"/sign/net-ec", map[string]interface{}{"input": msg})
				return err
			}
		}},
	}

	var rows []row
	rt := delay.Seconds()
	for _, n := range sizes {
		for _, p := range []string{m.Path, plain.Path} {
			write(c, p+"/config/hsm", map[string]interface{}{"pool_size": n})
		}
		ceiling := float64(n) / (callsPerOperation * rt)
		rawOps, err := raw.MeasureGCM(make([]byte, 64), max(n, int(ceiling*2)), n)
		check(err)
		for _, l := range loads {
			w := alternate(window(srv, l.clients(n), l.fn(m.Path)), window(srv, l.clients(n), l.fn(plain.Path)))
			var ours, cpu, ratios []float64
			for i := range w[0] {
				o, u := l.per(w[0][i]), l.per(w[1][i])
				ours, cpu = append(ours, o), append(cpu, u)
				ratios = append(ratios, o/min(ceiling, rawOps, u))
			}
			ratio := median(ratios)
			ok := ratio >= 0.8
			limit := "the HSM"
			if median(cpu) < min(ceiling, rawOps) {
				limit = "CPU"
			}
			rows = append(rows, row{name: fmt.Sprintf("%s per call, pool_size %d: %s", delay, n, l.name), ours: format(median(ours)),
				ref: fmt.Sprintf("ceiling %d/(2 × %s) = %.0f; no delay, same pool: %s; raw HSM, same delay, %d sessions: %.0f (limit: %s)",
					n, delay, ceiling, format(median(cpu)), n, rawOps, limit),
				ratio: fmt.Sprintf("%.2f", ratio), target: "≥ 0.80", pass: &ok})
		}
	}

	// One client: a single encryption's latency against two of the model's round trips (as the raw HSM takes them
	// through the same delay, one session: a sleep overshoots its delay a little), beside the same request with no
	// delay: what Vault, its transport and the engine add.
	write(c, m.Path+"/config/hsm", map[string]interface{}{"pool_size": 4})
	write(c, plain.Path+"/config/hsm", map[string]interface{}{"pool_size": 4})
	oneRaw, err := raw.MeasureGCM(make([]byte, 64), 500, 1)
	check(err)
	trip := 1000 / oneRaw / callsPerOperation // ms
	w := alternate(window(srv, 1, loads[2].fn(m.Path)), window(srv, 1, loads[2].fn(plain.Path)))
	var p50s, bare []float64
	for i := range w[0] {
		p50s, bare = append(p50s, w[0][i].p50), append(bare, w[1][i].p50)
	}
	lat := median(p50s)
	floor := callsPerOperation * trip
	ok := lat/floor <= 1.5
	rows = append(rows, row{name: fmt.Sprintf("%s per call: single encrypt p50 latency, ms (1 client)", delay), ours: format(lat),
		ref:   fmt.Sprintf("two round trips (C_EncryptInit + C_Encrypt, raw HSM through the same delay): %s; no delay: %s", format(floor), format(median(bare))),
		ratio: fmt.Sprintf("%.2f", lat/floor), target: "≤ 1.50", pass: &ok})
	return rows
}
