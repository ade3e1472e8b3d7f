//go:build cmkfaults

package hsm

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// A plugin built with -tags cmkfaults (the soak's and the benchmark's, never a release) can be made to behave as
// a worse HSM than the one it has, through its environment:
//   - CMK_FAULT_RATE_FILE names a file holding a rate (0…1), read every half second, at which PKCS#11 calls fail
//     at random with the errors the recovery rules cover: the soak proves recovery under load on a real server,
//     and stops the faults, as a real HSM comes back, before it checks that nothing was lost;
//   - CMK_HSM_LATENCY (a Go duration, such as 1ms) delays every call by that much, as a network HSM's round trip:
//     the benchmark's network-HSM model.
func init() {
	path := os.Getenv("CMK_FAULT_RATE_FILE")
	var delay time.Duration
	if v := os.Getenv("CMK_HSM_LATENCY"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			panic(fmt.Sprintf("CMK_HSM_LATENCY=%q: not a duration", v))
		}
		delay = d
	}
	if path == "" && delay == 0 {
		return
	}
	// The delay is outermost: a fault injected in front of the module still costs its round trip, as a real
	// HSM's error does.
	wrapCalls = func(c pkcs11API) pkcs11API {
		latent := func(c pkcs11API) pkcs11API {
			if delay > 0 {
				return latentCalls{pkcs11API: c, delay: delay}
			}
			return c
		}
		if path == "" {
			return latent(c)
		}
		f := newFaultyCalls(c)
		go func() {
			for ; ; time.Sleep(500 * time.Millisecond) {
				b, err := os.ReadFile(path)
				rate, perr := strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
				if err != nil || perr != nil {
					rate = 0
				}
				f.mu.Lock()
				f.rate = rate
				f.mu.Unlock()
			}
		}()
		return latent(f)
	}
}
