package hsm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// Working copies are session-object copies of hot AES keys, made inside the token with C_CopyObject
// (CKA_TOKEN=false): still sensitive and never extractable, they never leave the token. SoftHSM re-reads a token
// object's file on every use and serves a session object about 2.7 times faster; a network HSM serves both alike.
// So copies are made only where the token's probe measured them faster (probeWorkingCopies), up to the mount's
// limit (Config.WorkingCopies, 0 for none), least recently used first out.
//
// A copy is a cache and never outlives what it copies may serve: the key model bars a version's copies when the
// version stops serving (disable, scheduled destruction, the key's disable or deletion: WorkingCopiesAllowed),
// DestroyKeys destroys them first and bars the version for good, and every copy dies with the session that holds it (copyOwner),
// which closes at every reconnection and at Close. A copy is destroyed only once no call uses it, and only after
// the token confirms, in the same session, that the handle still names a session object under the version's
// CKA_ID: a handle number the module gave to another object since is never destroyed, a token object never.
type workingCopies struct {
	limit int

	mu     sync.RWMutex
	byID   map[string]*workingCopy // by the original's CKA_ID
	seen   map[string]struct{}     // versions used once without a copy: the next use makes one
	barred map[string]struct{}     // versions that serve nothing now (the model said so), or destroyed
	making bool                    // a copy is being made: one at a time
	tick   atomic.Uint64           // use counter, for least-recently-used eviction

	// off: the token's probe found copies no faster, or they cannot be made here: none is made.
	off atomic.Bool

	// owner serialises every call on the session that holds the copies (a session is one caller's at a time).
	owner sync.Mutex
}

// workingCopy is one session-object copy of a version's AES key.
type workingCopy struct {
	id      string // the original's CKA_ID
	h       pkcs11.ObjectHandle
	owner   session       // the session holding it: the copy lives as long as that session
	lastUse atomic.Uint64 // workingCopies.tick at its latest use

	// use is held for reading by every call using the copy, and for writing while it is retired: a copy is never
	// destroyed under a call, nor used after (gone).
	use  sync.RWMutex
	gone bool
}

const (
	// DefaultWorkingCopies bounds the working copies a mount keeps on its token unless the operator says otherwise.
	DefaultWorkingCopies = 1024
	// workingCopyMinSpeedup: copies are used where the probe measured them at least this much faster than their
	// originals; below it, the extra objects and calls are not worth it.
	workingCopyMinSpeedup = 1.2
	// maxSeen bounds the versions remembered as used once (a few MB at most, whatever the limit).
	maxSeen = 1 << 16
	// copyTimeout bounds a copy's making or retiring, which no request waits for.
	copyTimeout = 30 * time.Second
)

// copyTemplate makes a copy a session object. It keeps its original's CKA_ID and label (tokens refuse changing
// them on the unmodifiable objects the engine makes: SoftHSM answers CKR_ATTRIBUTE_READ_ONLY), and every search the
// engine makes names CKA_TOKEN=true, so none meets a copy. Sensitivity, extractability and usage are the original's:
// C_CopyObject keeps them; a copy is checked to be a sensitive, non-extractable session object under the version's
// CKA_ID before use (checkCopy).
func copyTemplate() []*pkcs11.Attribute {
	return []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false)}
}

// aesKey returns the handle to use for version id's AES key in session s: its working copy when there is one
// (release ends the use), else the token object found by findKey. A version used for the second time without a
// copy gets one, made aside.
func (t *Token) aesKey(c pkcs11API, s session, id []byte) (h pkcs11.ObjectHandle, release func(), err error) {
	if wc := t.copies.acquire(id, s); wc != nil {
		return wc.h, wc.use.RUnlock, nil
	}
	if h, err = t.findKey(c, s, kindAES, id); err != nil {
		return 0, nil, err
	}
	if t.copies.wanted(id) {
		go t.makeCopy(bytes.Clone(id))
	}
	return h, func() {}, nil
}

// acquire returns version id's copy, held for use in session s, or nil.
func (w *workingCopies) acquire(id []byte, s session) *workingCopy {
	if w.limit == 0 {
		return nil
	}
	w.mu.RLock()
	wc := w.byID[string(id)]
	w.mu.RUnlock()
	if wc == nil {
		return nil
	}
	wc.use.RLock()
	if wc.gone || wc.owner.gen != s.gen || wc.owner.epoch != s.epoch {
		wc.use.RUnlock()
		return nil
	}
	wc.lastUse.Store(w.tick.Add(1))
	return wc
}

// wanted records a use of version id without a copy, and says whether to make one now (the caller then makes it:
// making is set).
func (w *workingCopies) wanted(id []byte) bool {
	if w.limit == 0 || w.off.Load() {
		return false
	}
	k := string(id)
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, barred := w.barred[k]; barred {
		return false
	}
	if _, ok := w.seen[k]; !ok {
		if w.seen == nil || len(w.seen) >= min(4*w.limit, maxSeen) {
			w.seen = map[string]struct{}{} // forget who was seen once: a cold version starts again
		}
		w.seen[k] = struct{}{}
		return false
	}
	if w.making {
		return false // seen stays: its next use asks again
	}
	delete(w.seen, k)
	w.making = true
	return true
}

// makeCopy makes version id's working copy in the owner session, if the token's probe found copies faster, and
// retires the least recently used copy when the limit is passed. It runs aside: no request waits for it.
func (t *Token) makeCopy(id []byte) {
	w := &t.copies
	defer func() {
		w.mu.Lock()
		w.making = false
		w.mu.Unlock()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), copyTimeout)
	defer cancel()
	probe, err := t.WorkingCopies(ctx)
	if err != nil {
		return // asked again at the version's next uses
	}
	if !probe.Faster() {
		w.off.Store(true)
		return
	}
	w.owner.Lock()
	defer w.owner.Unlock()
	owner, err := t.pool.copyOwnerSession()
	if err != nil {
		if rv, ok := rvOf(err); ok && rv == pkcs11.CKR_SESSION_COUNT {
			t.log.Warn("the token has no session to spare for working copies: none are made", "token", t.Info().Label)
			w.off.Store(true)
		}
		return
	}
	var h pkcs11.ObjectHandle
	var refused error // the token refused the copy itself: none is made again
	leftover := false // a copy unfit for use that could not be destroyed
	err = t.pool.run(ctx, owner, func(c pkcs11API, s session) error {
		orig, err := t.findKey(c, s, kindAES, id)
		if err != nil {
			return err
		}
		if h, err = c.CopyObject(s.h, orig, copyTemplate()); err != nil {
			h = 0
			if refusesCopies(err) {
				refused = err
			}
			return err
		}
		if err := checkCopy(c, s, h, id); err != nil {
			if derr := c.DestroyObject(s.h, h); derr != nil {
				leftover = true
			}
			h = 0
			if errors.Is(err, errNotACopy) {
				refused = err
			}
			return err
		}
		return nil
	})
	if leftover {
		t.log.Warn("a copy unfit for use could not be destroyed: closing the session holding the copies")
		t.dropAllCopiesLocked(owner)
	}
	if err != nil {
		if refused != nil {
			t.log.Warn("a working copy could not be made: none are made on this token", "error", refused)
			w.off.Store(true)
		}
		return
	}
	wc := &workingCopy{id: string(id), h: h, owner: owner}
	wc.lastUse.Store(w.tick.Add(1))
	var stale []*workingCopy
	w.mu.Lock()
	_, barred := w.barred[wc.id]
	if had := w.byID[wc.id]; barred || (had != nil && had.owner == owner) {
		w.mu.Unlock()
		t.retireCopy(ctx, wc) // barred while it was being made
		return
	}
	if w.byID == nil {
		w.byID = map[string]*workingCopy{}
	}
	var lru *workingCopy
	for k, other := range w.byID {
		if other.owner != owner {
			stale = append(stale, other) // died with an earlier connection's owner session
			delete(w.byID, k)
			continue
		}
		if lru == nil || other.lastUse.Load() < lru.lastUse.Load() {
			lru = other
		}
	}
	w.byID[wc.id] = wc
	if len(w.byID) > w.limit && lru != nil {
		delete(w.byID, lru.id)
	} else {
		lru = nil
	}
	w.mu.Unlock()
	for _, s := range stale {
		s.use.Lock()
		s.gone = true
		s.use.Unlock()
	}
	if lru != nil {
		t.retireCopy(ctx, lru)
	}
}

// checkCopy refuses a copy that is not what a working copy must be: a session object, sensitive, not
// extractable (a token whose C_CopyObject dropped either would leave the key readable), under the version's CKA_ID
// (a handle the module gave to another object meanwhile is never taken for the version's key).
func checkCopy(c pkcs11API, s session, h pkcs11.ObjectHandle, id []byte) error {
	a, err := c.GetAttributeValue(s.h, h, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil), pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil), pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
	})
	if err != nil {
		return err
	}
	if boolean(a[0].Value) || !boolean(a[1].Value) || boolean(a[2].Value) {
		return fmt.Errorf("%w: the token's copy is not a sensitive, non-extractable session object", errNotACopy)
	}
	if !bytes.Equal(a[3].Value, id) {
		return fmt.Errorf("%w: the copy does not carry the version's CKA_ID", errNotACopy)
	}
	return nil
}

// refusesCopies: answers to C_CopyObject that say the token will not make such a copy, whatever the key: copies
// are then turned off. Other failures (a fault, a full memory) skip this copy only.
func refusesCopies(err error) bool {
	rv, ok := rvOf(err)
	if !ok {
		return false
	}
	switch rv {
	case pkcs11.CKR_FUNCTION_NOT_SUPPORTED, pkcs11.CKR_ATTRIBUTE_READ_ONLY, pkcs11.CKR_ACTION_PROHIBITED,
		pkcs11.CKR_TEMPLATE_INCONSISTENT, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, pkcs11.CKR_ATTRIBUTE_VALUE_INVALID:
		return true
	}
	return false
}

var errNotACopy = errors.New("not a working copy")

// retireCopy destroys a copy no longer in the table, once no call uses it. The caller holds the owner lock. If the
// destruction fails, the owner session is closed, which destroys every copy it holds.
func (t *Token) retireCopy(ctx context.Context, wc *workingCopy) {
	wc.use.Lock()
	wc.gone = true
	wc.use.Unlock()
	err := t.pool.run(ctx, wc.owner, func(c pkcs11API, s session) error {
		// What passed checkCopy when it was made passes it still, unless the handle now names another object.
		if err := checkCopy(c, s, wc.h, []byte(wc.id)); err != nil {
			return err
		}
		return c.DestroyObject(s.h, wc.h)
	})
	if err != nil && !errors.Is(err, errStale) {
		t.log.Warn("a working copy could not be destroyed: closing the session holding the copies", "error", err)
		t.dropAllCopiesLocked(wc.owner)
	}
}

// dropAllCopiesLocked forgets every copy held by owner and closes that session, which destroys them on the
// token. The caller holds the owner lock.
func (t *Token) dropAllCopiesLocked(owner session) {
	w := &t.copies
	var gone []*workingCopy
	w.mu.Lock()
	for k, wc := range w.byID {
		if wc.owner == owner {
			gone = append(gone, wc)
			delete(w.byID, k)
		}
	}
	w.mu.Unlock()
	for _, wc := range gone {
		wc.use.Lock()
		wc.gone = true
		wc.use.Unlock()
	}
	t.pool.closeCopyOwner(owner)
}

// dropCopies destroys every working copy: after an object handle proved stale, any of them may be.
func (t *Token) dropCopies() {
	if t.copies.limit == 0 {
		return
	}
	t.copies.owner.Lock()
	defer t.copies.owner.Unlock()
	t.pool.mu.Lock()
	owner := t.pool.copyOwner
	t.pool.mu.Unlock()
	if owner.h != 0 {
		t.dropAllCopiesLocked(owner)
	}
}

// WorkingCopiesAllowed bars (allowed false) or allows again version id's working copies. Barring destroys its
// copy, if any, before it returns, and no copy of it is made until it is allowed again: the key model bars a
// version that stops serving (its disable, its scheduled destruction, its key's disable or deletion), so that no
// copy outlives that. Calls made with a snapshot from before the bar may still use the token object.
func (t *Token) WorkingCopiesAllowed(id []byte, allowed bool) {
	if t.copies.limit == 0 {
		return
	}
	if allowed {
		t.copies.mu.Lock()
		delete(t.copies.barred, string(id))
		t.copies.mu.Unlock()
		return
	}
	t.barCopies(id)
}

// barCopies bars version id's copies and destroys the one there is, waiting for a copy being made (the owner lock).
func (t *Token) barCopies(id []byte) {
	w := &t.copies
	if w.limit == 0 {
		return
	}
	k := string(id)
	w.mu.Lock()
	if w.barred == nil {
		w.barred = map[string]struct{}{}
	}
	w.barred[k] = struct{}{}
	delete(w.seen, k)
	wc := w.byID[k] // out of the table at once: no call takes it from now on
	delete(w.byID, k)
	w.mu.Unlock()
	w.owner.Lock()
	defer w.owner.Unlock()
	if wc != nil {
		ctx, cancel := context.WithTimeout(context.Background(), copyTimeout)
		defer cancel()
		t.retireCopy(ctx, wc)
	}
}

// unbarCopies lifts the bar barCopies set while a version's objects were looked at and kept.
func (t *Token) unbarCopies(id []byte) {
	t.copies.mu.Lock()
	delete(t.copies.barred, string(id))
	t.copies.mu.Unlock()
}

// WorkingCopiesHeld is the number of working copies in use now.
func (t *Token) WorkingCopiesHeld() int {
	t.copies.mu.RLock()
	defer t.copies.mu.RUnlock()
	n := 0
	cur := t.pool.epoch.Load()
	for _, wc := range t.copies.byID {
		if wc.owner.epoch == cur {
			n++
		}
	}
	return n
}

// WorkingCopyProbe is what the token's probe measured of working copies.
type WorkingCopyProbe struct {
	// Speedup is a copy's AES-GCM rate over its token original's, in the same session and run; 0 if not measured.
	Speedup float64
	// Refused says why copies were not measured or cannot be made here; empty when measured.
	Refused string
}

// Faster reports whether copies are worth using on this token.
func (p WorkingCopyProbe) Faster() bool { return p.Refused == "" && p.Speedup >= workingCopyMinSpeedup }

// WorkingCopies returns what the token's working-copy probe measured, probing it on first need (once per token
// and process).
func (t *Token) WorkingCopies(ctx context.Context) (WorkingCopyProbe, error) {
	caps, err := t.Capabilities(ctx)
	if err != nil {
		return WorkingCopyProbe{}, err
	}
	state := t.pool.tokenState()
	state.copyProbeMu.Lock()
	defer state.copyProbeMu.Unlock()
	if state.copyProbe == nil {
		p, err := t.probeWorkingCopies(ctx, caps)
		if err != nil {
			return WorkingCopyProbe{}, err // asked again next time
		}
		state.copyProbe = &p
		t.log.Info("HSM token working copies", "token", t.Info().Label, "speedup", fmt.Sprintf("%.2f", p.Speedup), "refused", p.Refused)
	}
	return *state.copyProbe, nil
}

// probeWorkingCopies makes a throwaway AES token key and its copy, checks the copy is what a working copy must be,
// and times AES-GCM encryptions with each in the same session, taking each one's best of a few rounds.
func (t *Token) probeWorkingCopies(ctx context.Context, c *Capabilities) (WorkingCopyProbe, error) {
	switch {
	case !c.Offers(pkcs11.CKM_AES_KEY_GEN) || !c.Offers(pkcs11.CKM_AES_GCM):
		return WorkingCopyProbe{Refused: "the token makes no AES-GCM keys"}, nil
	case c.quirks.reinitAfterDestroy || c.quirks.oneSession:
		// Every copy retired would re-initialise the module; with one session at a time, a second session only waits.
		return WorkingCopyProbe{Refused: "this module renumbers objects after a destruction and serves one session at a time"}, nil
	}
	id := []byte("cmk-copy-probe")
	var probe WorkingCopyProbe
	err := t.doObjects(ctx, "probe working copies", func(p pkcs11API, s session) error {
		probe = WorkingCopyProbe{}
		orig, err := p.GenerateKey(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)},
			aesKeyTemplate(templateOptions{allowedMechanisms: c.AllowedMechanisms}, 256, id, "cmk-copy-probe"))
		if err != nil {
			if classify(err) != classOther {
				return err
			}
			probe.Refused = fmt.Sprintf("a probe key could not be made: %v", err)
			return nil
		}
		defer func() { _ = p.DestroyObject(s.h, orig) }()
		cp, err := p.CopyObject(s.h, orig, copyTemplate())
		if err != nil {
			if classify(err) != classOther {
				return err
			}
			probe.Refused = fmt.Sprintf("C_CopyObject: %v", err)
			if rv, _ := rvOf(err); rv == pkcs11.CKR_ATTRIBUTE_READ_ONLY {
				// SoftHSM 2.6: nothing of an unmodifiable object may change in a copy, CKA_TOKEN included.
				probe.Refused = fmt.Sprintf("the token copies no attribute change into an unmodifiable key, as the engine makes every key (C_CopyObject: %v)", err)
			}
			if !refusesCopies(err) {
				probe.Refused += " (taken as a refusal: asked once per token and process)"
			}
			return nil
		}
		defer func() { _ = p.DestroyObject(s.h, cp) }()
		if err := checkCopy(p, s, cp, id); err != nil {
			if errors.Is(err, errNotACopy) {
				probe.Refused = err.Error()
				return nil
			}
			return err
		}
		var best [2]time.Duration
		for round := 0; round < 3; round++ {
			for i, h := range []pkcs11.ObjectHandle{orig, cp} {
				took, err := timeEncryptions(p, s, h, 32)
				if err != nil {
					if classify(err) != classOther {
						return err
					}
					probe.Refused = fmt.Sprintf("AES-GCM with the probe key: %v", err)
					return nil
				}
				if best[i] == 0 || took < best[i] {
					best[i] = took
				}
			}
		}
		probe.Speedup = float64(best[0]) / float64(max(best[1], time.Nanosecond))
		return nil
	})
	return probe, err
}

// timeEncryptions times n AES-GCM encryptions of 64 bytes with key h.
func timeEncryptions(p pkcs11API, s session, h pkcs11.ObjectHandle, n int) (time.Duration, error) {
	nonce, data := make([]byte, GCMNonceSize), make([]byte, 64)
	start := time.Now()
	for i := 0; i < n; i++ {
		nonce[0], nonce[1] = byte(i), byte(i>>8)
		params := pkcs11.NewGCMParams(nonce, nil, GCMTagSize*8)
		err := p.EncryptInit(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, h)
		if err == nil {
			_, err = p.EncryptSized(s.h, data, len(data)+GCMTagSize)
		}
		params.Free()
		if err != nil {
			return 0, err
		}
	}
	return time.Since(start), nil
}
