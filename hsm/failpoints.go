//go:build cmkfaults

package hsm

import (
	"os"
	"strconv"
)

// A plugin built with -tags cmkfaults (the soak test's, never a release) fails PKCS#11 calls at random at the
// rate CMK_FAULT_RATE (0…1), with the errors the recovery rules cover, to prove recovery under load on a real
// server.
func init() {
	rate, err := strconv.ParseFloat(os.Getenv("CMK_FAULT_RATE"), 64)
	if err != nil || rate <= 0 {
		return
	}
	wrapCalls = func(c pkcs11API) pkcs11API {
		f := newFaultyCalls(c)
		f.rate = rate
		return f
	}
}
