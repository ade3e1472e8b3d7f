package keys

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// Just-in-time grants (keys/:name/grants): an entity or a group may use given operations of a key until a time
// and/or for a number of uses. A grant is stored under grants/<key>/<id> and read once per process: admission
// counts its uses in memory and persists only reservations of uses, in blocks, before they are used (as usage.go
// does for encryptions), so a crash loses the unused part of a block (fewer uses, never more than granted).
// Expiry is judged by the manager's clock against the stored expiry, so it holds across restarts and failover.
//
// Locks: a grant entry is written under its key's lock and then the grant's own mutex; admission within a
// reservation takes only the grant's mutex. Every grant's creation, revocation, use-out and expiry is a history
// event of its key.

const (
	grantsPrefix = "grants/" // grants/<key>/<id>: one grant, with its reserved uses

	// MaxGrantTTLCeiling bounds a grant's ttl when its key's access settings set no max_grant_ttl: just in time
	// means weeks at most, never a standing permission.
	MaxGrantTTLCeiling = 30 * 24 * time.Hour
	// maxGrantBlock bounds how many uses one reservation covers (unlimited grants reserve this many at a time).
	maxGrantBlock = 1024
	// maxGrantReason bounds a grant's reason, which every event of the grant repeats in the key's history.
	maxGrantReason = 1024
)

// GrantState is where a grant stands.
type GrantState string

// A grant is live until it is revoked, runs out of uses or expires.
const (
	GrantLive    GrantState = "live"
	GrantExpired GrantState = "expired"
	GrantUsedUp  GrantState = "used_up"
	GrantRevoked GrantState = "revoked"
)

// Recorder is who made or revoked a grant, as stored: never a token accessor in clear.
type Recorder struct {
	EntityID     string `json:"entity_id,omitempty"`
	DisplayName  string `json:"display_name,omitempty"`
	AccessorHMAC string `json:"token_accessor_hmac,omitempty"`
}

func (r Recorder) String() string {
	return Actor{EntityID: r.EntityID, DisplayName: r.DisplayName, AccessorHMAC: r.AccessorHMAC}.String()
}

// Grant is one grant as stored.
type Grant struct {
	ID string `json:"id"`
	// The grantee: an entity, or a group named by its name or id.
	EntityID   string      `json:"entity_id,omitempty"`
	Group      string      `json:"group,omitempty"`
	Operations []Operation `json:"operations"`
	ExpiresAt  time.Time   `json:"expires_at"`
	MaxUses    uint64      `json:"max_uses,omitempty"` // 0: unlimited until ExpiresAt
	Reason     string      `json:"reason,omitempty"`
	CreatedAt  time.Time   `json:"created_at"`
	CreatedBy  Recorder    `json:"created_by"`
	// RequestID is the Vault request that created the grant: its retry (Vault's after a plugin crash, or an
	// approved execution run again) finds the grant instead of making a second.
	RequestID string `json:"request_id,omitempty"`
	// Reserved is how many uses were reserved, each block stored before its first use: after a restart the
	// grant counts as having made them all.
	Reserved  uint64     `json:"reserved,omitempty"`
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
	RevokedBy *Recorder  `json:"revoked_by,omitempty"`
	// EndRecorded is the end (expired, used_up) whose history event is recorded, so that it is recorded once.
	EndRecorded GrantState `json:"end_recorded,omitempty"`
}

// GrantStatus is a grant with its uses so far and its state.
type GrantStatus struct {
	Grant
	Uses      uint64
	Remaining uint64 // when MaxUses is set
	State     GrantState
}

// GrantRequest is a grant as its creator asks for it.
type GrantRequest struct {
	EntityID   string      // the grantee entity, or
	Group      string      // the grantee group (name or id)
	Operations []Operation // empty: every operation
	TTL        time.Duration
	MaxUses    uint64
	Reason     string
	// GrantsRequiredJudged is the key's grants_required as the request was judged for dual control (outside the
	// key's lock); the grant is refused if it changed since. nil: not judged (the approved execution).
	GrantsRequiredJudged *bool
}

// liveGrant is a grant as this process counts its uses.
type liveGrant struct {
	mu   sync.Mutex
	g    Grant  // as stored
	used uint64 // uses counted; starts at g.Reserved when loaded
}

// grantSet is a key's grants, read from storage once.
type grantSet struct {
	mu   sync.RWMutex
	byID map[string]*liveGrant
}

func grantsKey(name, id string) string { return grantsPrefix + name + "/" + id }

// grantKeyOf returns the key a grants/ storage entry belongs to (for Vault's invalidations).
func grantKeyOf(storageKey string) (name string, ok bool) {
	rest, ok := strings.CutPrefix(storageKey, grantsPrefix)
	if !ok {
		return "", false
	}
	name, _, _ = strings.Cut(rest, "/")
	return name, true
}

// stateLocked is the grant's state at now; lg.mu is held.
func (lg *liveGrant) stateLocked(now time.Time) GrantState {
	switch {
	case lg.g.RevokedAt != nil:
		return GrantRevoked
	case lg.g.MaxUses > 0 && lg.used >= lg.g.MaxUses:
		return GrantUsedUp
	case !now.Before(lg.g.ExpiresAt):
		return GrantExpired
	}
	return GrantLive
}

func (lg *liveGrant) statusLocked(now time.Time) GrantStatus {
	st := GrantStatus{Grant: lg.g, Uses: lg.used, State: lg.stateLocked(now)}
	st.Operations = slices.Clone(lg.g.Operations)
	if lg.g.MaxUses > 0 {
		st.Remaining = lg.g.MaxUses - min(lg.used, lg.g.MaxUses)
	}
	return st
}

func (lg *liveGrant) status(now time.Time) GrantStatus {
	lg.mu.Lock()
	defer lg.mu.Unlock()
	return lg.statusLocked(now)
}

// covers reports whether the grant names the caller (its entity, or one of its groups by id or name) and op.
func (g *Grant) covers(entityID string, info *EntityInfo, op Operation) bool {
	if !slices.Contains(g.Operations, op) {
		return false
	}
	if g.EntityID != "" {
		return g.EntityID == entityID && entityID != ""
	}
	if info == nil {
		return false
	}
	for _, ref := range info.Groups {
		if g.Group == ref.ID || (ref.Name != "" && g.Group == ref.Name) {
			return true
		}
	}
	return false
}

// grantee names the grant's grantee for history and messages.
func (g *Grant) grantee() string {
	if g.EntityID != "" {
		return "entity " + g.EntityID
	}
	return "group " + g.Group
}

// describe is the grant as a history event's details name it: whom it lets do what, and who granted it.
func (g *Grant) describe() string {
	ops := make([]string, len(g.Operations))
	for i, op := range g.Operations {
		ops[i] = string(op)
	}
	d := fmt.Sprintf("grant %s to %s for %s until %s", g.ID, g.grantee(), strings.Join(ops, ","), FormatTime(g.ExpiresAt))
	if g.MaxUses > 0 {
		d += fmt.Sprintf(", max_uses %d", g.MaxUses)
	}
	d += ", granted by " + g.CreatedBy.String()
	if g.Reason != "" {
		d += ", reason: " + g.Reason
	}
	return d
}

// block is how many uses one reservation covers beyond the request's: a tenth of the grant's uses (at least
// one), so that a crash loses at most a tenth of them.
func (g *Grant) block() uint64 {
	if g.MaxUses == 0 {
		return maxGrantBlock
	}
	return min(max(g.MaxUses/10, 1), maxGrantBlock)
}

func recorderOf(a Actor) Recorder {
	return Recorder{EntityID: a.EntityID, DisplayName: a.DisplayName, AccessorHMAC: a.AccessorHMAC}
}

// grantEndActor is who records a grant's expiry and use-out: the engine, which finds them.
var grantEndActor = Actor{DisplayName: "cmk grants"}

// ParseOperations reads operation names, refusing an unknown one (a CallerError naming it).
func ParseOperations(names []string) ([]Operation, error) {
	var ops []Operation
	for _, n := range names {
		op := Operation(strings.TrimSpace(n))
		if !slices.Contains(Operations, op) {
			return nil, Callerf("unknown operation %q: operations are %s", n, OperationNames())
		}
		if !slices.Contains(ops, op) {
			ops = append(ops, op)
		}
	}
	return ops, nil
}

// OperationNames lists the operations, comma-separated, for messages and help.
func OperationNames() string {
	names := make([]string, len(Operations))
	for i, op := range Operations {
		names[i] = string(op)
	}
	return strings.Join(names, ", ")
}

// grantTTLLimit is the longest ttl a grant of k may have.
func grantTTLLimit(k *Key) (time.Duration, string) {
	if k.Access != nil && k.Access.MaxGrantTTL > 0 {
		return k.Access.MaxGrantTTL, "the key's max_grant_ttl"
	}
	return MaxGrantTTLCeiling, "the ceiling of grants on keys without max_grant_ttl"
}

// CreateGrant grants r on key name, by who, and records it in the key's history.
func (m *Manager) CreateGrant(ctx context.Context, s logical.Storage, name string, who Actor, r GrantRequest) (GrantStatus, error) {
	if (r.EntityID == "") == (r.Group == "") {
		return GrantStatus{}, Callerf("a grant names one grantee: entity_id or group")
	}
	if r.TTL < 0 {
		return GrantStatus{}, Callerf("ttl must not be negative")
	}
	if len(r.Reason) > maxGrantReason {
		return GrantStatus{}, Callerf("reason is longer than %d bytes", maxGrantReason)
	}
	if r.TTL == 0 && r.MaxUses == 0 {
		return GrantStatus{}, Callerf("a grant needs a ttl or max_uses (or both): none would be a standing permission")
	}
	ops := r.Operations
	if len(ops) == 0 {
		ops = slices.Clone(Operations)
	}
	for _, op := range ops {
		if !slices.Contains(Operations, op) {
			return GrantStatus{}, Callerf("unknown operation %q: operations are %s", op, OperationNames())
		}
	}
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	k, err := m.getLocked(ctx, s, name)
	if err != nil {
		return GrantStatus{}, err
	}
	if k == nil {
		return GrantStatus{}, notFound(name)
	}
	if k.Deleting || !k.DeleteAt.IsZero() {
		return GrantStatus{}, Callerf("key %q is scheduled for deletion: it takes no grants", name)
	}
	if j := r.GrantsRequiredJudged; j != nil && *j != (k.Access != nil && k.Access.GrantsRequired) {
		return GrantStatus{}, Callerf("key %q changed grants_required while this grant was judged for dual control: send it again", name)
	}
	limit, limitName := grantTTLLimit(k)
	ttl := r.TTL
	switch {
	case ttl > limit:
		return GrantStatus{}, Callerf("ttl %s exceeds %s, %s", ttl, limitName, limit)
	case ttl == 0:
		ttl = limit
	}
	sealed, err := m.sealed(ctx, s, who)
	if err != nil {
		return GrantStatus{}, err
	}
	now := m.now().UTC()
	set, err := m.grantSetLocked(ctx, s, name)
	if err != nil {
		return GrantStatus{}, err
	}
	if made := set.madeBy(who.RequestID); made != nil {
		return made.status(now), nil // a retry of the request that made it
	}
	id, err := newGrantID()
	if err != nil {
		return GrantStatus{}, err
	}
	g := Grant{ID: id, EntityID: r.EntityID, Group: r.Group, Operations: ops, ExpiresAt: now.Add(ttl), MaxUses: r.MaxUses,
		Reason: r.Reason, CreatedAt: now, CreatedBy: recorderOf(sealed), RequestID: who.RequestID}
	if err := putGrant(ctx, s, name, g); err != nil {
		return GrantStatus{}, err
	}
	lg := &liveGrant{g: g}
	set.mu.Lock()
	set.byID[id] = lg
	set.mu.Unlock()
	m.ends.note(name, set, now)
	if err := m.recordEventLocked(ctx, s, name, sealed, "grant_created", g.describe()); err != nil {
		m.log.Error("could not record a grant's creation in the key's history", "key", name, "grant", id, "error", err)
	}
	m.log.Info("grant created", "key", name, "grant", id, "grantee", g.grantee(), "by", sealed.String())
	return lg.status(now), nil
}

// madeBy is the grant request id made, nil if none (or no id).
func (set *grantSet) madeBy(requestID string) *liveGrant {
	if requestID == "" {
		return nil
	}
	set.mu.Lock()
	defer set.mu.Unlock()
	for _, lg := range set.byID {
		lg.mu.Lock()
		made := lg.g.RequestID == requestID
		lg.mu.Unlock()
		if made {
			return lg
		}
	}
	return nil
}

func newGrantID() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// Grants returns the key's grants, oldest first; nil and a not-found CallerError when the key does not exist.
func (m *Manager) Grants(ctx context.Context, s logical.Storage, name string) ([]GrantStatus, error) {
	set, err := m.grantSet(ctx, s, name)
	if err != nil {
		return nil, err
	}
	all := set.all()
	now := m.now()
	out := make([]GrantStatus, len(all))
	for i, lg := range all {
		out[i] = lg.status(now)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out, nil
}

// GrantByID returns one grant of the key, nil when there is none of that id.
func (m *Manager) GrantByID(ctx context.Context, s logical.Storage, name, id string) (*GrantStatus, error) {
	set, err := m.grantSet(ctx, s, name)
	if err != nil {
		return nil, err
	}
	lg := set.get(id)
	if lg == nil {
		return nil, nil
	}
	st := lg.status(m.now())
	return &st, nil
}

// RevokeGrant ends a grant at once and records who revoked it; nil when there is no grant of that id. A grant
// revoked already stays as it is.
func (m *Manager) RevokeGrant(ctx context.Context, s logical.Storage, name, id string, who Actor) (*GrantStatus, error) {
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	set, err := m.keyGrantsLocked(ctx, s, name)
	if err != nil {
		return nil, err
	}
	lg := set.get(id)
	if lg == nil {
		return nil, nil
	}
	lg.mu.Lock()
	defer lg.mu.Unlock()
	now := m.now().UTC()
	if lg.g.RevokedAt != nil {
		st := lg.statusLocked(now)
		return &st, nil
	}
	sealed, err := m.sealed(ctx, s, who)
	if err != nil {
		return nil, err
	}
	by := recorderOf(sealed)
	g := lg.g
	g.RevokedAt, g.RevokedBy = &now, &by
	if err := putGrant(ctx, s, name, g); err != nil {
		return nil, err
	}
	lg.g = g
	if err := m.recordEventLocked(ctx, s, name, sealed, "grant_revoked", fmt.Sprintf("%s; uses made: %d", g.describe(), lg.used)); err != nil {
		m.log.Error("could not record a grant's revocation in the key's history", "key", name, "grant", id, "error", err)
	}
	m.log.Info("grant revoked", "key", name, "grant", id, "by", sealed.String())
	st := lg.statusLocked(now)
	return &st, nil
}

// admitByGrant admits caller's use of k for op on items items by a live grant of the caller's entity or one of its
// groups (info, nil for a caller without an entity), counting the uses. admitted is false when no live grant covers
// the use; a live grant that covers it with fewer uses left than items denies the whole request (a DeniedError
// naming the uses left). Of several grants, the one that expires first is used first. The caller must not hold
// the key's lock: a reservation of uses and the history event of a grant's end take it.
func (m *Manager) admitByGrant(ctx context.Context, s logical.Storage, k *Key, c Caller, info *EntityInfo, op Operation, items int) (admitted bool, err error) {
	n := uint64(max(items, 1))
	for {
		set, err := m.grantSet(ctx, s, k.Name)
		if err != nil {
			return false, err
		}
		outcome := takeNotLive
		var looked []*liveGrant // what may have ended, for its history event
		var shortLeft uint64
		short := false
	candidates:
		for _, lg := range set.covering(c.EntityID, info, op) {
			var left uint64
			if outcome, left, err = m.takeUses(ctx, s, k.Name, set, lg, n); err != nil {
				return false, err
			}
			switch outcome {
			case takeStale:
				break candidates
			case takeShort:
				if !short || left > shortLeft {
					short, shortLeft = true, left
				}
			}
			looked = append(looked, lg)
			if outcome == takeDone {
				break
			}
		}
		if outcome == takeStale {
			continue // the grants were read again meanwhile (changed on another node, or the key deleted)
		}
		m.recordGrantEnds(ctx, s, k.Name, set, looked)
		switch {
		case outcome == takeDone:
			return true, nil
		case short:
			return false, &DeniedError{Key: k.Name, Operation: op, Condition: "grant",
				msg: fmt.Sprintf("the caller's grant has %d uses left, fewer than the request's %d items: the request is refused whole", shortLeft, n)}
		}
		return false, nil
	}
}

func (set *grantSet) get(id string) *liveGrant {
	set.mu.RLock()
	defer set.mu.RUnlock()
	return set.byID[id]
}

func (set *grantSet) all() []*liveGrant {
	set.mu.RLock()
	defer set.mu.RUnlock()
	out := make([]*liveGrant, 0, len(set.byID))
	for _, lg := range set.byID {
		out = append(out, lg)
	}
	return out
}

// covering returns the grants that name the caller and op, the soonest to expire first.
func (set *grantSet) covering(entityID string, info *EntityInfo, op Operation) []*liveGrant {
	type candidate struct {
		lg        *liveGrant
		expiresAt time.Time
		id        string
	}
	var found []candidate
	set.mu.RLock()
	for _, lg := range set.byID {
		lg.mu.Lock()
		if lg.g.covers(entityID, info, op) {
			found = append(found, candidate{lg, lg.g.ExpiresAt, lg.g.ID})
		}
		lg.mu.Unlock()
	}
	set.mu.RUnlock()
	sort.Slice(found, func(i, j int) bool {
		if !found[i].expiresAt.Equal(found[j].expiresAt) {
			return found[i].expiresAt.Before(found[j].expiresAt)
		}
		return found[i].id < found[j].id
	})
	out := make([]*liveGrant, len(found))
	for i, c := range found {
		out[i] = c.lg
	}
	return out
}

// take is what an attempt to use a grant came to.
type take int

const (
	takeNotLive take = iota // revoked, expired or used up
	takeShort               // live, with fewer uses left than asked
	takeDone                // the uses are counted
	takeStale               // the key's grants were dropped meanwhile: read them again
)

// takeUses counts n uses of lg, reserving a block of uses first (stored under the key's lock) when what is
// reserved does not cover them. left is the uses left when the grant is short.
func (m *Manager) takeUses(ctx context.Context, s logical.Storage, name string, set *grantSet, lg *liveGrant, n uint64) (take, uint64, error) {
	lg.mu.Lock()
	t, left, done := lg.takeReservedLocked(m.now(), n)
	lg.mu.Unlock()
	if done {
		return t, left, nil
	}
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	if cur, ok := m.grants.Load(name); !ok || cur != set {
		return takeStale, 0, nil
	}
	lg.mu.Lock()
	defer lg.mu.Unlock()
	if t, left, done := lg.takeReservedLocked(m.now(), n); done {
		return t, left, nil
	}
	g := lg.g
	g.Reserved = lg.used + n - 1 + g.block()
	if g.MaxUses > 0 {
		g.Reserved = min(g.Reserved, g.MaxUses)
	}
	if err := putGrant(ctx, s, name, g); err != nil {
		return takeNotLive, 0, fmt.Errorf("reserve uses of grant %s on key %q: %w", g.ID, name, err)
	}
	lg.g = g
	lg.used += n
	return takeDone, 0, nil
}

// takeReservedLocked counts n uses when the grant is live and its reservation covers them; done is false when a
// reservation is needed first.
func (lg *liveGrant) takeReservedLocked(now time.Time, n uint64) (t take, left uint64, done bool) {
	switch {
	case lg.stateLocked(now) != GrantLive:
		return takeNotLive, 0, true
	case lg.g.MaxUses > 0 && lg.used+n > lg.g.MaxUses:
		return takeShort, lg.g.MaxUses - lg.used, true
	case lg.used+n <= lg.g.Reserved:
		lg.used += n
		return takeDone, 0, true
	}
	return takeNotLive, 0, false
}

// grantEnds is when each key's next grant ends with its end unrecorded: what the periodic function looks at, so
// that a grant nobody uses again still has its end in its key's history within a tick. Built from storage once
// per process (the first tick reads every key's grants), then kept up to date by grant creation, by loading a
// key's grants, and by invalidations: a tick with nothing due reads no storage.
type grantEnds struct {
	mu    sync.Mutex
	ready bool
	next  map[string]time.Time // key name → the earliest end to record (zero: look at once)
}

// note sets when key name's next unrecorded end is due, from its grants at now.
func (e *grantEnds) note(name string, set *grantSet, now time.Time) {
	var next time.Time
	found := false
	for _, lg := range set.all() {
		lg.mu.Lock()
		st, at := lg.stateLocked(now), lg.g.ExpiresAt
		unrecorded := lg.g.EndRecorded == "" && st != GrantRevoked
		lg.mu.Unlock()
		if !unrecorded {
			continue
		}
		if st != GrantLive { // ended (used up, or expired) unrecorded: due now
			at = time.Time{}
		}
		if !found || at.Before(next) {
			next, found = at, true
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.next == nil {
		e.next = map[string]time.Time{}
	}
	if found {
		e.next[name] = next
	} else {
		delete(e.next, name)
	}
}

// lookAgain marks key name's grants to be looked at by the next tick (not read yet, changed on another node, or
// deleted).
func (e *grantEnds) lookAgain(name string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.next == nil {
		e.next = map[string]time.Time{}
	}
	e.next[name] = time.Time{}
}

func (e *grantEnds) drop(name string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.next, name)
}

// due returns the keys whose next end to record is at or before now.
func (e *grantEnds) due(now time.Time) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for name, at := range e.next {
		if !at.After(now) {
			out = append(out, name)
		}
	}
	return out
}

// recordEndedGrants records the end of every grant that expired or ran out unrecorded, for the periodic function
// on the active node. Reads never record (a performance standby serves them).
func (m *Manager) recordEndedGrants(ctx context.Context, s logical.Storage) {
	m.ends.mu.Lock()
	ready := m.ends.ready
	m.ends.mu.Unlock()
	if !ready {
		names, err := s.List(ctx, grantsPrefix)
		if err != nil {
			m.log.Warn("could not list the keys with grants; their ends are recorded from the next tick", "error", err)
			return
		}
		for _, dir := range names {
			m.ends.lookAgain(strings.TrimSuffix(dir, "/"))
		}
		m.ends.mu.Lock()
		m.ends.ready = true
		m.ends.mu.Unlock()
	}
	now := m.now()
	for _, name := range m.ends.due(now) {
		set, err := m.grantSet(ctx, s, name)
		if IsCaller(err) { // the key is deleted, and its grants with it
			m.ends.drop(name)
			continue
		}
		if err != nil {
			m.log.Warn("could not read a key's grants; their ends are recorded at the next tick", "key", name, "error", err)
			continue
		}
		m.recordGrantEnds(ctx, s, name, set, set.all())
		m.ends.note(name, set, now)
	}
}

// recordGrantEnds records, once, the history event of each grant of lgs found expired or used up. A failure is
// logged: the grant has ended whether or not its event is recorded, and the next look records it.
func (m *Manager) recordGrantEnds(ctx context.Context, s logical.Storage, name string, set *grantSet, lgs []*liveGrant) {
	now := m.now()
	var due []*liveGrant
	for _, lg := range lgs {
		lg.mu.Lock()
		st := lg.stateLocked(now)
		if (st == GrantExpired || st == GrantUsedUp) && lg.g.EndRecorded == "" {
			due = append(due, lg)
		}
		lg.mu.Unlock()
	}
	if len(due) == 0 {
		return
	}
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	if cur, ok := m.grants.Load(name); !ok || cur != set {
		return
	}
	for _, lg := range due {
		if err := m.recordGrantEndLocked(ctx, s, name, lg, now); err != nil {
			m.log.Warn("could not record a grant's end; the next look at it does", "key", name, "grant", lg.g.ID, "error", err)
		}
	}
}

// recordGrantEndLocked records the grant's end in the key's history, then marks it recorded: a crash in between
// records it twice rather than never.
func (m *Manager) recordGrantEndLocked(ctx context.Context, s logical.Storage, name string, lg *liveGrant, now time.Time) error {
	lg.mu.Lock()
	defer lg.mu.Unlock()
	st := lg.stateLocked(now)
	if (st != GrantExpired && st != GrantUsedUp) || lg.g.EndRecorded != "" {
		return nil
	}
	if err := m.recordEventLocked(ctx, s, name, grantEndActor, "grant_"+string(st), fmt.Sprintf("%s; uses made: %d", lg.g.describe(), lg.used)); err != nil {
		return err
	}
	g := lg.g
	g.EndRecorded = st
	if err := putGrant(ctx, s, name, g); err != nil {
		return err
	}
	lg.g = g
	m.log.Info("grant ended", "key", name, "grant", g.ID, "state", st)
	return nil
}

// grantSet returns the key's grants, read once; a not-found CallerError when the key does not exist.
func (m *Manager) grantSet(ctx context.Context, s logical.Storage, name string) (*grantSet, error) {
	if set, ok := m.grants.Load(name); ok {
		return set, nil
	}
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	return m.keyGrantsLocked(ctx, s, name)
}

// keyGrantsLocked is grantSet under the key's lock.
func (m *Manager) keyGrantsLocked(ctx context.Context, s logical.Storage, name string) (*grantSet, error) {
	k, err := m.getLocked(ctx, s, name)
	if err != nil {
		return nil, err
	}
	if k == nil {
		return nil, notFound(name)
	}
	return m.grantSetLocked(ctx, s, name)
}

// grantSetLocked reads the key's grants unless cached; the caller holds the key's lock.
func (m *Manager) grantSetLocked(ctx context.Context, s logical.Storage, name string) (*grantSet, error) {
	if set, ok := m.grants.Load(name); ok {
		return set, nil
	}
	ids, err := s.List(ctx, grantsPrefix+name+"/")
	if err != nil {
		return nil, fmt.Errorf("list the grants of key %q: %w", name, err)
	}
	set := &grantSet{byID: make(map[string]*liveGrant, len(ids))}
	for _, id := range ids {
		e, err := s.Get(ctx, grantsKey(name, id))
		if err != nil {
			return nil, fmt.Errorf("read grant %s of key %q: %w", id, name, err)
		}
		if e == nil {
			continue
		}
		var g Grant
		if err := e.DecodeJSON(&g); err != nil {
			return nil, fmt.Errorf("decode grant %s of key %q: %w", id, name, err)
		}
		set.byID[g.ID] = &liveGrant{g: g, used: g.Reserved} // what a crash left unused of a block is lost
	}
	m.grants.Store(name, set)
	m.ends.note(name, set, m.now())
	return set, nil
}

// forgetGrants drops the key's cached grants (changed on another node, or the key deleted); the caller holds
// the key's lock, so that no reservation is stored into a dropped set.
func (m *Manager) forgetGrants(name string) {
	m.grants.Delete(name)
	m.ends.lookAgain(name)
}

func putGrant(ctx context.Context, s logical.Storage, name string, g Grant) error {
	e, err := logical.StorageEntryJSON(grantsKey(name, g.ID), g)
	if err != nil {
		return err
	}
	return s.Put(ctx, e)
}

// removeGrants deletes every grant of the key (it is being deleted).
func removeGrants(ctx context.Context, s logical.Storage, name string) error {
	ids, err := s.List(ctx, grantsPrefix+name+"/")
	if err != nil {
		return err
	}
	for _, id := range ids {
		if err := s.Delete(ctx, grantsKey(name, id)); err != nil {
			return err
		}
	}
	return nil
}
