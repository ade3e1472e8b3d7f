//go:build cmkfaults

package hsm

import (
	"math/rand/v2"
	"sync"

	"github.com/miekg/pkcs11"
)

// faultyCalls wraps the real module's calls and makes chosen functions return a PKCS#11 error, as a failing HSM
// would: named functions once or until cleared (unit tests), or any of them at random at a given rate (the
// soak test's plugin, built with the cmkfaults tag). Everything else reaches the real token. Only builds with
// the cmkfaults tag have it (the unit tests and the soak's plugin): a release never wraps its calls.
type faultyCalls struct {
	pkcs11API
	mu     sync.Mutex
	faults map[string]fault
	holds  map[string]chan struct{} // calls that wait, before reaching the module, until the channel closes
	held   map[string]int           // calls waiting now
	calls  map[string]int
	faulty int     // faults injected
	blind  int     // searches (C_FindObjects) still to answer with nothing, as a module that lost sight of objects
	rate   float64 // chance that any wrapped call fails with one of randomFaults
	rng    *rand.Rand
}

// randomFaults are what the random mode injects: each class the recovery rules cover.
var randomFaults = []uint{pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_USER_NOT_LOGGED_IN,
	pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_TOKEN_NOT_PRESENT}

func newFaultyCalls(real pkcs11API) *faultyCalls {
	return &faultyCalls{pkcs11API: real, faults: map[string]fault{}, holds: map[string]chan struct{}{}, held: map[string]int{}, calls: map[string]int{}, rng: rand.New(rand.NewPCG(1, 2))}
}

type fault struct {
	rv    uint
	times int // how many more calls fail; -1: until cleared
}

// fail makes the named functions return rv for the next times calls each (-1: until clear).
func (f *faultyCalls) fail(rv uint, times int, fns ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, fn := range fns {
		f.faults[fn] = fault{rv, times}
	}
}

func (f *faultyCalls) clear() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.faults = map[string]fault{}
}

func (f *faultyCalls) count(fn string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[fn]
}

func (f *faultyCalls) injected() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.faulty
}

func (f *faultyCalls) total() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		n += c
	}
	return n
}

// hold makes calls of fn wait until release is called, as a slow HSM operation would.
func (f *faultyCalls) hold(fn string) (release func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ch := make(chan struct{})
	f.holds[fn] = ch
	return func() {
		f.mu.Lock()
		delete(f.holds, fn)
		f.mu.Unlock()
		close(ch)
	}
}

// waiting is how many calls of fn are held now.
func (f *faultyCalls) waiting(fn string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.held[fn]
}

// hit records a call of fn and returns the error it is to fail with, if any.
func (f *faultyCalls) hit(fn string) error { return f.hitWith(fn, true) }

// hitNamed is hit for a function the random mode leaves alone: it fails only where a test names it.
func (f *faultyCalls) hitNamed(fn string) error { return f.hitWith(fn, false) }

func (f *faultyCalls) hitWith(fn string, random bool) error {
	f.mu.Lock()
	if ch, ok := f.holds[fn]; ok {
		f.held[fn]++
		f.mu.Unlock()
		<-ch
		f.mu.Lock()
		f.held[fn]--
	}
	defer f.mu.Unlock()
	f.calls[fn]++
	if random && f.rate > 0 && f.rng.Float64() < f.rate {
		f.faulty++
		return pkcs11.Error(randomFaults[f.rng.IntN(len(randomFaults))])
	}
	ft, ok := f.faults[fn]
	if !ok || ft.times == 0 {
		return nil
	}
	if ft.times > 0 {
		ft.times--
		f.faults[fn] = ft
	}
	f.faulty++
	return pkcs11.Error(ft.rv)
}

func (f *faultyCalls) GetSlotList(present bool) ([]uint, error) {
	if err := f.hit("GetSlotList"); err != nil {
		return nil, err
	}
	return f.pkcs11API.GetSlotList(present)
}

func (f *faultyCalls) OpenSession(slot uint, flags uint) (pkcs11.SessionHandle, error) {
	if err := f.hit("OpenSession"); err != nil {
		return 0, err
	}
	return f.pkcs11API.OpenSession(slot, flags)
}

// GetSessionInfo is how a session's login is asked after (loginLost, Check); never failed at random, so that
// the soak's fault mix stays what it was.
func (f *faultyCalls) GetSessionInfo(sh pkcs11.SessionHandle) (pkcs11.SessionInfo, error) {
	if err := f.hitNamed("GetSessionInfo"); err != nil {
		return pkcs11.SessionInfo{}, err
	}
	return f.pkcs11API.GetSessionInfo(sh)
}

func (f *faultyCalls) Login(sh pkcs11.SessionHandle, userType uint, pin string) error {
	if err := f.hit("Login"); err != nil {
		return err
	}
	return f.pkcs11API.Login(sh, userType, pin)
}

func (f *faultyCalls) GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error) {
	if err := f.hit("GenerateKeyPair"); err != nil {
		return 0, 0, err
	}
	return f.pkcs11API.GenerateKeyPair(sh, m, public, private)
}

func (f *faultyCalls) GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, tmpl []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	if err := f.hit("GenerateKey"); err != nil {
		return 0, err
	}
	return f.pkcs11API.GenerateKey(sh, m, tmpl)
}

func (f *faultyCalls) CopyObject(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, tmpl []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	if err := f.hit("CopyObject"); err != nil {
		return 0, err
	}
	return f.pkcs11API.CopyObject(sh, o, tmpl)
}

func (f *faultyCalls) EncryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	if err := f.hit("EncryptInit"); err != nil {
		return err
	}
	return f.pkcs11API.EncryptInit(sh, m, o)
}

func (f *faultyCalls) DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	if err := f.hit("DecryptInit"); err != nil {
		return err
	}
	return f.pkcs11API.DecryptInit(sh, m, o)
}

func (f *faultyCalls) SignInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	if err := f.hit("SignInit"); err != nil {
		return err
	}
	return f.pkcs11API.SignInit(sh, m, o)
}

func (f *faultyCalls) GenerateRandom(sh pkcs11.SessionHandle, n int) ([]byte, error) {
	if err := f.hit("GenerateRandom"); err != nil {
		return nil, err
	}
	return f.pkcs11API.GenerateRandom(sh, n)
}

// hideFromSearches makes the next n searches find nothing, whatever the token holds.
func (f *faultyCalls) hideFromSearches(n int) {
	f.mu.Lock()
	f.blind = n
	f.mu.Unlock()
}

func (f *faultyCalls) FindObjects(sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, bool, error) {
	f.mu.Lock()
	blind := f.blind > 0
	if blind {
		f.blind--
	}
	f.mu.Unlock()
	hs, more, err := f.pkcs11API.FindObjects(sh, max)
	f.mu.Lock()
	f.calls["FindObjects"]++
	f.calls["FindObjects objects"] += len(hs) // objects a search visited
	f.mu.Unlock()
	if blind && err == nil {
		return nil, false, nil
	}
	return hs, more, err
}

func (f *faultyCalls) FindObjectsInit(sh pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) error {
	if err := f.hit("FindObjectsInit"); err != nil {
		return err
	}
	return f.pkcs11API.FindObjectsInit(sh, tmpl)
}

func (f *faultyCalls) EncryptSized(sh pkcs11.SessionHandle, message []byte, size int) ([]byte, error) {
	if err := f.hit("Encrypt"); err != nil {
		return nil, err
	}
	return f.pkcs11API.EncryptSized(sh, message, size)
}

func (f *faultyCalls) Decrypt(sh pkcs11.SessionHandle, cipher []byte) ([]byte, error) {
	if err := f.hit("Decrypt"); err != nil {
		return nil, err
	}
	return f.pkcs11API.Decrypt(sh, cipher)
}

func (f *faultyCalls) Sign(sh pkcs11.SessionHandle, message []byte) ([]byte, error) {
	if err := f.hit("Sign"); err != nil {
		return nil, err
	}
	return f.pkcs11API.Sign(sh, message)
}

func (f *faultyCalls) CloseSession(sh pkcs11.SessionHandle) error {
	if err := f.hit("CloseSession"); err != nil {
		return err
	}
	return f.pkcs11API.CloseSession(sh)
}
