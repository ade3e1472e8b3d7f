package keys

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// Usage analytics (keys/:name/usage): per key, per operation and per caller, how many uses and denials each
// minute, hour and day. Every outcome of a use passes Manager.Use's door (admitCounted), which counts it here in
// memory on the node that served it; nothing is written to storage per request. The active node's periodic
// function writes each key whose counts changed to one storage entry (FlushAnalytics), merged with what storage
// held when the key was first touched by this process, and Clean writes them once more on a clean shutdown: a
// restart or a failover loses at most the counts of one flush interval.
//
// Memory is bounded whatever the number of callers: a key tracks at most MaxCallersPerKey callers, the mount at
// most MaxCallersTracked (key, caller) pairs; the callers beyond either are counted together under the caller
// OtherCallers, and how many were folded so is counted. Buckets are kept sparse (only minutes, hours, days with a
// use) and pruned beyond their retention.

// Retention of the buckets, and the bounds of what analytics keeps.
const (
	MinuteBuckets = 60     // the last hour, by minute
	HourBuckets   = 7 * 24 // the last week, by hour: what a caller's usual hours are learned from
	DayBuckets    = 35     // the last five weeks, by day
	// MaxCallersPerKey callers are tracked per key; others are folded into OtherCallers.
	MaxCallersPerKey = 32
	// MaxCallersTracked bounds the (key, caller) pairs tracked over the mount.
	MaxCallersTracked = 20000
	// OtherCallers is the caller the uses of callers beyond the caps are counted under.
	OtherCallers = "_other"
	// maxFoldedSeen bounds the distinct folded callers a key remembers to count them; beyond, each new fold
	// may count a caller again.
	maxFoldedSeen = 1024
	// MaxFoldedPerMinute bounds the folded callers a key counts one by one in a minute, to judge each against
	// anomaly_rate_limit; beyond, the others are judged as one group, OtherCallers.
	MaxFoldedPerMinute = 256
	// maxRecentAnomalies per key are kept for keys/:name/anomalies and the evidence bundle.
	maxRecentAnomalies = 50

	analyticsPrefix = "analytics/" // analytics/<name>: the key's usage counts, written by the flush
)

// CallerLabel is the name a caller's use is tracked, judged and acted on under: its entity id, or for a token
// without an entity (root, orphan tokens) "token:" and its accessor's HMAC under the mount's salt, as history
// records it ("token:hmac-sha256:<hex>"), which no entity id can be: each such token is a caller of its own,
// whatever its display name (kept for display). Never a token or its clear accessor. The door seals the accessor
// first (withAccessorHMAC); an actor with no accessor at all is named by its display name.
func CallerLabel(a Actor) string {
	switch {
	case a.EntityID != "":
		return a.EntityID
	case a.AccessorHMAC != "":
		return "token:" + a.AccessorHMAC
	}
	return "token:" + a.DisplayName
}

// bucket is one minute, hour or day of a series: slot counts minutes, hours or days since the Unix epoch.
// Counts saturate at 2^32-1 per bucket.
type bucket struct {
	slot    uint32
	uses    uint32
	denials uint32
}

func addSaturating(a uint32, n uint64) uint32 {
	if uint64(a)+n > uint64(^uint32(0)) {
		return ^uint32(0)
	}
	return a + uint32(n)
}

// addTo adds to the bucket of slot in bs (sorted by slot), dropping the buckets keep or more slots older.
func addTo(bs []bucket, slot uint32, uses, denials uint64, keep uint32) []bucket {
	n := len(bs)
	if n > 0 && bs[n-1].slot == slot { // the common case: this minute, hour, day
		bs[n-1].uses = addSaturating(bs[n-1].uses, uses)
		bs[n-1].denials = addSaturating(bs[n-1].denials, denials)
		return bs
	}
	if n > 0 && bs[n-1].slot > slot { // a clock behind the last use's (another node's, or set back)
		i, found := slices.BinarySearchFunc(bs, slot, func(b bucket, s uint32) int { return int(int64(b.slot) - int64(s)) })
		if !found {
			if slot+keep <= bs[n-1].slot {
				return bs // older than the retention
			}
			bs = slices.Insert(bs, i, bucket{slot: slot})
		}
		bs[i].uses = addSaturating(bs[i].uses, uses)
		bs[i].denials = addSaturating(bs[i].denials, denials)
		return bs
	}
	bs = prune(bs, slot, keep)
	return append(bs, bucket{slot: slot, uses: addSaturating(0, uses), denials: addSaturating(0, denials)})
}

// prune drops the buckets keep or more slots older than slot.
func prune(bs []bucket, slot, keep uint32) []bucket {
	i := 0
	for i < len(bs) && bs[i].slot+keep <= slot {
		i++
	}
	if i == 0 {
		return bs
	}
	return append(bs[:0], bs[i:]...)
}

// mergeBuckets adds b's counts into a (both sorted), within keep slots of now.
func mergeBuckets(a, b []bucket, now, keep uint32) []bucket {
	for _, x := range b {
		if x.slot+keep > now {
			a = addTo(a, x.slot, uint64(x.uses), uint64(x.denials), keep)
		}
	}
	return prune(a, now, keep)
}

// series is one caller's use of one operation of one key.
type series struct {
	uses, denials        uint64 // since tracking began
	minutes, hours, days []bucket
}

func slots(now time.Time) (minute, hour, day uint32) {
	s := now.Unix()
	return uint32(s / 60), uint32(s / 3600), uint32(s / 86400)
}

func (s *series) add(now time.Time, uses, denials uint64) {
	m, h, d := slots(now)
	s.uses += uses
	s.denials += denials
	s.minutes = addTo(s.minutes, m, uses, denials, MinuteBuckets)
	s.hours = addTo(s.hours, h, uses, denials, HourBuckets)
	s.days = addTo(s.days, d, uses, denials, DayBuckets)
}

func (s *series) prune(now time.Time) {
	m, h, d := slots(now)
	s.minutes, s.hours, s.days = prune(s.minutes, m, MinuteBuckets), prune(s.hours, h, HourBuckets), prune(s.days, d, DayBuckets)
}

func (s *series) empty() bool { return len(s.minutes) == 0 && len(s.hours) == 0 && len(s.days) == 0 }

// operationCount is len(Operations), for the arrays indexed by operation (a test keeps them equal).
const operationCount = 8

// callerUsage is one caller's use of one key, per operation (indexed as Operations).
type callerUsage struct {
	display             string
	firstSeen, lastSeen time.Time
	ops                 [operationCount]*series
	judged              judgedHour // what anomaly detection derived from the buckets this hour (anomaly.go)
}

// opIndex is op's index in Operations.
func opIndex(op Operation) int { return slices.Index(Operations, op) }

// keyUsage is the analytics of one key. Its mutex guards everything in it.
type keyUsage struct {
	mu sync.Mutex
	// loaded: storage's counts are merged in (load): only then may a flush overwrite them. Set under mu, read
	// without it by every use (the fast path).
	loaded     atomic.Bool
	loadFailed time.Time // when the last read of storage's counts failed: tried again a minute later
	dirty      bool
	since      time.Time
	callers    map[string]*callerUsage
	totals     [operationCount][2]uint64 // per operation: uses, denials since tracking began (callers dropped included)
	denials    map[string]uint64
	folded     uint64
	foldedSeen map[uint64]bool
	anomalies  []Anomaly
	reported   map[string]time.Time // caller + "\x00" + kind → when last reported (anomaly.go)
	// flushing: a flush is writing the counts; the entry is not released until it is done.
	flushing bool
	// dead: freed (key deleted, analytics off, idle) and out of the map; a use that took it before counts in the live
	// entry instead (lockLive), so that no count is lost and no caller is tracked where no one sees it.
	dead bool
	// foldedNow counts this minute's uses and denials of each caller folded into OtherCallers (anomaly.go).
	foldedNow *foldedMinute
	// versions: what each version did (versionuse.go); nil until one is used. versionsSince: when this engine
	// first counted a use of one of the key's versions (counting per version began then, after an upgrade).
	versions          map[int]*VersionUse
	versionsSince     time.Time
	versionsRestarted bool // the counts per version were lost and began again at versionsSince
}

// foldedMinute is one minute's uses and denials per folded caller, at most MaxFoldedPerMinute callers.
type foldedMinute struct {
	slot   uint32
	counts map[string]uint64
}

// countFolded counts n uses or denials of folded caller label in minute slot; a caller beyond the minute's bound
// is counted in OtherCallers' buckets only.
func (ku *keyUsage) countFolded(label string, slot uint32, n uint64) {
	if ku.foldedNow == nil || ku.foldedNow.slot != slot {
		ku.foldedNow = &foldedMinute{slot: slot, counts: map[string]uint64{}} // a new minute: the last one's go
	}
	if _, ok := ku.foldedNow.counts[label]; ok || len(ku.foldedNow.counts) < MaxFoldedPerMinute {
		ku.foldedNow.counts[label] += n
	}
}

// foldedUses is folded caller label's uses and denials in minute slot, own true; or, when the key counts as
// many other folded callers in the minute as it may, those of all the callers folded into OtherCallers, own false.
func (ku *keyUsage) foldedUses(label string, slot uint32) (n uint64, own bool) {
	f := ku.foldedNow
	if f == nil || f.slot != slot {
		return 0, true
	}
	if n, ok := f.counts[label]; ok || len(f.counts) < MaxFoldedPerMinute {
		return n, true
	}
	if cu := ku.callers[OtherCallers]; cu != nil {
		n = cu.minuteUses(slot)
	}
	return n, false
}

// minuteUses is the caller's uses and denials of every operation in minute slot.
func (cu *callerUsage) minuteUses(slot uint32) uint64 {
	var n uint64
	for _, sr := range cu.ops {
		if sr != nil && len(sr.minutes) > 0 && sr.minutes[len(sr.minutes)-1].slot == slot {
			b := sr.minutes[len(sr.minutes)-1]
			n += uint64(b.uses) + uint64(b.denials)
		}
	}
	return n
}

func newKeyUsage() *keyUsage {
	// denials and reported are made when first written: most keys have neither, and a mount may hold 10,000 keys.
	return &keyUsage{callers: make(map[string]*callerUsage, 1)}
}

// analytics is the mount's usage analytics.
type analytics struct {
	off      atomic.Bool // config/analytics enabled=false
	keys     perKey[*keyUsage]
	tracked  atomic.Int64 // (key, caller) pairs tracked, OtherCallers excluded
	names    sync.Map     // caller label or display name → the one copy held (intern)
	interned atomic.Int64
	// since: when analytics were last turned back on (zero: never off); uses before it may not be counted.
	since atomic.Pointer[time.Time]
}

// SetAnalytics turns usage analytics and anomaly detection on or off (config/analytics). Off, uses are neither
// counted nor judged; anomaly actions in force still apply: they are security decisions already taken. since is
// when they were last turned back on (zero: never turned off).
func (m *Manager) SetAnalytics(on bool, since time.Time) {
	m.analytics.off.Store(!on)
	m.analytics.since.Store(&since)
}

// FreeAnalytics writes what is counted in memory to storage and frees it, once analytics are off (config/analytics
// enabled=false): counts kept in storage are loaded again when analytics are turned back on and keys used. A key
// whose counts cannot be written keeps them in memory, for the next flush.
func (m *Manager) FreeAnalytics(ctx context.Context, s logical.Storage) error {
	if m.AnalyticsOn() {
		return nil
	}
	err := m.FlushAnalytics(ctx, s)
	m.analytics.keys.Range(func(name string, ku *keyUsage) bool {
		ku.mu.Lock()
		if !ku.dirty { // checked and freed under one lock: a use counted meanwhile keeps the entry
			m.freeLocked(name, ku)
		}
		ku.mu.Unlock()
		return true
	})
	return err
}

// AnalyticsOn says whether uses are counted.
func (m *Manager) AnalyticsOn() bool { return !m.analytics.off.Load() }

// keyUsage returns key name's analytics, merged with what storage holds the first time (a failed read is tried
// again by the next use or flush; counts made meanwhile are kept and merged then).
func (m *Manager) keyUsage(ctx context.Context, s logical.Storage, name string) *keyUsage {
	ku, ok := m.analytics.keys.Load(name)
	if !ok {
		ku, _ = m.analytics.keys.LoadOrStore(name, newKeyUsage())
	}
	if ku.loaded.Load() || s == nil {
		return ku
	}
	ku.mu.Lock()
	defer ku.mu.Unlock()
	if !ku.dead && !ku.loaded.Load() && m.now().Sub(ku.loadFailed) >= time.Minute {
		if err := m.loadUsageLocked(ctx, s, name, ku); err != nil {
			ku.loadFailed = m.now()
			m.log.Warn("could not read a key's usage counts; counting on in memory and merging them later", "key", name, "error", err)
		}
	}
	return ku
}

// lockLive locks ku, key name's entry as taken from keyUsage; if it was freed since (forgetUsage), it locks the
// live one instead. The caller unlocks the entry returned.
func (m *Manager) lockLive(ctx context.Context, s logical.Storage, name string, ku *keyUsage) *keyUsage {
	for ku.mu.Lock(); ku.dead; ku.mu.Lock() {
		ku.mu.Unlock()
		ku = m.keyUsage(ctx, s, name)
	}
	return ku
}

// record counts items uses of key name for op by caller: admitted when condition is "", else denied by it.
func (m *Manager) record(ctx context.Context, s logical.Storage, name string, caller Actor, op Operation, items int, condition string) {
	ku := m.keyUsage(ctx, s, name)
	now := m.now()
	n := uint64(max(items, 1))
	uses, denials := n, uint64(0)
	if condition != "" {
		uses, denials = 0, n
	}
	i := opIndex(op)
	ku = m.lockLive(ctx, s, name, ku)
	defer ku.mu.Unlock()
	label := CallerLabel(caller)
	cu, folded := m.callerLocked(ku, label, caller.DisplayName, now)
	if folded {
		mn, _, _ := slots(now)
		ku.countFolded(label, mn, n)
	}
	if cu.ops[i] == nil {
		cu.ops[i] = &series{}
	}
	cu.ops[i].add(now, uses, denials)
	cu.lastSeen = now
	ku.totals[i][0] += uses
	ku.totals[i][1] += denials
	if condition != "" {
		ku.addDenials(condition, n)
	}
	if ku.since.IsZero() || now.Before(ku.since) {
		ku.since = now
	}
	ku.dirty = true
}

// addDenials counts n denials by condition; the caller holds ku.mu.
func (ku *keyUsage) addDenials(condition string, n uint64) {
	if ku.denials == nil {
		ku.denials = map[string]uint64{}
	}
	ku.denials[condition] += n
}

// callerLocked is the caller's entry in ku, made if new: or OtherCallers' (folded true) when the key or the mount
// tracks as many callers as it may.
func (m *Manager) callerLocked(ku *keyUsage, label, display string, now time.Time) (cu *callerUsage, folded bool) {
	if cu := ku.callers[label]; cu != nil {
		if display != "" && display != cu.display {
			cu.display = m.analytics.intern(display)
		}
		return cu, false
	}
	if m.foldsLocked(ku, label) {
		m.foldLocked(ku, label)
		label, display, folded = OtherCallers, "", true
		if cu := ku.callers[label]; cu != nil {
			return cu, true
		}
	} else if label != OtherCallers {
		m.analytics.tracked.Add(1)
	}
	cu = &callerUsage{display: m.analytics.intern(display), firstSeen: now, lastSeen: now}
	ku.callers[m.analytics.intern(label)] = cu
	return cu, folded
}

// intern returns one shared copy of a caller's label or display name: a caller of many keys is held once, not
// once per key. Bounded as the callers tracked are; beyond, s itself is returned.
func (a *analytics) intern(s string) string {
	if v, ok := a.names.Load(s); ok {
		return v.(string)
	}
	if a.interned.Load() >= MaxCallersTracked*2 {
		return s
	}
	v, loaded := a.names.LoadOrStore(s, s)
	if !loaded {
		a.interned.Add(1)
	}
	return v.(string)
}

// foldsLocked says whether a caller label that ku does not track is folded into OtherCallers: the key or the
// mount tracks as many callers as it may.
func (m *Manager) foldsLocked(ku *keyUsage, label string) bool {
	return label != OtherCallers && (len(ku.callers) >= MaxCallersPerKey || m.analytics.tracked.Load() >= MaxCallersTracked)
}

// foldLocked counts a caller folded into OtherCallers, once per caller while the key remembers maxFoldedSeen.
func (m *Manager) foldLocked(ku *keyUsage, label string) {
	h := fnv.New64a()
	h.Write([]byte(label))
	sum := h.Sum64()
	if ku.foldedSeen[sum] {
		return
	}
	if ku.foldedSeen == nil {
		ku.foldedSeen = map[uint64]bool{}
	}
	if len(ku.foldedSeen) < maxFoldedSeen {
		ku.foldedSeen[sum] = true
	}
	ku.folded++
}

// forgetUsage drops a key's analytics (deleted): its usage is not kept, its history is.
func (m *Manager) forgetUsage(name string) {
	ku, ok := m.analytics.keys.Load(name)
	if !ok {
		return
	}
	ku.mu.Lock()
	defer ku.mu.Unlock()
	m.freeLocked(name, ku)
}

// freeLocked marks ku dead and takes it out of the map, under ku.mu: a use that took it before counts in the next
// entry (lockLive), and its callers are no longer tracked.
func (m *Manager) freeLocked(name string, ku *keyUsage) {
	if ku.dead {
		return
	}
	ku.dead = true
	m.analytics.keys.DeleteIf(name, func(held *keyUsage) bool { return held == ku })
	for label := range ku.callers {
		if label != OtherCallers {
			m.analytics.tracked.Add(-1)
		}
	}
}

// The stored form of a key's analytics: one entry per key. Buckets are packed as unsigned varints (slot delta,
// uses, denials), base64 in JSON, so that a key with its every caller and operation busy all week stays well
// below a storage entry's size limit.
type analyticsEntry struct {
	Since         time.Time               `json:"since"`
	Callers       map[string]callerRecord `json:"callers"`
	Totals        map[Operation][2]uint64 `json:"totals"`
	Denials       map[string]uint64       `json:"denials_by_condition"`
	Folded        uint64                  `json:"callers_folded"`
	Anomalies     []Anomaly               `json:"anomalies,omitempty"`
	Versions      map[int]VersionUse      `json:"versions,omitempty"`
	VersionsSince time.Time               `json:"versions_since,omitzero"`
	// VersionsRestarted: the counts per version were lost (an entry that could not be read) and began again at
	// VersionsSince, whatever the key's age.
	VersionsRestarted bool `json:"versions_restarted,omitempty"`
}

type callerRecord struct {
	DisplayName string                     `json:"display_name,omitempty"`
	FirstSeen   time.Time                  `json:"first_seen"`
	LastSeen    time.Time                  `json:"last_seen"`
	Ops         map[Operation]seriesRecord `json:"ops"`
}

type seriesRecord struct {
	Uses    uint64 `json:"uses"`
	Denials uint64 `json:"denials"`
	Minutes []byte `json:"minutes,omitempty"`
	Hours   []byte `json:"hours,omitempty"`
	Days    []byte `json:"days,omitempty"`
}

func packBuckets(bs []bucket) []byte {
	var out []byte
	var prev uint32
	for _, b := range bs {
		out = binary.AppendUvarint(out, uint64(b.slot-prev))
		out = binary.AppendUvarint(out, uint64(b.uses))
		out = binary.AppendUvarint(out, uint64(b.denials))
		prev = b.slot
	}
	return out
}

var errBadBuckets = errors.New("malformed buckets")

func unpackBuckets(p []byte) ([]bucket, error) {
	var out []bucket
	var slot uint64
	for len(p) > 0 {
		var v [3]uint64
		for i := range v {
			x, n := binary.Uvarint(p)
			if n <= 0 || x > uint64(^uint32(0)) {
				return nil, errBadBuckets
			}
			v[i], p = x, p[n:]
		}
		slot += v[0]
		if slot > uint64(^uint32(0)) || (len(out) > 0 && v[0] == 0) {
			return nil, errBadBuckets
		}
		out = append(out, bucket{slot: uint32(slot), uses: uint32(v[1]), denials: uint32(v[2])})
	}
	return out, nil
}

// entryLocked is ku's stored form: a copy, written after ku.mu is released.
func (ku *keyUsage) entryLocked() analyticsEntry {
	e := analyticsEntry{Since: ku.since, Callers: make(map[string]callerRecord, len(ku.callers)), Totals: map[Operation][2]uint64{},
		Denials: maps.Clone(ku.denials), Folded: ku.folded, Anomalies: slices.Clone(ku.anomalies)}
	e.VersionsSince, e.VersionsRestarted = ku.versionsSince, ku.versionsRestarted
	if len(ku.versions) > 0 {
		e.Versions = make(map[int]VersionUse, len(ku.versions))
		for v, u := range ku.versions {
			e.Versions[v] = *u
		}
	}
	for i, t := range ku.totals {
		if t != [2]uint64{} {
			e.Totals[Operations[i]] = t
		}
	}
	for label, cu := range ku.callers {
		ce := callerRecord{DisplayName: cu.display, FirstSeen: cu.firstSeen, LastSeen: cu.lastSeen, Ops: map[Operation]seriesRecord{}}
		for i, s := range cu.ops {
			if s != nil {
				ce.Ops[Operations[i]] = seriesRecord{Uses: s.uses, Denials: s.denials,
					Minutes: packBuckets(s.minutes), Hours: packBuckets(s.hours), Days: packBuckets(s.days)}
			}
		}
		e.Callers[label] = ce
	}
	return e
}

// loadUsageLocked merges the key's stored counts into ku, which holds what this process counted before; ku.mu is
// held. Stored callers are kept whatever the caps: they were within them when stored.
func (m *Manager) loadUsageLocked(ctx context.Context, s logical.Storage, name string, ku *keyUsage) error {
	raw, err := s.Get(ctx, analyticsPrefix+name)
	if err != nil {
		return err
	}
	ku.loaded.Store(true)
	if raw == nil {
		return nil
	}
	var e analyticsEntry
	if err := raw.DecodeJSON(&e); err != nil {
		m.log.Warn("a key's stored usage counts cannot be read; they start again", "key", name, "error", err)
		// What each version did is lost with them: the decrypt window counts from now, whatever the key's age.
		ku.versionsSince, ku.versionsRestarted, ku.dirty = m.now(), true, true
		return nil
	}
	now := m.now()
	mn, hr, dy := slots(now)
	if !e.Since.IsZero() && (ku.since.IsZero() || e.Since.Before(ku.since)) {
		ku.since = e.Since
	}
	if !e.VersionsSince.IsZero() && (ku.versionsSince.IsZero() || e.VersionsSince.Before(ku.versionsSince)) {
		ku.versionsSince = e.VersionsSince
	}
	ku.versionsRestarted = ku.versionsRestarted || e.VersionsRestarted
	for v, u := range e.Versions {
		if ku.versions == nil {
			ku.versions = make(map[int]*VersionUse, len(e.Versions))
		}
		if ku.versions[v] == nil {
			ku.versions[v] = &VersionUse{}
		}
		ku.versions[v].merge(u)
	}
	for op, t := range e.Totals {
		if i := opIndex(op); i >= 0 {
			ku.totals[i][0] += t[0]
			ku.totals[i][1] += t[1]
		}
	}
	for c, n := range e.Denials {
		ku.addDenials(c, n)
	}
	ku.folded += e.Folded
	ku.anomalies = append(e.Anomalies, ku.anomalies...)
	if len(ku.anomalies) > maxRecentAnomalies {
		ku.anomalies = ku.anomalies[len(ku.anomalies)-maxRecentAnomalies:]
	}
	for label, ce := range e.Callers {
		cu := ku.callers[label]
		if cu == nil {
			cu = &callerUsage{display: m.analytics.intern(ce.DisplayName), firstSeen: ce.FirstSeen, lastSeen: ce.LastSeen}
			ku.callers[m.analytics.intern(label)] = cu
			if label != OtherCallers {
				m.analytics.tracked.Add(1)
			}
		} else {
			if ce.FirstSeen.Before(cu.firstSeen) {
				cu.firstSeen = ce.FirstSeen
			}
			if ce.LastSeen.After(cu.lastSeen) {
				cu.lastSeen = ce.LastSeen
			}
			cu.judged = judgedHour{}
		}
		for op, se := range ce.Ops {
			i := opIndex(op)
			if i < 0 {
				continue
			}
			minutes, err1 := unpackBuckets(se.Minutes)
			hours, err2 := unpackBuckets(se.Hours)
			days, err3 := unpackBuckets(se.Days)
			if err := errors.Join(err1, err2, err3); err != nil {
				m.log.Warn("a key's stored usage counts of a caller cannot be read; they start again", "key", name, "caller", label, "error", err)
				continue
			}
			if cu.ops[i] == nil {
				cu.ops[i] = &series{}
			}
			sr := cu.ops[i]
			sr.uses += se.Uses
			sr.denials += se.Denials
			sr.minutes = mergeBuckets(sr.minutes, minutes, mn, MinuteBuckets)
			sr.hours = mergeBuckets(sr.hours, hours, hr, HourBuckets)
			sr.days = mergeBuckets(sr.days, days, dy, DayBuckets)
		}
	}
	return nil
}

// FlushAnalytics writes the usage counts of every key that changed since the last flush, one storage entry per
// key: for the active node's periodic function, and on a clean shutdown. A key whose stored counts could not be
// read yet is read (and merged) first, never overwritten unread; a key deleted meanwhile has its counts dropped.
// Buckets past their retention, and callers left with none, are dropped.
//
// A key not used since the flush before (its counts are as storage holds them) is released from memory
// (releaseIdle): memory follows the keys in use, not every key the mount holds, and the key's next use reads its
// counts again, once.
func (m *Manager) FlushAnalytics(ctx context.Context, s logical.Storage) error {
	var errs []error
	m.analytics.keys.Range(func(name string, ku *keyUsage) bool {
		if m.releaseIdle(name, ku) {
			return ctx.Err() == nil
		}
		if err := m.flushKey(ctx, s, name, ku); err != nil {
			errs = append(errs, fmt.Errorf("key %q: %w", name, err))
		}
		return ctx.Err() == nil
	})
	return errors.Join(errs...)
}

func (m *Manager) flushKey(ctx context.Context, s logical.Storage, name string, ku *keyUsage) error {
	ku.mu.Lock()
	if !ku.dirty || ku.dead {
		ku.mu.Unlock()
		return nil
	}
	if !ku.loaded.Load() {
		if err := m.loadUsageLocked(ctx, s, name, ku); err != nil {
			ku.mu.Unlock()
			return err
		}
	}
	m.pruneLocked(ku, m.now())
	e := ku.entryLocked()
	ku.dirty, ku.flushing = false, true // not released (releaseIdle) before storage holds e
	ku.mu.Unlock()
	defer func() {
		ku.mu.Lock()
		ku.flushing = false
		ku.mu.Unlock()
	}()

	k, err := m.Get(ctx, s, name)
	if err == nil && k == nil {
		m.forgetUsage(name) // deleted: its usage goes with it
		return nil
	}
	if err == nil {
		var entry *logical.StorageEntry
		if entry, err = logical.StorageEntryJSON(analyticsPrefix+name, e); err == nil {
			err = s.Put(ctx, entry)
		}
	}
	if err == nil {
		err = m.dropIfDeletedSince(ctx, s, name, k, ku)
	}
	if err != nil {
		ku.mu.Lock()
		ku.dirty = true // the next flush writes it
		ku.mu.Unlock()
	}
	return err
}

// releaseIdle frees key name's analytics if nothing in them is missing from storage: no use since they were
// stored or read, and nothing kept in memory only (an anomaly's repeat mark, folded callers remembered, this
// minute's folded counts). It says whether it freed them.
func (m *Manager) releaseIdle(name string, ku *keyUsage) bool {
	ku.mu.Lock()
	defer ku.mu.Unlock()
	if ku.dirty || ku.flushing || ku.dead || !ku.loaded.Load() || len(ku.reported) > 0 || len(ku.foldedSeen) > 0 {
		return false
	}
	mn, hr, _ := slots(m.now())
	if ku.foldedNow != nil && ku.foldedNow.slot == mn {
		return false
	}
	for _, cu := range ku.callers {
		if cu.judged.reportedUnusual && cu.judged.hour == hr+1 {
			return false
		}
	}
	m.freeLocked(name, ku)
	return true
}

// dropIfDeletedSince deletes the counts ku just wrote for key k if k was deleted (or deleted and made anew) since
// it was read: the deletion removed the entry before the write. Checked under the key's lock, which a deletion
// holds until it is done: one begun later removes the entry itself.
func (m *Manager) dropIfDeletedSince(ctx context.Context, s logical.Storage, name string, k *Key, ku *keyUsage) error {
	l := m.lock(name)
	l.Lock()
	now, err := m.getLocked(ctx, s, name)
	l.Unlock()
	if err != nil || (now != nil && now.CreatedAt.Equal(k.CreatedAt)) {
		return err
	}
	ku.mu.Lock()
	m.freeLocked(name, ku)
	ku.mu.Unlock()
	return s.Delete(ctx, analyticsPrefix+name)
}

// pruneLocked drops buckets past their retention, callers left with none, and repeat marks past their period.
func (m *Manager) pruneLocked(ku *keyUsage, now time.Time) {
	for label, cu := range ku.callers {
		empty := true
		for i, s := range cu.ops {
			if s == nil {
				continue
			}
			s.prune(now)
			if s.empty() {
				cu.ops[i] = nil
				continue
			}
			empty = false
		}
		if empty {
			delete(ku.callers, label)
			if label != OtherCallers {
				m.analytics.tracked.Add(-1)
			}
		}
	}
	for mark, at := range ku.reported {
		if now.Sub(at) >= anomalyRepeatPeriod {
			delete(ku.reported, mark)
		}
	}
}

// UsageReport is keys/:name/usage: a key's uses and denials as the active node counts them, in total, per
// operation and per caller, with each caller's buckets (oldest first).
type UsageReport struct {
	Key     string `json:"key"`
	Enabled bool   `json:"analytics_enabled"`
	// Since is when this engine first counted a use of the key (absent: none counted).
	Since              *time.Time                   `json:"since,omitempty"`
	Uses               uint64                       `json:"uses"`
	Denials            uint64                       `json:"denials"`
	DenialsByCondition map[string]uint64            `json:"denials_by_condition"`
	Operations         map[Operation]OperationUsage `json:"operations"`
	CallersFolded      uint64                       `json:"callers_folded"`
	Bounds             UsageBounds                  `json:"bounds"`
}

// OperationUsage is a key's use for one operation.
type OperationUsage struct {
	Uses    uint64                 `json:"uses"`
	Denials uint64                 `json:"denials"`
	Callers map[string]CallerUsage `json:"callers"`
}

// CallerUsage is one caller's use of one operation of a key.
type CallerUsage struct {
	DisplayName string    `json:"display_name,omitempty"`
	FirstSeen   time.Time `json:"first_seen"`
	LastSeen    time.Time `json:"last_seen"`
	Uses        uint64    `json:"uses"`
	Denials     uint64    `json:"denials"`
	Minutes     []Bucket  `json:"minutes"`
	Hours       []Bucket  `json:"hours"`
	Days        []Bucket  `json:"days"`
}

// Bucket is the uses and denials of one minute, hour or day, from Start.
type Bucket struct {
	Start   time.Time `json:"start"`
	Uses    uint32    `json:"uses"`
	Denials uint32    `json:"denials"`
}

// UsageBounds are the bounds analytics keeps to.
type UsageBounds struct {
	MinuteBuckets     int `json:"minute_buckets"`
	HourBuckets       int `json:"hour_buckets"`
	DayBuckets        int `json:"day_buckets"`
	MaxCallersPerKey  int `json:"max_callers_per_key"`
	MaxCallersTracked int `json:"max_callers_tracked"`
}

var usageBounds = UsageBounds{MinuteBuckets, HourBuckets, DayBuckets, MaxCallersPerKey, MaxCallersTracked}

func bucketsView(bs []bucket, unit time.Duration, now, keep uint32) []Bucket {
	out := []Bucket{}
	for _, b := range bs {
		if b.slot+keep > now {
			out = append(out, Bucket{Start: time.Unix(int64(b.slot)*int64(unit/time.Second), 0).UTC(), Uses: b.uses, Denials: b.denials})
		}
	}
	return out
}

// UsageOf is what keys/:name/usage shows of key name: what memory holds on this node, with no storage or HSM
// call. A key no use has touched since the process started shows its stored counts only once read (Usage).
func (m *Manager) UsageOf(name string) UsageReport {
	r := UsageReport{Key: name, Enabled: m.AnalyticsOn(), DenialsByCondition: map[string]uint64{},
		Operations: map[Operation]OperationUsage{}, Bounds: usageBounds}
	ku, ok := m.analytics.keys.Load(name)
	if !ok {
		return r
	}
	ku.mu.Lock()
	defer ku.mu.Unlock()
	return m.usageReportLocked(name, ku)
}

// usageReportLocked is key name's report from ku, whose mutex the caller holds.
func (m *Manager) usageReportLocked(name string, ku *keyUsage) UsageReport {
	r := UsageReport{Key: name, Enabled: m.AnalyticsOn(), DenialsByCondition: map[string]uint64{},
		Operations: map[Operation]OperationUsage{}, Bounds: usageBounds}
	now := m.now()
	mn, hr, dy := slots(now)
	if !ku.since.IsZero() {
		since := ku.since.UTC()
		r.Since = &since
	}
	for c, n := range ku.denials {
		r.DenialsByCondition[c] = n
	}
	r.CallersFolded = ku.folded
	for i, op := range Operations {
		t := ku.totals[i]
		ou := OperationUsage{Uses: t[0], Denials: t[1], Callers: map[string]CallerUsage{}}
		for label, cu := range ku.callers {
			s := cu.ops[i]
			if s == nil {
				continue
			}
			ou.Callers[label] = CallerUsage{DisplayName: cu.display, FirstSeen: cu.firstSeen.UTC(), LastSeen: cu.lastSeen.UTC(),
				Uses: s.uses, Denials: s.denials,
				Minutes: bucketsView(s.minutes, time.Minute, mn, MinuteBuckets),
				Hours:   bucketsView(s.hours, time.Hour, hr, HourBuckets),
				Days:    bucketsView(s.days, 24*time.Hour, dy, DayBuckets)}
		}
		if t != [2]uint64{} || len(ou.Callers) > 0 {
			r.Operations[op] = ou
		}
		r.Uses += t[0]
		r.Denials += t[1]
	}
	return r
}

// Usage is UsageOf, with the key's stored counts read first if memory does not hold them (no use since the process
// started, or released while idle: one storage read), read from the entry so loaded.
func (m *Manager) Usage(ctx context.Context, s logical.Storage, name string) UsageReport {
	ku := m.lockLive(ctx, s, name, m.keyUsage(ctx, s, name))
	defer ku.mu.Unlock()
	return m.usageReportLocked(name, ku)
}
