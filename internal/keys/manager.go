package keys

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// HSM is what the model needs of the token: make a version's material, import it, give a version its HMAC
// secret (or say why the one found cannot be trusted), destroy a version's objects, find a version's material by its
// label, witness its usage, and use the material (Crypto). *hsm.Token is one.
type HSM interface {
	Crypto
	GenerateVersion(ctx context.Context, alg hsm.Algorithm, id []byte, label string, hmacBytes int) (crypto.PublicKey, error)
	ImportVersion(ctx context.Context, r hsm.ImportRequest) (crypto.PublicKey, string, error)
	EnsureHMACKey(ctx context.Context, id []byte, versionLabel string, hmacBytes int, vouched bool) error
	CheckHMACSecret(ctx context.Context, id []byte, hmacBytes int, vouched bool) error
	DestroyKeys(ctx context.Context, id []byte) (int, error)
	FindVersion(ctx context.Context, alg hsm.Algorithm, label string, hmacBytes int) ([]hsm.Found, error)
	ListObjects(ctx context.Context, labelPrefix string) ([]hsm.ObjectInfo, error)
	ObjectsLabelled(ctx context.Context, labels []string) ([]hsm.ObjectInfo, error)
	// LabelledIDs answers from what the process knows of the token's objects, without a search (hsm.objectIndex).
	LabelledIDs(ctx context.Context, label string) ([][]byte, error)
	DestroyUnlessLabelled(ctx context.Context, id []byte, versionLabel string) (kept bool, destroyed int, err error)
	// UsageWitness and RaiseUsageWitness keep a version's reserved encryption count on the token (see usage.go).
	UsageWitness(ctx context.Context, id []byte) (uint64, bool, error)
	RaiseUsageWitness(ctx context.Context, id []byte, versionLabel string, n uint64) (before uint64, err error)
	// WorkingCopiesAllowed destroys and bars (or allows again) the session-object copies the token keeps of a
	// version's key (hsm/copies.go): a version that stops serving keeps none.
	WorkingCopiesAllowed(id []byte, allowed bool)
}

// WALKindVersion brackets the creation of a version's HSM objects until its metadata is stored, and the making
// of a version's HMAC secret (on its first HMAC) until storage records that the version has it.
const WALKindVersion = "hsm_key_version"

// WALEntry names the objects a WAL entry brackets.
type WALEntry struct {
	Name    string `json:"name"`
	Version int    `json:"version"`
	HSMID   string `json:"hsm_id"` // the CKA_ID (hex) of what it brackets
	// HMACSecret: it brackets version Version's HMAC secret, whose CKA_ID (HSMID) is the version's own followed by
	// "/hmac". With the entry (or the claim its rollback leaves), the engine vouches for the secret where the
	// token cannot show it generated it (see EnsureHMACSecret).
	HMACSecret bool   `json:"hmac_secret,omitempty"`
	RequestID  string `json:"request_id,omitempty"` // the request that made it, to recognise its retry
	// Generated: the material is generated on the token by this engine (not imported). With the entry, it vouches
	// for the material's origin where the token cannot (see adopt.go).
	Generated bool `json:"generated,omitempty"`
	// Type of the key, so that material a rollback leaves can make the key again (reconcile with adopt).
	Type Type `json:"type,omitempty"`
}

// Manager holds a mount's keys: the lock of each, its cached snapshot, the schedule of what is due, and usage
// counts. Update is the only door through which a key changes.
type Manager struct {
	log     hclog.Logger
	mountID string
	token   func(context.Context, logical.Storage) (HSM, *Nonces, error)

	locks []*locksutil.LockEntry
	cache snapshots // name → *Key, an immutable snapshot of what storage holds
	sched schedule
	usage usageTracker

	absent perKey[absentMark] // the token held no version after the latest (see Adopt)
	grants perKey[*grantSet]  // the key's grants, read once (grants.go)
	ends   grantEnds          // when grants end unrecorded, for the periodic function
	salt   mountSalt          // what token accessors are recorded under (actor.go)

	denials denialCounts // uses the keys' access conditions refused (access.go)

	analytics analytics           // per key, operation and caller: uses and denials by minute, hour, day (analytics.go)
	actions   perKey[*actionList] // anomaly actions in force, read once (anomaly.go)
	auditMu   sync.Mutex          // serialises the making of audit key versions (audit.go)
	unsigned  perKey[bool]        // heads left behind while the audit key could not sign; true: no head yet, chain begun here (chain.go)

	tokenAuditKeys tokenAuditKeys  // the audit key versions the token was found to hold (audit.go)
	signedHeads    signedHeads     // per key, the highest history head signed or seen signed (chain.go)
	auditFailed    auditKeyFailure // the last failure to make the audit key, under auditMu (audit.go)
	lastCreator    atomic.Pointer[string]

	// Clock is what access conditions' hours and grants' expiry are judged by; tests set it.
	Clock func() time.Time
	// Observer, when set before the first request, hears uses, denials and rotations (the mount's metrics).
	Observer Observer
	// TypeRule, when set before the first request, says why the mount refuses new versions of a type (config/keys
	// allowed_types and deprecated_types); nil or a nil error: allowed.
	TypeRule func(ctx context.Context, s logical.Storage, t Type) error
	// Deprecated, when set before the first request, says whether the mount deprecates type t (config/keys
	// deprecated_types), and since when: each use of a version of it is told to the observer.
	Deprecated func(ctx context.Context, s logical.Storage, t Type) (since time.Time, deprecated bool)
	// Connected, when set, gives the mount's open connection to the token, never opening one (nil when none is
	// open): working copies (hsm/copies.go) exist only in an open connection, so settling them needs no other.
	Connected func() HSM
}

// now is the manager's clock.
func (m *Manager) now() time.Time {
	if m.Clock != nil {
		return m.Clock()
	}
	return time.Now()
}

// NewManager makes the manager of a mount's keys. token connects to the mount's HSM when a change or a use needs
// it, and gives the connection's source of GCM nonces.
func NewManager(log hclog.Logger, mountID string, token func(context.Context, logical.Storage) (HSM, *Nonces, error)) *Manager {
	return &Manager{log: log, mountID: mountID, token: token, locks: locksutil.CreateLocks()}
}

// typeAllowed says why the mount refuses new versions of type t (a *TypeRefusedError), nil when it allows them.
func (m *Manager) typeAllowed(ctx context.Context, s logical.Storage, t Type) error {
	if m.TypeRule == nil {
		return nil
	}
	err := m.TypeRule(ctx, s, t)
	if IsCaller(err) {
		return &TypeRefusedError{Type: t, Err: err}
	}
	return err // the rule could not be read (storage): no refusal, the caller tries again
}

// TypeRefusedError: the mount's algorithm policy (config/keys allowed_types, deprecated_types) refuses new
// versions of Type. It answers as Err does (a 400 naming why).
type TypeRefusedError struct {
	Type Type
	Err  error
}

func (e *TypeRefusedError) Error() string { return e.Err.Error() }
func (e *TypeRefusedError) Unwrap() error { return e.Err }

// connect connects to the mount's HSM, for what needs no nonce.
func (m *Manager) connect(ctx context.Context, s logical.Storage) (HSM, error) {
	tok, _, err := m.token(ctx, s)
	return tok, err
}

func (m *Manager) lock(name string) *locksutil.LockEntry { return locksutil.LockForKey(m.locks, name) }

// Get returns the key's current snapshot, nil if it does not exist. Once cached, no storage read happens.
func (m *Manager) Get(ctx context.Context, s logical.Storage, name string) (*Key, error) {
	if k, ok := m.cache.Load(name); ok {
		return k, nil
	}
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	return m.getLocked(ctx, s, name)
}

func (m *Manager) getLocked(ctx context.Context, s logical.Storage, name string) (*Key, error) {
	if k, ok := m.cache.Load(name); ok {
		return k, nil
	}
	k, err := load(ctx, s, name)
	if err != nil || k == nil {
		return nil, err
	}
	if err := m.sealCreatedBy(ctx, s, k); err != nil {
		return nil, err
	}
	for _, v := range k.Versions { // not shared yet: decoded just now
		v.CreatedBy = m.creator(v.CreatedBy)
	}
	m.copiesAllowedServing(k) // lifts what an invalidation barred, for what serves as storage says
	m.cache.Store(name, k)
	return k, nil
}

// Invalidate forgets what is cached of the key a storage entry belongs to (another node changed it).
func (m *Manager) Invalidate(storageKey string) {
	if storageKey == saltLocation {
		m.salt.forget()
		return
	}
	if name, ok := actionsKeyOf(storageKey); ok {
		l := m.lock(name)
		l.Lock()
		m.forgetActions(name)
		l.Unlock()
		return
	}
	if name, ok := grantKeyOf(storageKey); ok {
		l := m.lock(name)
		l.Lock()
		m.forgetGrants(name)
		l.Unlock()
		return
	}
	name, usage, ok := NameOf(storageKey)
	if !ok {
		return
	}
	if usage {
		m.usage.forget(name)
		return
	}
	l := m.lock(name)
	l.Lock()
	if old, ok := m.cache.Load(name); ok {
		m.copiesBarredAll(old) // the change may have disabled, destroyed or deleted what a copy serves
	}
	m.cache.Delete(name)
	l.Unlock()
	m.sched.invalidate()
}

// Tx is one change of one key, inside Update: the snapshot before it (Cur), the clone being changed (Key), and
// what the change did (versions changed, HSM objects made, events). Only Update persists it.
type Tx struct {
	ctx context.Context
	m   *Manager
	s   logical.Storage
	who Actor

	Cur *Key // the key before the change; nil when it is being created
	Key *Key // the clone being changed

	changed []int
	made    []madeObject // objects made by this change, destroyed again if it fails before persisting
	adopted []adoptedWAL // records of material kept (adopted versions, an HMAC secret): forgotten once stored, never undone
	events  []Event
	dirty   bool
	deleted bool // the key's metadata is to be removed (its deletion destroyed its objects)
	tok     HSM
}

// Update is the one way a key changes: lock, load, clone, change, persist, record the history events, tell the
// schedule, unlock. change works on tx.Key and reports changes with the Tx's methods; a change that returns an
// error or marks nothing leaves storage untouched. The result is the key's new snapshot (nil once deleted).
//
// A storage write that fails may have stored nothing or everything: then nothing is destroyed (objects a stored
// version may reference must survive), the cached snapshot is dropped so that the next use reads storage, and
// the WAL rollback, which reads storage first, removes what storage never came to reference.
func (m *Manager) Update(ctx context.Context, s logical.Storage, name string, who Actor, change func(tx *Tx) error) (*Key, error) {
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	return m.updateLocked(ctx, s, name, who, change)
}

func (m *Manager) updateLocked(ctx context.Context, s logical.Storage, name string, who Actor, change func(tx *Tx) error) (*Key, error) {
	cur, err := m.getLocked(ctx, s, name)
	if err != nil {
		return nil, err
	}
	if cur == nil {
		return nil, notFound(name)
	}
	return m.commit(ctx, s, who, cur, cur.Clone(), change)
}

// Create adds key k with its first version, whose material is made by material (nil: generated in the HSM), unless
// a key of that name exists: then it returns the existing one and created false.
func (m *Manager) Create(ctx context.Context, s logical.Storage, k *Key, who Actor, material Material) (key *Key, created bool, err error) {
	l := m.lock(k.Name)
	l.Lock()
	defer l.Unlock()
	cur, err := m.getLocked(ctx, s, k.Name)
	if err != nil || cur != nil {
		return cur, false, err
	}
	if k.CreatedAt.IsZero() {
		k.CreatedAt = time.Now().UTC()
	}
	k.UsesCounted = m.AnalyticsOn()
	if k.AutoRotatePeriod > 0 && k.NextRotation.IsZero() {
		k.NextRotation = k.CreatedAt.Add(k.AutoRotatePeriod)
	}
	key, err = m.commit(ctx, s, who, nil, k, func(tx *Tx) error {
		generated := material == nil
		if generated {
			material = tx.generated()
		}
		n, method, err := tx.AddVersion(material, k.NewVersionType(), "", generated)
		if err != nil {
			return err
		}
		kind, details := "created", fmt.Sprintf("type %s", k.Type)
		if method != "" {
			kind, details = "imported", "import_method "+method
		}
		tx.Key.LastRequestID = who.RequestID
		tx.Record(kind, n, "", details)
		return nil
	})
	return key, err == nil, err
}

func (m *Manager) commit(ctx context.Context, s logical.Storage, who Actor, cur, next *Key, change func(tx *Tx) error) (*Key, error) {
	who, err := m.sealed(ctx, s, who) // what the change records and logs: never the accessor in clear
	if err != nil {
		return nil, err
	}
	tx := &Tx{ctx: ctx, m: m, s: s, who: who, Cur: cur, Key: next}
	if err := change(tx); err != nil {
		tx.undo()
		return nil, err
	}
	if !tx.dirty {
		return cur, nil
	}
	if tx.deleted {
		if err := remove(ctx, s, tx.Key); err != nil {
			m.cache.Delete(tx.Key.Name)
			m.forgetGrants(tx.Key.Name)
			return nil, err
		}
		m.cache.Delete(tx.Key.Name)
		m.sched.remove(tx.Key.Name)
		m.usage.forget(tx.Key.Name)
		m.forgetGrants(tx.Key.Name)
		m.forgetActions(tx.Key.Name)
		m.forgetUsage(tx.Key.Name)
		tx.recordEvents(nil)
		return nil, nil
	}
	var ahead *historyAhead
	if len(tx.events) > 0 {
		ahead = readHistoryAhead(ctx, s, tx.Key.Name)
		defer ahead.wait()
	}
	if err := store(ctx, s, tx.Key, tx.changed); err != nil {
		m.cache.Delete(tx.Key.Name) // storage may hold the change or not: read it again
		m.log.Warn("storing a key change failed; nothing is destroyed: the WAL rollback removes what storage never came to reference",
			"key", tx.Key.Name, "error", err)
		return nil, err
	}
	// The WAL entries go while the history is written: once the change is stored, the rollback finds it stored
	// and destroys nothing, whichever is written first.
	forgotten, records := make(chan struct{}), tx.records()
	go func() {
		defer close(forgotten)
		for _, w := range records {
			if err := w.forget(ctx, s); err != nil {
				m.log.Warn("could not delete WAL entry; the rollback finds the version stored and destroys nothing", "error", err)
			}
		}
	}()
	defer func() { <-forgotten }()
	m.cache.Store(tx.Key.Name, tx.Key)
	m.sched.update(tx.Key)
	tx.settleWorkingCopies()
	for n, v := range tx.Key.Versions {
		if v.State == StateDestroyed && (cur == nil || cur.Versions[n] == nil || cur.Versions[n].State != StateDestroyed) {
			m.usage.forgetVersion(tx.Key.Name, n)
		}
	}
	tx.recordEvents(ahead)
	return tx.Key, nil
}

// settleWorkingCopies tells the token, once a change is stored, which versions stopped serving (their working
// copies are destroyed and barred) and which serve again. Versions that keep serving, or keep not serving, are not
// mentioned: the calls happen only when a version's state changes.
func (tx *Tx) settleWorkingCopies() {
	var changes []func(HSM)
	for n, v := range tx.Key.Versions {
		if v.PublicOnly() {
			continue
		}
		now, before := tx.Key.serves(n), true // a new version may have copies, as any serving one
		if tx.Cur != nil && tx.Cur.Versions[n] != nil {
			before = tx.Cur.serves(n)
		}
		if now != before && v.State != StateDestroyed { // destruction took the copies with the objects (DestroyKeys)
			id := v.ID()
			changes = append(changes, func(tok HSM) { tok.WorkingCopiesAllowed(id, now) })
		}
	}
	if len(changes) == 0 {
		return
	}
	tok := tx.m.connected()
	if tok == nil {
		return // no connection, no copies: a connection made later starts with none
	}
	for _, change := range changes {
		change(tok)
	}
}

// connected is the mount's open connection to the token, or nil.
func (m *Manager) connected() HSM {
	if m.Connected == nil {
		return nil
	}
	return m.Connected()
}

// copiesBarredAll bars the working copies of every version of k: another node changed the key in storage, and what
// serves now is known only once it is read again (copiesAllowedServing).
func (m *Manager) copiesBarredAll(k *Key) {
	tok := m.connected()
	if tok == nil {
		return
	}
	for _, v := range k.Versions {
		if !v.PublicOnly() {
			tok.WorkingCopiesAllowed(v.ID(), false)
		}
	}
}

// copiesAllowedServing allows the working copies of every version of k, read from storage, that serves.
func (m *Manager) copiesAllowedServing(k *Key) {
	tok := m.connected()
	if tok == nil {
		return
	}
	for n, v := range k.Versions {
		if !v.PublicOnly() && k.serves(n) {
			tok.WorkingCopiesAllowed(v.ID(), true)
		}
	}
}

// madeObject is material a change put on the token, with the WAL entry that brackets it.
type madeObject struct {
	id    []byte
	walID string
}

// records are the WAL entries and claims of the material the change made or adopted, all forgotten once it is
// stored.
func (tx *Tx) records() []adoptedWAL {
	out := append([]adoptedWAL(nil), tx.adopted...)
	for _, m := range tx.made {
		out = append(out, adoptedWAL{id: m.walID})
	}
	return out
}

// undo destroys the objects a failed change made before anything was stored. Adopted material is left alone:
// it was there before the change, and its WAL entry stays for the rollback to judge.
func (tx *Tx) undo() {
	for _, m := range tx.made {
		if _, err := tx.tok.DestroyKeys(tx.ctx, m.id); err != nil {
			tx.m.log.Warn("could not destroy the objects of an unstored version; the WAL rollback will", "key", tx.Key.Name, "error", err)
			continue
		}
		if err := framework.DeleteWAL(tx.ctx, tx.s, m.walID); err != nil {
			tx.m.log.Warn("could not delete WAL entry", "error", err)
		}
	}
}

// recordEvents appends the change's events to the key's history, still under the key's lock, so that no
// concurrent change's event is lost; the chain's head is signed once for them all. A failure is logged: the change
// it records is made, and Vault's audit device has the request either way.
func (tx *Tx) recordEvents(ahead *historyAhead) {
	for _, ev := range tx.events {
		if ev.Event == "rotated" {
			tx.m.observer().Rotated(tx.Key.Name, ev.Cause)
		}
	}
	if err := tx.m.appendHistory(tx.ctx, tx.s, tx.Key.Name, ahead, tx.events...); err != nil {
		for _, ev := range tx.events {
			tx.m.log.Error("could not record lifecycle event", "key", tx.Key.Name, "event", ev.Event, "error", err)
		}
	}
}

// Changed marks versions whose metadata the change modified (and the key itself as modified).
func (tx *Tx) Changed(versions ...int) {
	tx.dirty = true
	tx.changed = append(tx.changed, versions...)
}

// addVersion adds v as the latest version (Key.addVersion); when its type is not the key's, every version is
// stored again, so that each carries its own type from then on.
func (tx *Tx) addVersion(v *Version) int {
	n, retyped := tx.Key.addVersion(v)
	if retyped {
		for m := range tx.Key.Versions {
			tx.Changed(m)
		}
	}
	tx.Changed(n)
	return n
}

// Record adds a lifecycle event, written with the change.
func (tx *Tx) Record(kind string, version int, cause, details string) {
	tx.dirty = true
	tx.events = append(tx.events, tx.who.event(kind, version, cause, details))
}

// Who is the change's actor.
func (tx *Tx) Who() Actor { return tx.who }

// checkpoint persists the change so far and publishes it, for a change of several steps on the token whose first
// step must be durable before the next (a deletion or a trim that a crash may cut short). What it publishes is a
// copy: tx.Key goes on changing, and a snapshot others can read is never changed.
func (tx *Tx) checkpoint() error {
	snap := tx.Key.Clone()
	if err := store(tx.ctx, tx.s, snap, tx.changed); err != nil {
		tx.m.cache.Delete(snap.Name) // storage may hold the change or not: read it again
		return err
	}
	tx.m.cache.Store(snap.Name, snap)
	return nil
}

// hsm connects to the token once per change.
func (tx *Tx) hsm() (HSM, error) {
	if tx.tok == nil {
		t, err := tx.m.connect(tx.ctx, tx.s)
		if err != nil {
			return nil, err
		}
		tx.tok = t
	}
	return tx.tok, nil
}

// Material puts a version's material on the token under CKA_ID id and returns its public key (asymmetric types)
// and, for imports, how the material got there.
type Material func(ctx context.Context, tok HSM, id []byte, label string) (crypto.PublicKey, string, error)

// MethodPublicKeyOnly is the import method of a version that holds only a public key.
const MethodPublicKeyOnly = "public-key-only"

// PublicKeyOnly is the Material of a version that holds only pub: nothing goes to the token.
func PublicKeyOnly(pub crypto.PublicKey) Material {
	return func(context.Context, HSM, []byte, string) (crypto.PublicKey, string, error) {
		return pub, MethodPublicKeyOnly, nil
	}
}

// generated is the Material of a version generated in the HSM. Versions of all but hmac keys make their HMAC
// secret on first use (EnsureHMACSecret): most keys are never used for one.
func (tx *Tx) generated() Material {
	return generatedAs(tx.Key.NewVersionType())
}

// generatedAs is the Material of a version of vt generated in the HSM.
func generatedAs(vt VersionType) Material {
	hmacBytes := 0
	if vt.Type == TypeHMAC {
		hmacBytes = vt.HMACBytes()
	}
	return func(ctx context.Context, tok HSM, id []byte, label string) (crypto.PublicKey, string, error) {
		pub, err := tok.GenerateVersion(ctx, vt.Type.Info().Alg, id, label, hmacBytes)
		return pub, "", err
	}
}

// AddVersion puts the next version's material on the token, under a WAL entry written first, and makes it the
// latest. requestID, when set, is remembered so that Vault's retry of the request adds no second version;
// generated says that material generates the key on the token (recorded in the WAL entry). It returns the
// version's number and the import method (empty when generated).
//
// A search can miss an object that is there (SoftHSM 2.6.1's object store, written by another process or under
// parallel writes): the number adoption found free is checked once more after the material is made (putVersion).
// If the number's original shows up then, the new material is destroyed and the original adopted, or it blocks
// the number: a number never names two keys, whatever one search missed.
func (tx *Tx) AddVersion(material Material, as VersionType, requestID string, generated bool) (int, string, error) {
	if _, err := tx.hsm(); err != nil {
		return 0, "", err
	}
	k := tx.Key
	for attempt := 1; ; attempt++ {
		// Numbers whose material the token holds are adopted, never reused. One made by this very request (its
		// earlier attempt ended before the version was stored: Vault retries a request the plugin died under) is
		// the request's result.
		adopted, err := tx.adoptPending(0, false)
		if err != nil {
			return 0, "", err
		}
		for n, madeBy := range adopted {
			if tx.who.RequestID != "" && madeBy == tx.who.RequestID {
				if requestID != "" {
					k.LastRequestID = requestID
				}
				return n, "", nil
			}
		}
		n, method, err := tx.putVersion(material, as, requestID, generated)
		if !errors.Is(err, errNumberSeenTaken) {
			return n, method, err
		}
		if attempt == 2 {
			// Two searches in a row disagreed with the one before them: the token's answers cannot be relied on now.
			return 0, "", fmt.Errorf("key %q: %w: the token's searches disagree about which version numbers it holds; try again", k.Name, hsm.ErrUnavailable)
		}
	}
}

// errNumberSeenTaken: putVersion found, after making the new material, that the token already held its number's
// label (the search before missed it); the new material is destroyed again.
var errNumberSeenTaken = errors.New("the version's number was found taken after its material was made")

// creator returns s, or the copy held for the version made or loaded before when they are equal: keys are mostly
// made by a few callers, often one after another, and one copy then serves them all. Only the last is remembered,
// so nothing grows with the callers (a token without an entity is a creator of its own).
func (m *Manager) creator(s string) string {
	if last := m.lastCreator.Load(); last != nil && *last == s {
		return *last
	}
	m.lastCreator.Store(&s)
	return s
}

// putVersion makes version LatestVersion+1 with material and adds it to the key, after checking that the token
// holds nothing else under the new version's label, as the token's object index knows it (hsm.LabelledIDs: learnt
// from the token when a mount opens it, kept current by every object the process makes or destroys, so no search):
// an object made under the number by this process while the material was made, or one the index holds that
// adoption's two searches did not find but a search by its CKA_ID did. It only lists what carries the label,
// leaving the examination of what it finds to adoption. What it finds besides the new material (errNumberSeenTaken) makes it destroy the
// new material: this change made it and nothing stored it.
func (tx *Tx) putVersion(material Material, as VersionType, requestID string, generated bool) (int, string, error) {
	k, tok := tx.Key, tx.tok
	if err := tx.m.typeAllowed(tx.ctx, tx.s, as.Type); err != nil {
		return 0, "", err // the mount's algorithm policy: checked wherever new material is made, created, rotated or imported
	}
	rawID := make([]byte, 16) // an identifier, not a secret: the standard library's RNG is fine here
	if _, err := rand.Read(rawID); err != nil {
		return 0, "", err
	}
	n := k.LatestVersion + 1
	ver := &Version{Type: as.Type, HMACKeySize: as.HMACKeySize, HSMID: hex.EncodeToString(rawID), Label: versionLabel(tx.m.mountID, k.Name, n),
		CreatedAt: time.Now().UTC(), CreatedBy: tx.m.creator(tx.who.String())}
	if as.Type != TypeHMAC {
		ver.HMACKeySize = 0
	}
	walID, err := framework.PutWAL(tx.ctx, tx.s, WALKindVersion, &WALEntry{Name: k.Name, Version: n, HSMID: ver.HSMID, RequestID: tx.who.RequestID, Generated: generated, Type: as.Type})
	if err != nil {
		return 0, "", fmt.Errorf("write WAL: %w", err)
	}
	made := madeObject{rawID, walID}
	tx.made = append(tx.made, made) // whatever the call leaves, undone if the change fails
	pub, method, err := material(tx.ctx, tok, rawID, ver.Label)
	if err != nil {
		return 0, "", fmt.Errorf("key %q version %d in the HSM: %w", k.Name, n, err)
	}
	if method == MethodPublicKeyOnly {
		ver.HSMID, ver.Label = "", "" // nothing on the token
	} else {
		ids, err := tok.LabelledIDs(tx.ctx, ver.Label)
		if err != nil {
			return 0, "", fmt.Errorf("look for version %d of key %q on the token: %w", n, k.Name, err)
		}
		var others []string
		for _, raw := range ids {
			if id := hex.EncodeToString(raw); id != ver.HSMID {
				others = append(others, id)
			}
		}
		if len(others) > 0 {
			tx.m.log.Warn("the token holds material under the new version's label that the search before missed; the new material is destroyed and the number's original looked for again",
				"key", k.Name, "version", n, "label", ver.Label, "hsm_ids", others)
			if _, err := tok.DestroyKeys(tx.ctx, rawID); err != nil {
				return 0, "", fmt.Errorf("destroy the new material of key %q version %d, whose number the token already holds: %w", k.Name, n, err)
			}
			tx.made = tx.made[:len(tx.made)-1]
			if err := framework.DeleteWAL(tx.ctx, tx.s, walID); err != nil {
				tx.m.log.Warn("could not delete WAL entry; its rollback finds nothing under its CKA_ID", "error", err)
			}
			return 0, "", errNumberSeenTaken
		}
	}
	ver.ImportMethod = method
	ver.HMACDeferred = method == "" && as.Type != TypeHMAC
	if pub != nil {
		if ver.PublicKey, err = FormatPublicKey(pub); err != nil {
			return 0, "", err
		}
		ver.pub = pub
	}
	tx.addVersion(ver)
	if requestID != "" {
		k.LastRequestID = requestID
	}
	event := "key version created in the HSM"
	if method != "" {
		event = "key version imported into the HSM"
	}
	tx.m.log.Info(event, "key", k.Name, "version", n, "label", ver.Label, "by", tx.who.String(), "import_method", method)
	return n, method, nil
}

// Rotate adds a generated version. cause is manual, scheduled or usage. A manual rotation that Vault retries
// after the plugin died under it adds nothing the second time.
//
// to, when its Type is set, is the new version's type: another of the key's purpose (crypto-agility). Otherwise
// the key's pending NextType is used, if any, else its current type. Old versions keep theirs: they go on
// decrypting and verifying as they were made.
func (tx *Tx) Rotate(cause string, to VersionType) error {
	k := tx.Key
	requestID := ""
	if cause == "manual" {
		if tx.who.RequestID != "" && k.LastRequestID == tx.who.RequestID {
			return nil
		}
		requestID = tx.who.RequestID
	}
	if err := k.canRotate(); err != nil {
		return err
	}
	as, err := k.rotationType(to)
	if err != nil {
		return err
	}
	from := k.NewVersionType()
	n, _, err := tx.AddVersion(generatedAs(as), as, requestID, true)
	if err != nil {
		return err
	}
	k.rotated(time.Now().UTC())
	if k.HasDecryptWindow() {
		k.WindowCheckAt = time.Now().UTC() // the periodic function moves the window on
	}
	details := ""
	if as != from {
		details = fmt.Sprintf("type %s to %s", from, as)
	}
	if k.NextType != "" && k.NextType == as.Type {
		k.NextType = "" // made: nothing pending any more
	}
	tx.Record("rotated", n, cause, details)
	return nil
}

// DestroyVersion destroys version n's objects on the token now and keeps its metadata as a tombstone.
func (tx *Tx) DestroyVersion(n int, cause string) error {
	k := tx.Key
	v := k.Versions[n]
	if v == nil || v.State == StateDestroyed {
		return nil
	}
	if !v.PublicOnly() {
		tok, err := tx.hsm()
		if err != nil {
			return err
		}
		if _, err := tok.DestroyKeys(tx.ctx, v.ID()); err != nil {
			return fmt.Errorf("destroy key %q version %d: %w", k.Name, n, err)
		}
	}
	k.markDestroyed(n, time.Now())
	tx.Changed(n)
	tx.Record("version_destroyed", n, cause, "")
	tx.m.log.Info("key version destroyed in the HSM", "key", k.Name, "version", n, "cause", cause)
	return nil
}

// DeleteKey destroys every version's objects, then the key's metadata (its history stays). The key is first
// stored as being deleted, so that a deletion cut short by a crash or an HSM fault is completed by the next
// attempt and the key serves nothing meanwhile.
func (tx *Tx) DeleteKey(cause string) error {
	k := tx.Key
	if !k.Deleting {
		k.Deleting = true
		if err := tx.checkpoint(); err != nil {
			return err
		}
	}
	tok, err := tx.hsm()
	if err != nil {
		return err
	}
	for n, v := range k.Versions {
		if v.State == StateDestroyed || v.PublicOnly() {
			continue
		}
		if _, err := tok.DestroyKeys(tx.ctx, v.ID()); err != nil {
			return fmt.Errorf("destroy key %q version %d: %w", k.Name, n, err)
		}
	}
	// And whatever else is on the token under the key's labels (versions a storage restore lost and nobody
	// adopted): a deleted key's material must not come back as a later key's of the same name.
	rest, err := tok.ListObjects(tx.ctx, "cmk/"+tx.m.mountID+"/"+k.Name+"/")
	if err != nil {
		return fmt.Errorf("list what remains of key %q on the token: %w", k.Name, err)
	}
	for _, o := range rest {
		id := bytes.TrimSuffix(o.ID, []byte("/hmac"))
		if _, err := tok.DestroyKeys(tx.ctx, id); err != nil {
			return fmt.Errorf("destroy %s of key %q: %w", o.Label, k.Name, err)
		}
	}
	// The claims rollbacks left for the key's material: it is destroyed.
	records, err := versionWALs(tx.ctx, tx.s)
	if err != nil {
		return err
	}
	for _, w := range records {
		if w.claim != "" && w.entry.Name == k.Name {
			if err := w.forget(tx.ctx, tx.s); err != nil {
				return err
			}
		}
	}
	tx.deleted = true
	tx.Record("deleted", 0, cause, fmt.Sprintf("%d versions destroyed", len(k.Versions)))
	tx.m.log.Info("key deleted and its HSM objects destroyed", "key", k.Name, "versions", len(k.Versions), "cause", cause)
	return nil
}

// Configure applies settings and records what they changed.
func (tx *Tx) Configure(c Settings) error {
	if err := tx.Key.Apply(c); err != nil {
		return err
	}
	changes := settingsChanges(tx.Cur, tx.Key)
	if changes == "no change" {
		return nil
	}
	tx.Record("config_changed", 0, "", changes)
	return nil
}

// SetVersionState disables, enables or schedules the destruction of version n (at at; now destroys it at once).
func (tx *Tx) SetVersionState(n int, action string, at time.Time, now bool) error {
	k := tx.Key
	var changed bool
	var err error
	switch action {
	case "disable":
		if changed, err = k.DisableVersion(n); changed {
			tx.Record("version_disabled", n, "", "")
		}
	case "enable":
		var cancelled bool
		if changed, cancelled, err = k.EnableVersion(n); changed {
			detail := ""
			if cancelled {
				detail = "destruction cancelled"
			}
			tx.Record("version_enabled", n, "", detail)
		}
	case "destroy":
		if changed, err = k.ScheduleVersionDestruction(n, at); changed {
			tx.Record("version_destroy_scheduled", n, "", "destruction at "+FormatTime(at))
			if now {
				return tx.DestroyVersion(n, "destroyed without grace period")
			}
		}
	default:
		return Callerf("unknown action %q", action)
	}
	if changed {
		tx.Changed(n)
	}
	return err
}

// RetireVersion makes version n serve rewrap alone (Key.RetireVersion); reason, when given, is recorded.
func (tx *Tx) RetireVersion(n int, reason string) error {
	changed, fromDisabled, err := tx.Key.RetireVersion(n)
	if !changed || err != nil {
		return err
	}
	details := "serves rewrap alone, to move data onto the latest version"
	if fromDisabled {
		details += "; was disabled"
	}
	if reason != "" {
		details += "; reason: " + reason
	}
	tx.Changed(n)
	tx.Record("version_retired", n, "", details)
	tx.m.log.Warn("key version retired: it serves rewrap alone", "key", tx.Key.Name, "version", n, "reason", reason)
	return nil
}

// SetDisabled revokes or restores the whole key.
func (tx *Tx) SetDisabled(disabled bool) {
	if tx.Key.SetDisabled(disabled) {
		kind := "enabled"
		if disabled {
			kind = "disabled"
		}
		tx.Record(kind, 0, "", "")
	}
}

// Delete deletes the key after grace: at once when it is 0 (as Transit), else the key is marked for deletion,
// serves nothing, and can be restored until then.
func (tx *Tx) Delete(grace time.Duration) error {
	k := tx.Key
	if !k.DeletionAllowed {
		_, err := k.ScheduleDeletion(time.Time{})
		return err
	}
	if !k.DeleteAt.IsZero() && !k.Deleting {
		// Scheduled already: the time announced (to custodians, in the history) is kept, never brought forward.
		return nil
	}
	if grace == 0 || k.Deleting {
		return tx.DeleteKey("deleted without grace period")
	}
	at := time.Now().UTC().Add(grace)
	if changed, err := k.ScheduleDeletion(at); err != nil || !changed {
		return err
	}
	tx.Record("deletion_scheduled", 0, "", "destruction at "+FormatTime(at))
	return nil
}

// CancelDeletion restores a key whose deletion is scheduled.
func (tx *Tx) CancelDeletion() error {
	if err := tx.Key.CancelDeletion(); err != nil {
		return err
	}
	tx.Record("deletion_cancelled", 0, "", "")
	return nil
}

// Trim raises min_available_version and schedules the destruction of the versions below it at at, as every
// destruction is scheduled (now: destroyed at once, the grace period being 0). When they go at once, the raised
// bound is stored first, so that a trim cut short serves none of them and the next attempt finishes it.
func (tx *Tx) Trim(minAvail int, at time.Time, now bool) error {
	k := tx.Key
	if err := k.Trim(minAvail); err != nil {
		return err
	}
	var scheduled []int
	for n := 1; n < minAvail; n++ {
		if changed, err := k.ScheduleVersionDestruction(n, at); err != nil {
			return err
		} else if changed {
			scheduled = append(scheduled, n)
		}
	}
	tx.Changed(scheduled...)
	tx.Record("trimmed", 0, "", fmt.Sprintf("min_available_version %d; versions below it destroyed at %s", minAvail, FormatTime(at)))
	if !now {
		return nil
	}
	if err := tx.checkpoint(); err != nil {
		return err
	}
	for n := 1; n < minAvail; n++ {
		if k.Versions[n].State == StateDestroyScheduled {
			if err := tx.DestroyVersion(n, "trim"); err != nil {
				return err
			}
		}
	}
	return nil
}

// ImportVersion adds an imported version to an imported key; Vault's retry of the same request adds nothing. A
// private key (publicOnly false) for version (or, when version is 0, for a latest version that holds only a
// public key) is imported into that version instead, as Transit's import_version does.
//
// materialAs gives the material as the version it goes to is typed: the key's current type for a new version, the
// version's own for a public-key-only one (the key may have moved to another type since).
func (tx *Tx) ImportVersion(materialAs func(VersionType) Material, publicOnly bool, version int) error {
	k := tx.Key
	if tx.who.RequestID != "" && k.LastRequestID == tx.who.RequestID {
		return nil
	}
	if !k.Imported {
		return Callerf("the import_version endpoint can only be used with an imported key")
	}
	if err := k.Usable(); err != nil {
		return err
	}
	switch {
	case publicOnly && version != 0:
		return Callerf("version names a public-key-only version whose private key to import; a public_key import always adds a version")
	case !publicOnly && version == 0 && k.Versions[k.LatestVersion] != nil && k.Versions[k.LatestVersion].PublicOnly():
		version = k.LatestVersion
	}
	if version != 0 {
		v := k.Versions[version]
		if v == nil {
			return Callerf("key %q has no version %d", k.Name, version)
		}
		return tx.importPrivate(version, materialAs(v.VersionType()))
	}
	n, method, err := tx.AddVersion(materialAs(k.NewVersionType()), k.NewVersionType(), tx.who.RequestID, false)
	if err != nil {
		return err
	}
	tx.Record("version_imported", n, "", "import_method "+method)
	return nil
}

// importPrivate puts the private key of public-key-only version n on the token, checked against its public key.
func (tx *Tx) importPrivate(n int, material Material) error {
	k := tx.Key
	v := k.Versions[n]
	switch {
	case v == nil:
		return Callerf("key %q has no version %d", k.Name, n)
	case !v.PublicOnly():
		return Callerf("version %d of key %q already holds its private key in the HSM; import_version without version adds a new version", n, k.Name)
	case v.State == StateDestroyed:
		return Callerf("version %d of key %q is destroyed", n, k.Name)
	}
	tok, err := tx.hsm()
	if err != nil {
		return err
	}
	label := versionLabel(tx.m.mountID, k.Name, n)
	found, err := tok.FindVersion(tx.ctx, v.Type.Info().Alg, label, v.HMACBytes())
	if err != nil {
		return err
	}
	if len(found) > 0 {
		return &NumberTakenError{Key: k.Name, Version: n, Label: label, Reason: "material is already on the token under this version's label"}
	}
	rawID := make([]byte, 16)
	if _, err := rand.Read(rawID); err != nil {
		return err
	}
	walID, err := framework.PutWAL(tx.ctx, tx.s, WALKindVersion, &WALEntry{Name: k.Name, Version: n, HSMID: hex.EncodeToString(rawID), RequestID: tx.who.RequestID, Type: v.Type})
	if err != nil {
		return fmt.Errorf("write WAL: %w", err)
	}
	tx.made = append(tx.made, madeObject{rawID, walID}) // destroyed again if anything below fails
	pub, method, err := material(tx.ctx, tok, rawID, label)
	if err != nil {
		return fmt.Errorf("key %q version %d in the HSM: %w", k.Name, n, err)
	}
	if eq, ok := pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !eq.Equal(v.pub) {
		return Callerf("the imported private key does not match the public key of version %d of key %q", n, k.Name)
	}
	k.withVersion(n, func(x *Version) {
		x.HSMID, x.Label, x.ImportMethod, x.HMACDeferred = hex.EncodeToString(rawID), label, method, false
	})
	if tx.who.RequestID != "" {
		k.LastRequestID = tx.who.RequestID
	}
	tx.Changed(n)
	tx.Record("private_key_imported", n, "", "import_method "+method)
	return nil
}

// SetCertificateChain records the certificate chain of version n, whose leaf the caller has checked against the
// version's public key.
func (tx *Tx) SetCertificateChain(n int, chainPEM string, subject string) error {
	k := tx.Key
	if k.Versions[n] == nil {
		return Callerf("key %q has no version %d", k.Name, n)
	}
	if s := k.VersionState(n); s != StateActive && s != StateDecryptOnly {
		return Callerf("key version %d of key %q is %s", n, k.Name, s)
	}
	k.withVersion(n, func(v *Version) { v.CertificateChain = chainPEM })
	tx.Changed(n)
	tx.Record("certificate_chain_set", n, "", "leaf subject "+subject)
	return nil
}

// EnsureHMACSecret gives version n its HMAC secret, made on first use. The version's state is checked here, under
// the key's lock: a version disabled or scheduled for destruction meanwhile never gets one.
//
// A secret made here may be left on the token with storage not recording it: the write below fails or the plugin
// dies first, or storage is restored from a snapshot taken while this ran; HMACs under it may have gone out. The
// next first use finds it, and on a token that cannot show it generated it (NSS) only the engine's own record
// tells it from one planted by someone holding the PIN. So the record (a WAL entry naming the secret's CKA_ID,
// kept as a claim by its rollback) is written before the secret is made, once whatever the token already holds
// there is found proven or absent (a record written now must not vouch for what was there before); it is forgotten
// once storage records the secret. A secret with no record is taken only where the token proves it.
//
// forCaller: the secret is for a caller's HMAC; otherwise for the engine's own use (PKCS#1 v1.5 implicit
// rejection), which a retired version serves too, as rewrap decrypts with it.
func (tx *Tx) EnsureHMACSecret(n int, forCaller bool) error {
	k := tx.Key
	v := k.Versions[n]
	if v == nil {
		return Callerf("key %q has no version %d", k.Name, n)
	}
	if s := k.VersionState(n); s != StateActive && s != StateDecryptOnly && (forCaller || s != StateRetired) {
		return Callerf("key version %d of key %q is %s", n, k.Name, s)
	}
	if v.PublicOnly() {
		return Callerf("version %d of key %q holds only a public key: it has no HMAC secret", n, k.Name)
	}
	if !v.HMACDeferred {
		return nil // made meanwhile by another request
	}
	tok, err := tx.hsm()
	if err != nil {
		return err
	}
	secretID := v.HSMID + hmacSuffixHex
	records, err := versionWALs(tx.ctx, tx.s)
	if err != nil {
		return err
	}
	record, vouched := records[secretID]
	if vouched = vouched && record.vouchesForSecret(k.Name, n); !vouched {
		if err := tok.CheckHMACSecret(tx.ctx, v.ID(), v.HMACBytes(), false); err != nil {
			return fmt.Errorf("HMAC secret of key %q version %d: %w", k.Name, n, err)
		}
		w := WALEntry{Name: k.Name, Version: n, HSMID: secretID, RequestID: tx.who.RequestID, Generated: true, HMACSecret: true}
		walID, err := framework.PutWAL(tx.ctx, tx.s, WALKindVersion, &w)
		if err != nil {
			return fmt.Errorf("write WAL: %w", err)
		}
		record = adoptedWAL{id: walID, entry: w}
	}
	if err := tok.EnsureHMACKey(tx.ctx, v.ID(), v.Label, v.HMACBytes(), true); err != nil {
		if !vouched {
			tx.forgetUnusedRecord(record, v.Label+"/hmac")
		}
		return fmt.Errorf("HMAC secret of key %q version %d: %w", k.Name, n, err)
	}
	tx.adopted = append(tx.adopted, record) // forgotten once stored; the secret is never undone
	k.withVersion(n, func(x *Version) { x.HMACDeferred = false })
	tx.Changed(n)
	tx.m.log.Info("HMAC secret created in the HSM on first use", "key", k.Name, "version", n)
	return nil
}

// forgetUnusedRecord deletes the record just written for an HMAC secret whose making failed, when the token shows
// that nothing was made: left, it would vouch for whatever someone put there later. When the token cannot say,
// it stays for the rollback, which keeps it only if the secret is there.
func (tx *Tx) forgetUnusedRecord(record adoptedWAL, label string) {
	objects, err := tx.tok.ObjectsLabelled(tx.ctx, []string{label})
	if err != nil {
		return
	}
	for _, o := range objects {
		if hex.EncodeToString(o.ID) == record.entry.HSMID {
			return
		}
	}
	if err := record.forget(tx.ctx, tx.s); err != nil {
		tx.m.log.Warn("could not delete WAL entry; its rollback finds no secret and keeps nothing", "error", err)
	}
}

// RollbackVersion is the WAL rollback of a version's creation, for a version that storage does not reference: the
// change that made its material ended first (the plugin died, storage failed), or storage was restored from a
// snapshot taken before the version, or before its key, was stored. The two cannot be told apart from storage, and
// after a restore the material may protect data: so a rollback destroys only what cannot be the version's material
// (nothing under the version's label carries the entry's CKA_ID). Material the rule allows is adopted into the key
// storage knows; anything else is left on the token with a claim that keeps the entry's record (reported by
// reconcile, adopted when the key is created again or by reconcile with adopt). It holds the key's lock
// throughout, so that it never races a change in progress.
func (m *Manager) RollbackVersion(ctx context.Context, s logical.Storage, data interface{}) error {
	raw, err := json.Marshal(data)
	if err != nil {
		return err
	}
	var w WALEntry
	if err := json.Unmarshal(raw, &w); err != nil {
		return err
	}
	if w.HMACSecret {
		return m.rollbackHMACSecret(ctx, s, w)
	}
	id, err := hex.DecodeString(w.HSMID)
	if err != nil || len(id) == 0 {
		return nil // nothing that could be on the token
	}
	l := m.lock(w.Name)
	l.Lock()
	defer l.Unlock()
	m.cache.Delete(w.Name) // storage first: a failed write may have stored what the cache does not show
	k, err := m.getLocked(ctx, s, w.Name)
	if err != nil {
		return err
	}
	if k != nil {
		if k.referenced(w.HSMID) {
			return nil
		}
		// The rollback is no retry of the request that wrote the entry: what it adopts has unknown usage.
		who := Actor{DisplayName: "cmk WAL rollback"}
		k, err = m.updateLocked(ctx, s, w.Name, who, func(tx *Tx) error {
			_, err := tx.adoptPending(w.Version, false)
			var taken *NumberTakenError
			if errors.As(err, &taken) {
				return nil // reported by reconcile; what is below is decided by the object alone
			}
			return err
		})
		if err != nil {
			return err // the entry stays; the next rollback pass tries again
		}
		if k != nil && k.referenced(w.HSMID) {
			return nil
		}
	}
	tok, err := m.connect(ctx, s)
	if err != nil {
		return err
	}
	label := versionLabel(m.mountID, w.Name, w.Version)
	kept, n, err := tok.DestroyUnlessLabelled(ctx, id, label)
	if err != nil {
		return err
	}
	if kept {
		if err := storeClaim(ctx, s, w); err != nil {
			return err
		}
		m.log.Warn("WAL rollback left material on the token that storage does not reference: it may protect data (storage restored?); reconcile reports it",
			"key", w.Name, "version", w.Version, "label", label)
	}
	if n == 0 {
		return nil
	}
	m.log.Info("WAL rollback destroyed HSM objects that carry no version's label", "key", w.Name, "version", w.Version, "objects", n)
	return nil
}

// rollbackHMACSecret is the WAL rollback of the making of a version's HMAC secret. It destroys nothing: the secret
// may have made HMACs (storage restored to before the first HMAC was recorded, or the write after it failed). If
// storage does not record the secret and the token holds it, a claim keeps the entry's record, which vouches for
// it at the version's next first use (EnsureHMACSecret); reconcile reports it meanwhile as the engine's own.
func (m *Manager) rollbackHMACSecret(ctx context.Context, s logical.Storage, w WALEntry) error {
	l := m.lock(w.Name)
	l.Lock()
	defer l.Unlock()
	m.cache.Delete(w.Name) // storage first: a failed write may have stored what the cache does not show
	k, err := m.getLocked(ctx, s, w.Name)
	if err != nil {
		return err
	}
	if k != nil {
		if v := k.Versions[w.Version]; v != nil && v.HSMID+hmacSuffixHex == w.HSMID && !v.HMACDeferred {
			return nil // stored: the record has done its work
		}
	}
	tok, err := m.connect(ctx, s)
	if err != nil {
		return err
	}
	label := versionLabel(m.mountID, w.Name, w.Version) + "/hmac"
	objects, err := tok.ObjectsLabelled(ctx, []string{label})
	if err != nil {
		return err
	}
	for _, o := range objects {
		if hex.EncodeToString(o.ID) == w.HSMID {
			if err := storeClaim(ctx, s, w); err != nil {
				return err
			}
			m.log.Warn("WAL rollback kept an HMAC secret this engine made that storage does not record (storage restored, or its write failed); the version's next HMAC takes it",
				"key", w.Name, "version", w.Version, "label", label)
			return nil
		}
	}
	return nil // nothing was made
}
