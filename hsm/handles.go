package hsm

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// handleCache remembers the object handle of each key version's objects, so that a request searches nothing:
// SoftHSM re-indexes the whole token on every search. A handle is valid only in the module generation and
// connection epoch it was found in; it is never used outside them.
type handleCache struct {
	mu      sync.RWMutex
	handles map[handleKey]cachedHandle

	// missing records, per object, when it was looked for and not found on the token: a version whose material
	// was destroyed outside Vault. Cleared when the object is found again.
	missing sync.Map
}

type handleKey struct {
	kind keyKind
	id   string // the version's CKA_ID
}

type cachedHandle struct {
	h          pkcs11.ObjectHandle
	gen, epoch uint64
}

func (c *handleCache) get(kind keyKind, id []byte, s session) (pkcs11.ObjectHandle, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, ok := c.handles[handleKey{kind, string(id)}]
	if !ok || e.gen != s.gen || e.epoch != s.epoch {
		return 0, false
	}
	return e.h, true
}

// put remembers h for the object, and forgets any other object that had the same number in the same
// connection: modules may give a destroyed object's number to a new one.
func (c *handleCache) put(kind keyKind, id []byte, h pkcs11.ObjectHandle, s session) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.handles == nil {
		c.handles = map[handleKey]cachedHandle{}
	}
	k := handleKey{kind, string(id)}
	for other, e := range c.handles {
		if e.h == h && other != k {
			delete(c.handles, other)
		}
	}
	c.handles[k] = cachedHandle{h: h, gen: s.gen, epoch: s.epoch}
}

// clear forgets every handle: after CKR_OBJECT_HANDLE_INVALID any of them may be stale.
func (c *handleCache) clear() {
	c.mu.Lock()
	c.handles = nil
	c.mu.Unlock()
}

// forget drops what is known of the objects of version id (they are being destroyed).
func (c *handleCache) forget(id []byte) {
	c.mu.Lock()
	for k := range c.handles {
		if k.id == string(id) {
			delete(c.handles, k)
		}
	}
	c.mu.Unlock()
	c.missing.Range(func(k, _ any) bool {
		if k.(handleKey).id == string(id) {
			c.missing.Delete(k)
		}
		return true
	})
}

func (c *handleCache) noteMissing(k handleKey) (first bool) {
	_, seen := c.missing.LoadOrStore(k, time.Now().UTC())
	return !seen
}

// missingFor names the objects of version id found missing, with when that was first seen.
func (c *handleCache) missingFor(id []byte) map[string]time.Time {
	var out map[string]time.Time
	c.missing.Range(func(k, v any) bool {
		if hk := k.(handleKey); hk.id == string(id) {
			if out == nil {
				out = map[string]time.Time{}
			}
			out[hk.kind.String()] = v.(time.Time)
		}
		return true
	})
	return out
}

// findKey returns the handle of version id's object of this kind, from the cache when possible. Objects are
// searched under each CKA_ID the kind may carry (objectIDs): the current layout first, then earlier ones.
func (t *Token) findKey(c pkcs11API, s session, kind keyKind, id []byte) (pkcs11.ObjectHandle, error) {
	if h, ok := t.handles.get(kind, id, s); ok {
		return h, nil
	}
	k := handleKey{kind, string(id)}
	for _, oid := range kind.objectIDs(id) {
		hs, err := findObjects(c, s.h, kind.searchTemplate(oid), 2)
		if err != nil {
			return 0, err
		}
		switch len(hs) {
		case 0:
			continue
		case 1:
			t.handles.missing.Delete(k)
			t.handles.put(kind, id, hs[0], s)
			return hs[0], nil
		default:
			return 0, fmt.Errorf("several %s objects share CKA_ID %x", kind, oid)
		}
	}
	// Nothing found. Before calling the object gone, make sure the session can still see private objects: after
	// a C_Logout or C_CloseAllSessions elsewhere, modules answer searches with nothing, not with an error.
	if err := nothingFoundBelieved(c, s); err != nil {
		return 0, err
	}
	return 0, &unseenError{kind: kind, id: id, note: func() {
		if t.handles.noteMissing(k) {
			t.log.Error("key object missing from the token: destroyed outside Vault?", "kind", kind.String(), "id", fmt.Sprintf("%x", id))
		}
	}}
}

// unseenError is a search that found nothing: errUnseen until the object is looked for again (see classUnseen),
// then ErrObjectNotFound.
type unseenError struct {
	kind keyKind
	id   []byte
	note func()
}

func (e *unseenError) Error() string {
	return fmt.Sprintf("%s with CKA_ID %x not found by the search", e.kind, e.id)
}
func (e *unseenError) Is(target error) bool { return target == errUnseen }

// unseenAsMissing turns a search that found nothing, after it was looked for again, into ErrObjectNotFound.
func unseenAsMissing(err error) error {
	var u *unseenError
	if !errors.As(err, &u) {
		return err
	}
	u.note()
	return fmt.Errorf("%w: %s with CKA_ID %x", ErrObjectNotFound, u.kind, u.id)
}

// nothingFoundBelieved returns nil when a search on s that found nothing can be believed: s still sees private
// objects. After a C_Logout or C_CloseAllSessions elsewhere, modules answer searches with nothing, not an error;
// then it is CKR_USER_NOT_LOGGED_IN, which recovery answers by logging in again.
func nothingFoundBelieved(c pkcs11API, s session) error {
	lost, err := loginLost(c, s)
	if err != nil {
		return err
	}
	if lost {
		return pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)
	}
	return nil
}

// loginLost reports whether session s is no longer logged in (its state is a public one).
func loginLost(c pkcs11API, s session) (bool, error) {
	info, err := c.GetSessionInfo(s.h)
	if err != nil {
		return false, err
	}
	switch info.State {
	case pkcs11.CKS_RO_USER_FUNCTIONS, pkcs11.CKS_RW_USER_FUNCTIONS, pkcs11.CKS_RW_SO_FUNCTIONS:
		return false, nil
	}
	return true, nil
}

// MissingObjects names the objects of version id (kinds: "AES key", "HMAC key", …) that this Token looked for and
// did not find on the token, with when that was first seen. It makes no PKCS#11 call.
func (t *Token) MissingObjects(id []byte) map[string]time.Time { return t.handles.missingFor(id) }

func findObjects(c pkcs11API, sh pkcs11.SessionHandle, tmpl []*pkcs11.Attribute, max int) ([]pkcs11.ObjectHandle, error) {
	if err := c.FindObjectsInit(sh, tmpl); err != nil {
		return nil, err
	}
	var all []pkcs11.ObjectHandle
	for max <= 0 || len(all) < max {
		hs, _, err := c.FindObjects(sh, 100)
		if err != nil {
			_ = c.FindObjectsFinal(sh)
			return nil, err
		}
		all = append(all, hs...)
		if len(hs) == 0 {
			break
		}
	}
	if err := c.FindObjectsFinal(sh); err != nil {
		return nil, err
	}
	return all, nil
}
