//go:build cmkfaults

package hsm

import (
	"os"
	"strconv"
	"strings"
	"time"
)

// A plugin built with -tags cmkfaults (the soak test's, never a release) fails PKCS#11 calls at random with the
// errors the recovery rules cover, to prove recovery under load on a real server. The rate (0…1) is read every
// half second from the file named by CMK_FAULT_RATE_FILE, so that the soak can stop the faults, as a real HSM
// comes back, before it checks that nothing was lost.
func init() {
	path := os.Getenv("CMK_FAULT_RATE_FILE")
	if path == "" {
		return
	}
	wrapCalls = func(c pkcs11API) pkcs11API {
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
		return f
	}
}
