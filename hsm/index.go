package hsm

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// The object index is what the process knows of the labels and CKA_IDs of a token's objects: learnt by reading
// every object when a mount opens the token, then kept current by every object this process creates or destroys on the
// token (indexedCalls sees each such call, whichever mount makes it). It answers "does the token hold anything
// under this label, or this CKA_ID?" with no PKCS#11 call, which is what a version's creation and a usage witness's
// first read ask: on SoftHSM, whose file store reads every object file per search, those searches made creating
// 10,000 keys take over an hour.
//
// Only absence is answered from the index; what it says is there is then looked at on the token (FindVersion,
// UsageWitness), so an object gone behind the process's back costs a search, never a wrong answer. What the index
// cannot see is an object another process makes on the token after the index was learnt: it is learnt again at
// every opening of the token by a mount (its start or reconfiguration, a node taking over as active; not a
// reconnection after a fault, during which this process made nothing), so material a
// previous process or node left is always seen; two processes writing the same mount's labels at once (two active
// nodes) is what Vault's HA rules out.
//
// One learning reads every object twice and takes the union: SoftHSM 2.6.1's store can hide an object from one
// search while another process writes (the second look a version's creation used to make per version).
type objectIndex struct {
	mu      sync.Mutex
	ready   bool
	current *learning             // the learning under way, if any
	gen     uint64                // counts forgets: a learning that a forget overtook is not kept
	pending map[indexedObject]int // objects created while a learning is under way
	byLabel map[string][]string   // label → the CKA_ID of each object under it (a key pair's halves: twice)
	byID    map[string]int        // CKA_ID → objects carrying it
}

type indexedObject struct{ label, id string }

// learning is one reading of the token into the index; askers wait for done, then read err.
type learning struct {
	done chan struct{}
	err  error
}

// forget drops what the index knows; the next question learns it again, and a learning under way is not kept.
func (x *objectIndex) forget() {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.gen++
	x.ready, x.byLabel, x.byID = false, nil, nil
	if x.current != nil {
		x.pending = map[indexedObject]int{}
	}
}

// record applies an object's creation (add) or destruction by this process.
func (x *objectIndex) record(add bool, objs ...indexedObject) {
	x.mu.Lock()
	defer x.mu.Unlock()
	for _, o := range objs {
		switch {
		case x.current != nil && add:
			x.pending[o]++
		case x.ready:
			x.changeLocked(o, add)
		}
	}
}

func (x *objectIndex) changeLocked(o indexedObject, add bool) {
	ids := x.byLabel[o.label]
	if add {
		x.byLabel[o.label] = append(ids, o.id)
		x.byID[o.id]++
		return
	}
	i := slices.Index(ids, o.id)
	if i < 0 {
		return
	}
	if ids = slices.Delete(ids, i, i+1); len(ids) == 0 {
		delete(x.byLabel, o.label)
	} else {
		x.byLabel[o.label] = ids
	}
	if x.byID[o.id]--; x.byID[o.id] <= 0 {
		delete(x.byID, o.id)
	}
}

// lookup runs fn on a ready index and returns nil; otherwise it returns the learning to wait for, and start says
// that the caller is to run it (under gen).
func (x *objectIndex) lookup(fn func()) (wait *learning, start bool, gen uint64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.ready {
		fn()
		return nil, false, 0
	}
	if x.current != nil {
		return x.current, false, 0
	}
	x.current, x.pending = &learning{done: make(chan struct{})}, map[indexedObject]int{}
	return x.current, true, x.gen
}

// finish ends the learning started at gen: seen is what the readings of the token found, err why they failed.
// Objects created while they ran are added to what they found, and destructions made meanwhile are not applied:
// the index may then hold an object that is gone, or count one twice, which costs a search (only absence is
// answered from it), never one too few.
func (x *objectIndex) finish(gen uint64, seen map[indexedObject]int, err error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	l := x.current
	x.current, l.err = nil, err
	close(l.done)
	pending := x.pending
	x.pending = nil
	if err != nil || gen != x.gen {
		return
	}
	x.ready = true
	x.byLabel, x.byID = make(map[string][]string, len(seen)), make(map[string]int, len(seen))
	for o, n := range pending {
		seen[o] += n
	}
	for o, n := range seen {
		for range n {
			x.changeLocked(o, true)
		}
	}
}

// learnTimeout bounds one learning, which runs for every asker and so not under any one request's deadline.
const learnTimeout = 10 * time.Minute

// index runs fn against the token's object index, learning it first if it must. The learning runs apart from
// the asking request: a request that gives up stops waiting, not the learning others wait for.
func (t *Token) index(ctx context.Context, fn func(x *objectIndex)) error {
	state := t.pool.tokenState()
	if state == nil {
		if err := t.pool.ensure(); err != nil {
			return err
		}
		if state = t.pool.tokenState(); state == nil {
			return fmt.Errorf("%w: not connected to the token", ErrUnavailable)
		}
	}
	x := &state.objects
	for tries := 0; ; tries++ {
		wait, start, gen := x.lookup(func() { fn(x) })
		if wait == nil {
			return nil
		}
		if tries == 3 {
			return fmt.Errorf("%w: the token's objects were read three times, and each reading was overtaken by a mount opening the token", ErrUnavailable)
		}
		if start {
			go func() {
				lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), learnTimeout)
				defer cancel()
				seen, err := t.readIndex(lctx)
				x.finish(gen, seen, err)
			}()
		}
		select {
		case <-wait.done:
			if wait.err != nil {
				return wait.err
			}
		case <-ctx.Done():
			return fmt.Errorf("%w: waiting for the token's objects to be read: %v", ErrUnavailable, ctx.Err())
		}
	}
}

// readIndex reads every token object's label and CKA_ID, twice, and returns the union.
func (t *Token) readIndex(ctx context.Context) (map[indexedObject]int, error) {
	union := map[indexedObject]int{}
	for range 2 {
		var seen map[indexedObject]int
		err := t.doAside(ctx, "read the token's object labels", func(c pkcs11API, s session) error {
			seen = map[indexedObject]int{}
			hs, err := findObjects(c, s.h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 0)
			if err != nil {
				return err
			}
			for _, h := range hs {
				o, err := describeForIndex(c, s.h, h)
				if rv, ok := rvOf(err); ok && (rv == pkcs11.CKR_OBJECT_HANDLE_INVALID || rv == pkcs11.CKR_KEY_HANDLE_INVALID) {
					continue // destroyed since the search: its destruction is recorded
				}
				if err != nil {
					return err
				}
				seen[o]++
			}
			if len(hs) == 0 {
				return nothingFoundBelieved(c, s)
			}
			// A module that lost the login answers searches without the private objects, and no error.
			if lost, err := loginLost(c, s); err != nil || lost {
				if err == nil {
					err = pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)
				}
				return err
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
		for o, n := range seen {
			union[o] = max(union[o], n) // an object seen by either reading is there
		}
	}
	return union, nil
}

// describeForIndex reads the label and CKA_ID of object h. Objects without a CKA_ID (data objects) are indexed
// by label alone, objects without a label by CKA_ID alone.
func describeForIndex(c pkcs11API, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) (indexedObject, error) {
	var o indexedObject
	a, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
	switch rv, ok := rvOf(err); {
	case ok && (rv == pkcs11.CKR_ATTRIBUTE_TYPE_INVALID || rv == pkcs11.CKR_ATTRIBUTE_SENSITIVE):
		// no label (another application's object): no label search can find it either
	case err != nil:
		return indexedObject{}, err
	default:
		o.label = string(a[0].Value)
	}
	id, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, nil)})
	if rv, ok := rvOf(err); ok && (rv == pkcs11.CKR_ATTRIBUTE_TYPE_INVALID || rv == pkcs11.CKR_ATTRIBUTE_SENSITIVE) {
		return o, nil
	}
	if err != nil {
		return indexedObject{}, err
	}
	o.id = string(id[0].Value)
	return o, nil
}

// LabelledIDs returns the CKA_IDs of the token objects labelled label, as the process's object index knows them
// (see objectIndex): no PKCS#11 call once the index is learnt. An ID appears once per object carrying it.
func (t *Token) LabelledIDs(ctx context.Context, label string) ([][]byte, error) {
	var out [][]byte
	err := t.index(ctx, func(x *objectIndex) {
		for _, id := range x.byLabel[label] {
			out = append(out, []byte(id))
		}
	})
	return out, err
}

// forgetLabel drops from the object index the objects ids under label, which two searches by label found gone
// (destroyed by another process, or while the index was being learnt, or recorded by a creation that failed),
// unless a search by CKA_ID, another question to the token, still finds one.
func (t *Token) forgetLabel(ctx context.Context, label string, ids [][]byte) error {
	var gone []indexedObject
	err := t.do(ctx, "find objects by CKA_ID", func(c pkcs11API, s session) error {
		gone = gone[:0]
		for _, id := range ids {
			if len(id) > 0 {
				hs, err := findObjects(c, s.h, []*pkcs11.Attribute{
					pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 1)
				if err != nil {
					return err
				}
				if len(hs) > 0 {
					continue
				}
			}
			gone = append(gone, indexedObject{label, string(id)})
		}
		if len(gone) == len(ids) {
			return nothingFoundBelieved(c, s)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return t.index(ctx, func(x *objectIndex) {
		for _, o := range gone {
			x.changeLocked(o, false)
		}
	})
}

// holdsID says whether the object index knows an object with CKA_ID id on the token.
func (t *Token) holdsID(ctx context.Context, id []byte) (bool, error) {
	var held bool
	err := t.index(ctx, func(x *objectIndex) { held = x.byID[string(id)] > 0 })
	return held, err
}

// indexedCalls keeps the token's object index current with every object created or destroyed through it. A
// creation that failed is recorded as made all the same (a device error, a lost session or SoftHSM's store race
// can leave the object behind), and a destruction that failed, or whose object could not be read first, is not
// recorded: either way the index may hold an object that is not there, which costs a search, never a number.
type indexedCalls struct {
	pkcs11API
	x *objectIndex
}

func (c indexedCalls) created(templates ...[]*pkcs11.Attribute) {
	var objs []indexedObject
	for _, tmpl := range templates {
		if o, ok := tokenObjectOf(tmpl); ok {
			objs = append(objs, o)
		}
	}
	c.x.record(true, objs...)
}

func (c indexedCalls) GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	h, err := c.pkcs11API.GenerateKey(sh, m, temp)
	c.created(temp)
	return h, err
}

func (c indexedCalls) GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error) {
	pub, priv, err := c.pkcs11API.GenerateKeyPair(sh, m, public, private)
	c.created(public, private)
	return pub, priv, err
}

func (c indexedCalls) CreateObject(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	h, err := c.pkcs11API.CreateObject(sh, temp)
	c.created(temp)
	return h, err
}

func (c indexedCalls) UnwrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, unwrappingKey pkcs11.ObjectHandle, wrappedKey []byte, a []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	h, err := c.pkcs11API.UnwrapKey(sh, m, unwrappingKey, wrappedKey, a)
	c.created(a)
	return h, err
}

func (c indexedCalls) DestroyObject(sh pkcs11.SessionHandle, oh pkcs11.ObjectHandle) error {
	tok, err := c.pkcs11API.GetAttributeValue(sh, oh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil)})
	onToken := err == nil && boolean(tok[0].Value)
	var o indexedObject
	if onToken {
		o, err = describeForIndex(c.pkcs11API, sh, oh)
	}
	derr := c.pkcs11API.DestroyObject(sh, oh)
	if derr == nil && err == nil && onToken {
		c.x.record(false, o)
	}
	return derr
}

// tokenObjectOf is the label and CKA_ID a creation template gives a token object; ok is false for a session
// object (CKA_TOKEN absent or false).
func tokenObjectOf(tmpl []*pkcs11.Attribute) (indexedObject, bool) {
	var o indexedObject
	onToken := false
	for _, a := range tmpl {
		switch a.Type {
		case pkcs11.CKA_TOKEN:
			onToken = boolean(a.Value)
		case pkcs11.CKA_LABEL:
			o.label = string(a.Value)
		case pkcs11.CKA_ID:
			o.id = string(a.Value)
		}
	}
	return o, onToken
}
