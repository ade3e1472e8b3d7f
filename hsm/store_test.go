package hsm

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/miekg/pkcs11"
)

// SoftHSM 2.6.1 re-reads its file store on every search; a search racing an object's creation failed the creation
// (CKR_GENERAL_ERROR, CKR_TEMPLATE_INCONSISTENT) and hid objects the token held, and in 10-minute soaks left a
// version's key refused as of another type or gone while storage referenced it. Objects are made one at a time, as
// the engine makes them, while other sessions search for objects already made: every creation succeeds at once
// and every search finds what it looks for.
func TestSearchesDuringCreationsMissNothing(t *testing.T) {
	tok, _ := newToken(t, 4)
	ctx := context.Background()
	caps, err := tok.Capabilities(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu      sync.Mutex
		made    [][]byte
		failed  []string
		nFailed int
		done    atomic.Bool
		wg      sync.WaitGroup
		searchN atomic.Int64
	)
	record := func(format string, args ...interface{}) {
		mu.Lock()
		nFailed++
		if len(failed) < 10 {
			failed = append(failed, fmt.Sprintf(format, args...))
		}
		mu.Unlock()
	}
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !done.Load() {
				mu.Lock()
				if len(made) == 0 {
					mu.Unlock()
					continue
				}
				id := made[rand.IntN(len(made))]
				mu.Unlock()
				var found []pkcs11.ObjectHandle
				err := tok.do(ctx, "search", func(c pkcs11API, s session) error {
					var err error
					found, err = findObjects(c, s.h, kindAES.searchTemplate(id), 0)
					return err
				})
				searchN.Add(1)
				if err != nil || len(found) != 1 {
					record("search for %x: %d objects, %v", id, len(found), err)
				}
			}
		}()
	}
	for i := range 200 {
		id := randomID(t)
		tmpl := aesKeyTemplate(templateOptions{allowedMechanisms: caps.AllowedMechanisms}, 256, id, fmt.Sprintf("cmk/test/race/v%d", i))
		err := tok.do(ctx, "C_GenerateKey", func(c pkcs11API, s session) error {
			_, err := c.GenerateKey(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, tmpl)
			return err
		})
		if err != nil {
			record("creation %d: %v", i, err)
			continue
		}
		mu.Lock()
		made = append(made, id)
		mu.Unlock()
	}
	done.Store(true)
	wg.Wait()
	for _, id := range made { // and each one still serves
		if _, _, err := tok.EncryptGCM(ctx, id, make([]byte, 12), nil, []byte("x")); err != nil {
			record("encrypt with %x after the run: %v", id, err)
		}
	}
	if objs, err := tok.ListObjects(ctx, "cmk/test/race/"); err != nil || len(objs) != len(made) {
		record("the token holds %d objects made by the run, %d creations succeeded: %v", len(objs), len(made), err)
	}
	if len(failed) > 0 {
		t.Fatalf("%d searches while %d objects were made; %d failures, among them:\n%s", searchN.Load(), len(made), nFailed, strings.Join(failed, "\n"))
	}
	t.Logf("%d searches while %d objects were made", searchN.Load(), len(made))
}
