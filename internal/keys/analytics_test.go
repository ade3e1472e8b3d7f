package keys

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// usageFixture is a mount's storage on a real token, with a clock the test moves, the log lines and the anomalies
// the metrics would count.
type usageFixture struct {
	t     *testing.T
	ctx   context.Context
	tok   *hsm.Token
	mount string
	s     logical.Storage

	mu        sync.Mutex
	now       time.Time
	log       bytes.Buffer
	anomalies map[string]int // kind → count, as Observer.Anomaly heard them
}

func (f *usageFixture) clock() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *usageFixture) advance(d time.Duration) {
	f.mu.Lock()
	f.now = f.now.Add(d)
	f.mu.Unlock()
}

func (f *usageFixture) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.log.Write(p)
}

func (f *usageFixture) logged() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.log.String()
}

func (f *usageFixture) Judging(context.Context, string, Operation, *Key)       {}
func (f *usageFixture) Denied(string, string)                                  {}
func (f *usageFixture) Rotated(string, string)                                 {}
func (f *usageFixture) DeprecatedUse(context.Context, string, Type, time.Time) {}
func (f *usageFixture) Anomaly(_, kind string) {
	f.mu.Lock()
	f.anomalies[kind]++
	f.mu.Unlock()
}

func (f *usageFixture) anomalyCount(kind string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.anomalies[kind]
}

// manager is a new Manager of the fixture's storage: a fresh process (after a restart, or on another node).
func (f *usageFixture) manager() *Manager {
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: f})
	m := NewManager(log, f.mount, func(context.Context, logical.Storage) (HSM, *Nonces, error) { return f.tok, nil, nil })
	m.Clock = f.clock
	m.Observer = f
	return m
}

func (f *usageFixture) key(m *Manager, k *Key) {
	f.t.Helper()
	k.Type = TypeAES256GCM96
	k.DeletionAllowed = true
	made, _, err := m.Create(f.ctx, f.s, k, who, nil)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { _, _ = f.tok.DestroyKeys(context.Background(), made.Versions[1].ID()) })
}

func (f *usageFixture) use(m *Manager, name string, c Caller, op Operation, items int) error {
	c.Identity = testIdentities
	_, err := m.Use(f.ctx, f.s, name, c, op, items)
	return err
}

func (f *usageFixture) mustUse(m *Manager, name string, c Caller, op Operation, items int) {
	f.t.Helper()
	if err := f.use(m, name, c, op, items); err != nil {
		f.t.Fatalf("%s by %s at %s: %v", op, f.label(m, c), f.clock().Format(time.RFC3339), err)
	}
}

// label is what c's uses are tracked under: for a token without an entity, its accessor's HMAC.
func (f *usageFixture) label(m *Manager, c Caller) string {
	f.t.Helper()
	a, err := m.withAccessorHMAC(f.ctx, f.s, c.Actor)
	if err != nil {
		f.t.Fatal(err)
	}
	return CallerLabel(a)
}

func (f *usageFixture) historyOf(m *Manager, name, kind string) []Event {
	f.t.Helper()
	all, err := m.History(f.ctx, f.s, name, 0)
	if err != nil {
		f.t.Fatal(err)
	}
	var out []Event
	for _, e := range all {
		if e.Event == kind {
			out = append(out, e)
		}
	}
	return out
}

func onUsageFixture(t *testing.T, fn func(t *testing.T, f *usageFixture)) {
	onProvingAndUnprovingTokens(t, func(t *testing.T, kind tokentest.Kind, tok *hsm.Token) {
		f := &usageFixture{t: t, ctx: context.Background(), tok: tok, s: &logical.InmemStorage{}, anomalies: map[string]int{},
			mount: fmt.Sprintf("usage-%s-%d-%s", kind, os.Getpid(), strings.ReplaceAll(t.Name(), "/", "-")),
			now:   time.Date(2026, 12, 7, 0, 0, 0, 0, time.UTC)}
		fn(t, f)
	})
}

var (
	alice = Caller{Actor: Actor{EntityID: "ent-alice", DisplayName: "userpass-alice", Accessor: "acc-alice"}, RemoteAddr: "10.0.0.1"}
	bob   = Caller{Actor: Actor{EntityID: "ent-bob", DisplayName: "userpass-bob"}, RemoteAddr: "10.0.0.2"}
	root  = Caller{Actor: Actor{DisplayName: "root", Accessor: "root-accessor"}, RemoteAddr: "10.0.0.3"}
)

func wantDeniedBy(t *testing.T, err error, condition string) {
	t.Helper()
	var d *DeniedError
	if !errors.As(err, &d) || d.Condition != condition {
		t.Fatalf("want a denial by %s, got %v", condition, err)
	}
}

func TestUsageCountsItemsPerOperationCallerAndOutcome(t *testing.T) {
	onUsageFixture(t, func(t *testing.T, f *usageFixture) {
		m := f.manager()
		f.key(m, &Key{Name: "k"})
		f.mustUse(m, "k", alice, OpEncrypt, 100) // a batch of 100 is 100 uses
		f.mustUse(m, "k", alice, OpDecrypt, 1)
		f.mustUse(m, "k", root, OpEncrypt, 3)
		if _, err := m.Update(f.ctx, f.s, "k", who, func(tx *Tx) error {
			return tx.SetAccess(&Access{AllowedCIDRs: []string{"10.0.0.1/32"}})
		}); err != nil {
			t.Fatal(err)
		}
		wantDeniedBy(t, f.use(m, "k", bob, OpEncrypt, 5), "allowed_cidrs")
		f.advance(2 * time.Minute)
		f.mustUse(m, "k", alice, OpEncrypt, 1)

		r := m.UsageOf("k")
		if r.Uses != 105 || r.Denials != 5 || r.DenialsByCondition["allowed_cidrs"] != 5 {
			t.Fatalf("totals: uses %d denials %d by condition %v", r.Uses, r.Denials, r.DenialsByCondition)
		}
		enc := r.Operations[OpEncrypt]
		if enc.Uses != 104 || enc.Denials != 5 || r.Operations[OpDecrypt].Uses != 1 {
			t.Fatalf("per operation: %+v", r.Operations)
		}
		a := enc.Callers["ent-alice"]
		if a.Uses != 101 || len(a.Minutes) != 2 || a.Minutes[0].Uses != 100 || a.Minutes[1].Uses != 1 ||
			len(a.Hours) != 1 || a.Hours[0].Uses != 101 || len(a.Days) != 1 || a.Days[0].Uses != 101 {
			t.Fatalf("alice's encryptions: %+v", a)
		}
		if !a.Minutes[1].Start.Equal(f.clock().Truncate(time.Minute)) || a.DisplayName != "userpass-alice" {
			t.Fatalf("alice's last minute starts %s, display name %q", a.Minutes[1].Start, a.DisplayName)
		}
		if b := enc.Callers["ent-bob"]; b.Uses != 0 || b.Denials != 5 || b.Minutes[0].Denials != 5 {
			t.Fatalf("bob's denied encryptions: %+v", b)
		}
		// A token without an entity is tracked under its accessor's HMAC, never its accessor.
		if r := enc.Callers[f.label(m, root)]; r.Uses != 3 || r.DisplayName != "root" {
			t.Fatalf("root's encryptions: %+v (callers %v)", r, enc.Callers)
		}
		for label := range enc.Callers {
			if strings.Contains(label, "accessor") {
				t.Fatalf("caller label %q carries the token's accessor", label)
			}
		}

		m.SetAnalytics(false, time.Time{})
		f.mustUse(m, "k", alice, OpEncrypt, 7)
		if r := m.UsageOf("k"); r.Uses != 105 || r.Enabled {
			t.Fatalf("with analytics off: uses %d, enabled %v", r.Uses, r.Enabled)
		}
	})
}

// TestUsageSurvivesARestartWithinAFlush: what a node counted and flushed is what the next process starts from, and
// the counts of two processes add up; nothing is written per request.
func TestUsageSurvivesARestartWithinAFlush(t *testing.T) {
	onUsageFixture(t, func(t *testing.T, f *usageFixture) {
		puts := &countingPuts{Storage: f.s, prefix: analyticsPrefix}
		f.s = puts
		m := f.manager()
		f.key(m, &Key{Name: "k"})
		for range 50 {
			f.mustUse(m, "k", alice, OpEncrypt, 2)
		}
		if puts.count() != 0 {
			t.Fatalf("%d storage writes of usage counts before a flush", puts.count())
		}
		if err := m.FlushAnalytics(f.ctx, f.s); err != nil {
			t.Fatal(err)
		}
		if err := m.FlushAnalytics(f.ctx, f.s); err != nil { // nothing changed since: nothing written
			t.Fatal(err)
		}
		if puts.count() != 1 {
			t.Fatalf("%d writes for one key's flush, want 1", puts.count())
		}

		f.advance(time.Hour)
		restarted := f.manager()
		if r := restarted.Usage(f.ctx, f.s, "k"); r.Uses != 100 || r.Operations[OpEncrypt].Callers["ent-alice"].Hours[0].Uses != 100 {
			t.Fatalf("after a restart: %+v", r)
		}
		f.mustUse(restarted, "k", alice, OpEncrypt, 5)
		f.mustUse(restarted, "k", bob, OpDecrypt, 1)
		if err := restarted.FlushAnalytics(f.ctx, f.s); err != nil {
			t.Fatal(err)
		}
		// Storage fails to give the stored counts: this process counts on, and its flush reads them first and adds
		// its own, never writing its counts alone over them.
		unreadable := &failingGets{Storage: f.s, prefix: analyticsPrefix, failing: true}
		healthy := f.s
		f.s = unreadable
		again := f.manager()
		f.mustUse(again, "k", alice, OpEncrypt, 1)
		f.s = healthy
		if err := again.FlushAnalytics(f.ctx, unreadable); err == nil {
			t.Fatal("a flush wrote counts it could not merge with storage's")
		}
		unreadable.setFailing(false)
		if err := again.FlushAnalytics(f.ctx, unreadable); err != nil {
			t.Fatal(err)
		}
		again = f.manager()
		r := again.Usage(f.ctx, f.s, "k")
		a := r.Operations[OpEncrypt].Callers["ent-alice"]
		if r.Uses != 107 || a.Uses != 106 || len(a.Hours) != 2 || a.Hours[1].Uses != 6 || !a.FirstSeen.Equal(f.clock().Add(-time.Hour)) {
			t.Fatalf("after a second restart: uses %d, alice %+v", r.Uses, a)
		}

		// A deleted key's usage goes with it; its history stays.
		if _, err := again.Update(f.ctx, f.s, "k", who, func(tx *Tx) error { return tx.Delete(0) }); err != nil {
			t.Fatal(err)
		}
		if e, _ := f.s.Get(f.ctx, analyticsPrefix+"k"); e != nil || again.UsageOf("k").Uses != 0 {
			t.Fatalf("usage of a deleted key kept: entry %v, report %+v", e, again.UsageOf("k"))
		}
		if err := again.FlushAnalytics(f.ctx, f.s); err != nil {
			t.Fatal(err)
		}
		if e, _ := f.s.Get(f.ctx, analyticsPrefix+"k"); e != nil {
			t.Fatal("a flush wrote the usage of a deleted key")
		}
	})
}

// failingGets fails the reads of storage entries under prefix while failing.
type failingGets struct {
	logical.Storage
	mu      sync.Mutex
	prefix  string
	failing bool
}

func (s *failingGets) setFailing(on bool) {
	s.mu.Lock()
	s.failing = on
	s.mu.Unlock()
}

func (s *failingGets) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	s.mu.Lock()
	failing := s.failing && strings.HasPrefix(key, s.prefix)
	s.mu.Unlock()
	if failing {
		return nil, errors.New("storage unavailable")
	}
	return s.Storage.Get(ctx, key)
}

// TestUsageMemoryIsBoundedWhateverTheCallers: callers beyond a key's cap, and pairs beyond the mount's, are counted
// under OtherCallers, and how many were folded is counted.
func TestUsageMemoryIsBoundedWhateverTheCallers(t *testing.T) {
	m := NewManager(hclog.NewNullLogger(), "mount", nil)
	now := time.Date(2026, 12, 7, 9, 0, 0, 0, time.UTC)
	m.Clock = func() time.Time { return now }
	ctx, s := context.Background(), &logical.InmemStorage{}
	for i := range 200 {
		m.record(ctx, s, "busy", Actor{EntityID: fmt.Sprintf("ent-%d", i)}, OpEncrypt, 1, "")
		m.record(ctx, s, "busy", Actor{EntityID: fmt.Sprintf("ent-%d", i)}, OpEncrypt, 1, "") // again: folded once
	}
	r := m.UsageOf("busy")
	enc := r.Operations[OpEncrypt]
	if len(enc.Callers) != MaxCallersPerKey+1 || r.CallersFolded != 200-MaxCallersPerKey ||
		enc.Callers[OtherCallers].Uses != 2*(200-MaxCallersPerKey) || enc.Uses != 400 {
		t.Fatalf("one key, 200 callers: %d tracked, %d folded, %d uses under %s, %d in all",
			len(enc.Callers), r.CallersFolded, enc.Callers[OtherCallers].Uses, OtherCallers, enc.Uses)
	}
	// Many keys: the mount tracks at most MaxCallersTracked pairs.
	keysNeeded := MaxCallersTracked/MaxCallersPerKey + 10
	for k := range keysNeeded {
		for c := range MaxCallersPerKey {
			m.record(ctx, s, fmt.Sprintf("k%d", k), Actor{EntityID: fmt.Sprintf("ent-%d", c)}, OpDecrypt, 1, "")
		}
	}
	if n := m.analytics.tracked.Load(); n != MaxCallersTracked {
		t.Fatalf("%d (key, caller) pairs tracked, want the cap %d", n, MaxCallersTracked)
	}
	last := m.UsageOf(fmt.Sprintf("k%d", keysNeeded-1))
	if cs := last.Operations[OpDecrypt].Callers; len(cs) != 1 || cs[OtherCallers].Uses != MaxCallersPerKey || last.CallersFolded != MaxCallersPerKey {
		t.Fatalf("a key past the mount's cap: callers %v, folded %d", cs, last.CallersFolded)
	}
	// Old buckets go, and a caller left with none: the pairs it held are free again.
	now = now.Add(time.Duration(DayBuckets+1) * 24 * time.Hour)
	m.analytics.keys.Range(func(_ string, ku *keyUsage) bool {
		ku.mu.Lock()
		m.pruneLocked(ku, now)
		ku.mu.Unlock()
		return true
	})
	if n := m.analytics.tracked.Load(); n != 0 {
		t.Fatalf("%d pairs still tracked after every bucket expired", n)
	}
}

// Uses are counted while flushes write: nothing is lost or counted twice (run with -race).
func TestUsageCountedWhileFlushing(t *testing.T) {
	m := NewManager(hclog.NewNullLogger(), "mount", func(context.Context, logical.Storage) (HSM, *Nonces, error) { return nil, nil, nil })
	ctx, s := context.Background(), &logical.InmemStorage{}
	if err := store(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, nil); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 500 {
				condition := ""
				if i%5 == 0 {
					condition = "allowed_cidrs"
				}
				m.record(ctx, s, "k", Actor{EntityID: fmt.Sprintf("ent-%d", w)}, OpEncrypt, 2, condition)
			}
		}()
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 50 {
			if err := m.FlushAnalytics(ctx, s); err != nil {
				t.Error(err)
			}
		}
	}()
	wg.Wait()
	<-done
	if err := m.FlushAnalytics(ctx, s); err != nil {
		t.Fatal(err)
	}
	r := NewManager(hclog.NewNullLogger(), "mount", nil).Usage(ctx, s, "k")
	if r.Uses != 4*400*2 || r.Denials != 4*100*2 || r.DenialsByCondition["allowed_cidrs"] != 4*100*2 {
		t.Fatalf("stored after concurrent uses and flushes: %d uses, %d denials", r.Uses, r.Denials)
	}
}

func TestOperationCount(t *testing.T) {
	if len(Operations) != operationCount {
		t.Fatalf("operationCount is %d, Operations has %d: usage per operation would lose some", operationCount, len(Operations))
	}
}

func TestBucketsPackAndUnpack(t *testing.T) {
	bs := []bucket{{slot: 7, uses: 1}, {slot: 9, uses: ^uint32(0), denials: 3}, {slot: 1 << 30, denials: 1}}
	got, err := unpackBuckets(packBuckets(bs))
	if err != nil || fmt.Sprint(got) != fmt.Sprint(bs) {
		t.Fatalf("unpacked %v, %v; want %v", got, err, bs)
	}
	for _, bad := range [][]byte{{0x80}, {1, 1, 1, 0, 1, 1}} {
		if _, err := unpackBuckets(bad); err == nil {
			t.Errorf("%x unpacked", bad)
		}
	}
}

// steady uses key name by c at perMinute uses each minute for d, moving the clock.
func (f *usageFixture) steady(m *Manager, name string, c Caller, perMinute int, d time.Duration) {
	f.t.Helper()
	for end := f.clock().Add(d); f.clock().Before(end); f.advance(time.Minute) {
		f.mustUse(m, name, c, OpEncrypt, perMinute)
	}
}

// TestBurstAboveTheBaselineBlocksTheCaller: steady use for hours raises nothing; a burst far above the caller's own
// rate is an anomaly (log, history, metric), and block_caller denies that request and the caller's next ones until
// the period lapses, also on another node; others are not blocked.
func TestBurstAboveTheBaselineBlocksTheCaller(t *testing.T) {
	onUsageFixture(t, func(t *testing.T, f *usageFixture) {
		m := f.manager()
		f.key(m, &Key{Name: "k", OnAnomaly: ActionBlockCaller, AnomalyActionPeriod: 30 * time.Minute})
		f.steady(m, "k", alice, 150, 8*time.Hour) // above burstMinPerMinute: only the baseline tells it is usual
		f.steady(m, "k", bob, 150, 10*time.Minute)
		if len(m.AnomaliesOf("k")) != 0 || f.anomalyCount(AnomalyRateAboveBaseline) != 0 {
			t.Fatalf("steady load raised %v", m.AnomaliesOf("k"))
		}
		f.mustUse(m, "k", alice, OpEncrypt, 150)
		f.mustUse(m, "k", alice, OpEncrypt, 1000) // 1150 this minute: not 10 times 150
		f.advance(time.Minute)
		err := f.use(m, "k", alice, OpEncrypt, 1600)
		wantDeniedBy(t, err, "anomaly")
		got := m.AnomaliesOf("k")
		if len(got) != 1 || got[0].Kind != AnomalyRateAboveBaseline || got[0].Caller != "ent-alice" || got[0].Action != ActionBlockCaller ||
			got[0].Until == nil || !got[0].Until.Equal(f.clock().Add(30*time.Minute)) {
			t.Fatalf("anomalies: %+v", got)
		}
		if f.anomalyCount(AnomalyRateAboveBaseline) != 1 {
			t.Fatalf("metric: %v", f.anomalies)
		}
		logged := f.logged()
		if !strings.Contains(logged, "[WARN]") || !strings.Contains(logged, "key=k") || !strings.Contains(logged, "caller=ent-alice") ||
			!strings.Contains(logged, "anomaly="+AnomalyRateAboveBaseline) {
			t.Fatalf("log: %s", logged)
		}
		ev := f.historyOf(m, "k", "anomaly")
		if len(ev) != 1 || ev[0].EntityID != "ent-alice" || !strings.Contains(ev[0].Details, AnomalyRateAboveBaseline) ||
			ev[0].AccessorHMAC == "" || strings.Contains(ev[0].Details, "acc-alice") {
			t.Fatalf("history: %+v", ev)
		}
		f.advance(time.Minute)
		wantDeniedBy(t, f.use(m, "k", alice, OpDecrypt, 1), "anomaly")
		f.mustUse(m, "k", bob, OpEncrypt, 150)
		// Another node (a failover) enforces the stored block.
		other := f.manager()
		wantDeniedBy(t, f.use(other, "k", alice, OpEncrypt, 1), "anomaly")
		if r := m.UsageOf("k"); r.DenialsByCondition["anomaly"] != 1601 {
			t.Fatalf("denials by anomaly: %v", r.DenialsByCondition)
		}
		f.advance(30 * time.Minute)
		f.mustUse(m, "k", alice, OpEncrypt, 1)
		f.mustUse(other, "k", alice, OpEncrypt, 1)
		if n := len(f.historyOf(m, "k", "anomaly")); n != 1 {
			t.Fatalf("%d anomaly events, want 1", n)
		}
		// The block lapsed: a new burst is judged again. Lifted, the burst is excused.
		wantDeniedBy(t, f.use(m, "k", alice, OpEncrypt, 1600), "anomaly")
		if n := len(f.historyOf(m, "k", "anomaly")); n != 2 {
			t.Fatalf("%d anomaly events, want 2", n)
		}
		if _, err := m.LiftAnomalyAction(f.ctx, f.s, "k", "ent-alice", who); err != nil {
			t.Fatal(err)
		}
		f.mustUse(m, "k", alice, OpEncrypt, 1600)
	})
}

// TestRateCapRequiresAGrant: uses past anomaly_rate_limit in a minute are an anomaly; require_grant then admits the
// caller only under a live grant, until an operator lifts it. Repeats are reported once per period.
func TestRateCapRequiresAGrant(t *testing.T) {
	onUsageFixture(t, func(t *testing.T, f *usageFixture) {
		m := f.manager()
		f.key(m, &Key{Name: "k", OnAnomaly: ActionRequireGrant, AnomalyRateLimit: 50})
		f.mustUse(m, "k", alice, OpEncrypt, 40)
		f.mustUse(m, "k", alice, OpDecrypt, 10) // 50: at the cap, not past it
		wantDeniedBy(t, f.use(m, "k", alice, OpEncrypt, 1), "anomaly")
		if got := m.AnomaliesOf("k"); len(got) != 1 || got[0].Kind != AnomalyRateAboveLimit || got[0].Action != ActionRequireGrant {
			t.Fatalf("anomalies: %+v", got)
		}
		wantDeniedBy(t, f.use(m, "k", root, OpEncrypt, 51), "anomaly") // a token without an entity can hold no grant
		f.advance(time.Minute)
		wantDeniedBy(t, f.use(m, "k", alice, OpEncrypt, 1), "anomaly")
		if _, err := m.CreateGrant(f.ctx, f.s, "k", who, GrantRequest{EntityID: "ent-alice", TTL: time.Hour}); err != nil {
			t.Fatal(err)
		}
		f.mustUse(m, "k", alice, OpEncrypt, 1)
		actions, err := m.AnomalyActions(f.ctx, f.s, "k")
		if err != nil || len(actions) != 2 {
			t.Fatalf("actions in force: %+v, %v", actions, err)
		}
		lifted, err := m.LiftAnomalyAction(f.ctx, f.s, "k", f.label(m, root), Actor{EntityID: "ent-operator", DisplayName: "operator"})
		if err != nil || lifted == nil || lifted.Action != ActionRequireGrant {
			t.Fatalf("lift: %+v, %v", lifted, err)
		}
		f.advance(time.Minute)
		f.mustUse(m, "k", root, OpEncrypt, 1)
		if ev := f.historyOf(m, "k", "anomaly_action_lifted"); len(ev) != 1 || ev[0].EntityID != "ent-operator" {
			t.Fatalf("lift events: %+v", ev)
		}
		// Alert only: a burst that goes on is reported once per repeat period.
		f.key(m, &Key{Name: "watched", AnomalyRateLimit: 10})
		for range 20 {
			f.mustUse(m, "watched", bob, OpEncrypt, 11)
			f.advance(time.Minute)
		}
		if got := m.AnomaliesOf("watched"); len(got) != 2 || got[0].Action != ActionAlert || got[0].Until != nil {
			t.Fatalf("20 minutes past the cap raised %d anomalies, want 2: %+v", len(got), got)
		}
	})
}

// TestNewCallerAndUnusualHour: a key with the same two callers for days sees a third as new; a caller that has
// used a key in office hours for days is unusual at 03:00.
func TestNewCallerAndUnusualHour(t *testing.T) {
	onUsageFixture(t, func(t *testing.T, f *usageFixture) {
		m := f.manager()
		f.key(m, &Key{Name: "k"})
		for range 4 {
			for h := 9; h <= 17; h++ {
				f.mustUse(m, "k", alice, OpEncrypt, 1)
				f.mustUse(m, "k", bob, OpDecrypt, 1)
				f.advance(time.Hour)
			}
			f.advance(15 * time.Hour) // 09:00 the next day
		}
		if got := m.AnomaliesOf("k"); len(got) != 0 {
			t.Fatalf("usual use raised %+v", got)
		}
		f.mustUse(m, "k", alice, OpEncrypt, 1) // 09:00: usual
		f.mustUse(m, "k", root, OpEncrypt, 1)
		if got := m.AnomaliesOf("k"); len(got) != 1 || got[0].Kind != AnomalyNewCaller || got[0].Caller != f.label(m, root) {
			t.Fatalf("a new caller: %+v", got)
		}
		f.mustUse(m, "k", Caller{Actor: Actor{EntityID: "ent-carol"}}, OpEncrypt, 1) // the callers changed: no longer settled
		f.advance(18 * time.Hour)                                                    // 03:00
		f.mustUse(m, "k", alice, OpEncrypt, 1)
		f.mustUse(m, "k", alice, OpEncrypt, 1) // reported once an hour
		got := m.AnomaliesOf("k")
		if len(got) != 2 || got[1].Kind != AnomalyUnusualHour || got[1].Caller != "ent-alice" || !strings.Contains(got[1].Details, "03:00") {
			t.Fatalf("a use at 03:00: %+v", got)
		}
		if f.anomalyCount(AnomalyNewCaller) != 1 || f.anomalyCount(AnomalyUnusualHour) != 1 {
			t.Fatalf("metrics: %v", f.anomalies)
		}
		// Still reported once an hour when the key's analytics could be released while idle: the repeat marks
		// are past their period, but the hour's report is held in memory, and keeps them there.
		f.advance(20 * time.Minute) // 03:20
		for range 3 {
			if err := m.FlushAnalytics(f.ctx, f.s); err != nil {
				t.Fatal(err)
			}
		}
		f.mustUse(m, "k", alice, OpEncrypt, 1)
		if f.anomalyCount(AnomalyUnusualHour) != 1 {
			t.Fatalf("the hour's unusual use reported again after idle flushes: %v", f.anomalies)
		}
	})
}

// Turning analytics off writes the counts to storage and frees their memory; back on, a key's counts go on from
// what was stored.
func TestAnalyticsOffFreesTheirMemoryAndKeepsTheCounts(t *testing.T) {
	onUsageFixture(t, func(t *testing.T, f *usageFixture) {
		m := f.manager()
		f.key(m, &Key{Name: "k"})
		f.mustUse(m, "k", alice, OpEncrypt, 3)
		f.mustUse(m, "k", bob, OpEncrypt, 1)
		m.SetAnalytics(false, time.Time{})
		if err := m.FreeAnalytics(f.ctx, f.s); err != nil {
			t.Fatal(err)
		}
		held := m.analytics.keys.Len()
		if held != 0 || m.analytics.tracked.Load() != 0 {
			t.Fatalf("analytics off still hold %d keys' counts, %d callers tracked", held, m.analytics.tracked.Load())
		}
		f.mustUse(m, "k", alice, OpEncrypt, 1) // not counted
		m.SetAnalytics(true, time.Time{})
		f.mustUse(m, "k", alice, OpEncrypt, 1)
		if r := m.UsageOf("k"); r.Uses != 5 || r.Operations[OpEncrypt].Callers["ent-alice"].Uses != 4 {
			t.Fatalf("back on: %+v", r)
		}
	})
}

// TestFoldedCallersAreJudgedAgainstTheRateCap: a caller folded into OtherCallers (the key tracks as many callers as
// it may) is still judged against anomaly_rate_limit, on its own uses in the minute, and the key's action applies
// to it alone; when the key counts as many folded callers in a minute as it may, the whole group is judged, and the
// anomaly says so.
func TestFoldedCallersAreJudgedAgainstTheRateCap(t *testing.T) {
	onUsageFixture(t, func(t *testing.T, f *usageFixture) {
		m := f.manager()
		f.key(m, &Key{Name: "k", OnAnomaly: ActionBlockCaller, AnomalyRateLimit: 5})
		for i := range MaxCallersPerKey {
			f.mustUse(m, "k", Caller{Actor: Actor{EntityID: fmt.Sprintf("ent-%d", i)}}, OpEncrypt, 1)
		}
		late, later := Caller{Actor: Actor{EntityID: "ent-late"}}, Caller{Actor: Actor{EntityID: "ent-later"}}
		f.mustUse(m, "k", late, OpEncrypt, 3)
		f.mustUse(m, "k", later, OpEncrypt, 3)
		wantDeniedBy(t, f.use(m, "k", late, OpEncrypt, 3), "anomaly") // 6 this minute, past the cap of 5
		f.mustUse(m, "k", later, OpEncrypt, 2)                        // 5: its own count, at the cap
		got := m.AnomaliesOf("k")
		if len(got) != 1 || got[0].Kind != AnomalyRateAboveLimit || got[0].Caller != "ent-late" || got[0].Action != ActionBlockCaller {
			t.Fatalf("anomalies: %+v", got)
		}
		if r := m.UsageOf("k"); r.Operations[OpEncrypt].Callers["ent-late"].Uses != 0 || r.CallersFolded != 2 {
			t.Fatalf("the late callers are tracked: %+v", r.Operations[OpEncrypt].Callers["ent-late"])
		}
		// A crowd of folded callers in one minute: past what the key counts one by one, the group is judged.
		f.advance(time.Minute)
		for i := range MaxFoldedPerMinute {
			f.mustUse(m, "k", Caller{Actor: Actor{EntityID: fmt.Sprintf("crowd-%d", i)}}, OpEncrypt, 1)
		}
		wantDeniedBy(t, f.use(m, "k", Caller{Actor: Actor{EntityID: "crowd-last"}}, OpEncrypt, 1), "anomaly")
		got = m.AnomaliesOf("k")
		if last := got[len(got)-1]; last.Caller != "crowd-last" || !strings.Contains(last.Details, OtherCallers) {
			t.Fatalf("the crowd's anomaly: %+v", last)
		}
		f.mustUse(m, "k", Caller{Actor: Actor{EntityID: "crowd-0"}}, OpEncrypt, 1) // counted on its own: 2
	})
}

// TestNewCallerJudgedWhenTheMountTracksItsCap: a new caller on a key with settled callers is an anomaly even when
// the mount tracks as many (key, caller) pairs as it may, and the newcomer is folded.
func TestNewCallerJudgedWhenTheMountTracksItsCap(t *testing.T) {
	onUsageFixture(t, func(t *testing.T, f *usageFixture) {
		m := f.manager()
		f.key(m, &Key{Name: "k"})
		f.mustUse(m, "k", alice, OpEncrypt, 1)
		f.mustUse(m, "k", bob, OpEncrypt, 1)
		f.advance(newCallerSettledFor + time.Hour)
		for k := 0; m.analytics.tracked.Load() < MaxCallersTracked; k++ {
			for c := range MaxCallersPerKey {
				m.record(f.ctx, f.s, fmt.Sprintf("filler-%d", k), Actor{EntityID: fmt.Sprintf("ent-%d", c)}, OpEncrypt, 1, "")
			}
		}
		f.mustUse(m, "k", Caller{Actor: Actor{EntityID: "ent-carol"}}, OpEncrypt, 1)
		if got := m.AnomaliesOf("k"); len(got) != 1 || got[0].Kind != AnomalyNewCaller || got[0].Caller != "ent-carol" {
			t.Fatalf("a new caller while the mount tracks its cap: %+v", got)
		}
	})
}

// countingGets counts the reads of entries under prefix.
type countingGets struct {
	logical.Storage
	mu     sync.Mutex
	prefix string
	gets   int
}

func (s *countingGets) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	s.mu.Lock()
	if strings.HasPrefix(key, s.prefix) {
		s.gets++
	}
	s.mu.Unlock()
	return s.Storage.Get(ctx, key)
}

// TestTokensWithoutAnEntityAreCallersEach: two tokens without an entity and with the same display name (two root
// tokens) are two callers, named by their accessor's HMAC: blocking one leaves the other; the salt is read once.
func TestTokensWithoutAnEntityAreCallersEach(t *testing.T) {
	onUsageFixture(t, func(t *testing.T, f *usageFixture) {
		salts := &countingGets{Storage: f.s, prefix: saltLocation}
		f.s = salts
		m := f.manager()
		f.key(m, &Key{Name: "k", OnAnomaly: ActionBlockCaller, AnomalyRateLimit: 5})
		otherRoot := Caller{Actor: Actor{DisplayName: "root", Accessor: "root-accessor-2"}}
		f.mustUse(m, "k", root, OpEncrypt, 5)
		wantDeniedBy(t, f.use(m, "k", root, OpEncrypt, 1), "anomaly")
		f.mustUse(m, "k", otherRoot, OpEncrypt, 5) // another token: not blocked, its own count
		h, err := m.AccessorHMAC(f.ctx, f.s, "root-accessor")
		if err != nil {
			t.Fatal(err)
		}
		label := "token:" + h
		if f.label(m, root) != label {
			t.Fatalf("root's label %q, want %q", f.label(m, root), label)
		}
		got := m.AnomaliesOf("k")
		if len(got) != 1 || got[0].Caller != label {
			t.Fatalf("anomalies: %+v, want one by %s", got, label)
		}
		enc := m.UsageOf("k").Operations[OpEncrypt]
		if len(enc.Callers) != 2 || enc.Callers[label].DisplayName != "root" || enc.Callers[label].Uses != 5 {
			t.Fatalf("callers: %+v", enc.Callers)
		}
		for c := range enc.Callers {
			if strings.Contains(c, "root-accessor") {
				t.Fatalf("a caller label shows the accessor: %q", c)
			}
		}
		if _, err := m.LiftAnomalyAction(f.ctx, f.s, "k", label, who); err != nil {
			t.Fatal(err)
		}
		before := salts.gets
		f.advance(time.Minute)
		for range 3 {
			f.mustUse(m, "k", root, OpEncrypt, 1)
		}
		if salts.gets != before {
			t.Fatalf("%d reads of the salt for 3 uses", salts.gets-before)
		}
	})
}

// deletingOnPut deletes key name (through m) when the first write of its usage counts begins: a deletion between
// the flush's check that the key exists and its write.
type deletingOnPut struct {
	logical.Storage
	t    *testing.T
	m    *Manager
	name string
	once sync.Once
}

func (s *deletingOnPut) Put(ctx context.Context, e *logical.StorageEntry) error {
	if e.Key == analyticsPrefix+s.name {
		s.once.Do(func() {
			if _, err := s.m.Update(ctx, s.Storage, s.name, who, func(tx *Tx) error { return tx.Delete(0) }); err != nil {
				s.t.Error(err)
			}
		})
	}
	return s.Storage.Put(ctx, e)
}

// TestFlushRacingADeletionLeavesNoCounts: a key deleted while its counts are being flushed leaves no counts in
// storage, and a new key of the same name starts with no callers.
func TestFlushRacingADeletionLeavesNoCounts(t *testing.T) {
	onUsageFixture(t, func(t *testing.T, f *usageFixture) {
		m := f.manager()
		f.key(m, &Key{Name: "k"})
		f.mustUse(m, "k", alice, OpEncrypt, 1)
		if err := m.FlushAnalytics(f.ctx, &deletingOnPut{Storage: f.s, t: t, m: m, name: "k"}); err != nil {
			t.Fatal(err)
		}
		if k, err := m.Get(f.ctx, f.s, "k"); err != nil || k != nil {
			t.Fatalf("the key was not deleted: %v %v", k, err)
		}
		if e, err := f.s.Get(f.ctx, analyticsPrefix+"k"); err != nil || e != nil {
			t.Fatalf("a deleted key's counts are in storage (%v): %v", e != nil, err)
		}
		f.key(m, &Key{Name: "k"})
		if r := m.Usage(f.ctx, f.s, "k"); r.Uses != 0 || len(r.Operations) != 0 {
			t.Fatalf("a new key of the same name inherits: %+v", r)
		}
	})
}

// TestUseCountedWhileItsKeyCountsAreFreed: a use that holds a key's counts while they are freed (analytics turned
// off, or the key deleted) counts into a live entry: nothing lost, and the callers tracked are those held.
func TestUseCountedWhileItsKeyCountsAreFreed(t *testing.T) {
	for _, free := range []string{"analytics off", "key deleted"} {
		t.Run(free, func(t *testing.T) {
			ctx, s := context.Background(), &logical.InmemStorage{}
			m := NewManager(hclog.NewNullLogger(), "mount", nil)
			if err := store(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, nil); err != nil {
				t.Fatal(err)
			}
			var armed atomic.Bool
			m.Clock = func() time.Time {
				if armed.CompareAndSwap(true, false) { // in record, between taking the entry and locking it
					if free == "analytics off" {
						m.SetAnalytics(false, time.Time{})
						if err := m.FreeAnalytics(ctx, s); err != nil {
							t.Error(err)
						}
					} else {
						m.forgetUsage("k")
					}
				}
				return time.Date(2026, 12, 7, 9, 0, 0, 0, time.UTC)
			}
			m.record(ctx, s, "k", Actor{EntityID: "ent-alice"}, OpEncrypt, 1, "")
			armed.Store(true)
			m.record(ctx, s, "k", Actor{EntityID: "ent-carol"}, OpEncrypt, 1, "")
			held := int64(0)
			m.analytics.keys.Range(func(_ string, ku *keyUsage) bool {
				held += int64(len(ku.callers))
				return true
			})
			if n := m.analytics.tracked.Load(); n != held {
				t.Fatalf("%d callers tracked, %d held", n, held)
			}
			r := m.Usage(ctx, s, "k")
			want := map[string]uint64{"analytics off": 2, "key deleted": 1}[free]
			if r.Uses != want || r.Operations[OpEncrypt].Callers["ent-carol"].Uses != 1 {
				t.Fatalf("after the entry was freed under a use: %d uses, %+v", r.Uses, r.Operations[OpEncrypt].Callers)
			}
		})
	}
}

// The door's own cost of usage analytics (counting and anomaly judging) per use, against analytics off: 16
// callers' worth of parallel uses of one key, with the fake HSM, so that only the engine's code is measured.
// `go test -run '^$' -bench BenchmarkUse -cpu 2 ./internal/keys/`
func BenchmarkUseWithAnalytics(b *testing.B)    { benchmarkUse(b, true) }
func BenchmarkUseWithoutAnalytics(b *testing.B) { benchmarkUse(b, false) }

func benchmarkUse(b *testing.B, analytics bool) {
	f := newFakeHSM()
	m := NewManager(hclog.NewNullLogger(), "mount", func(context.Context, logical.Storage) (HSM, *Nonces, error) { return f, nil, nil })
	s := &logical.InmemStorage{}
	ctx := context.Background()
	if _, _, err := m.Create(ctx, s, &Key{Name: "k", Type: TypeAES256GCM96}, who, nil); err != nil {
		b.Fatal(err)
	}
	m.SetAnalytics(analytics, time.Time{})
	c := Caller{Actor: Actor{DisplayName: "root", Accessor: "accessor"}}
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := m.Use(ctx, s, "k", c, OpEncrypt, 1); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// A key not used for a whole flush interval has its analytics released from memory once storage holds them; its
// next use reads them again, and nothing counted is lost. A key with something kept in memory only (an anomaly's
// repeat mark) stays.
func TestIdleKeysAnalyticsAreReleasedAndReadAgain(t *testing.T) {
	onUsageFixture(t, func(t *testing.T, f *usageFixture) {
		m := f.manager()
		f.key(m, &Key{Name: "idle"})
		f.key(m, &Key{Name: "busy"})
		f.mustUse(m, "idle", alice, OpEncrypt, 3)
		held := func(name string) bool { _, ok := m.analytics.keys.Load(name); return ok }
		flush := func() {
			t.Helper()
			if err := m.FlushAnalytics(f.ctx, f.s); err != nil {
				t.Fatal(err)
			}
		}
		flush() // stores idle's counts; it was used in this interval
		if !held("idle") {
			t.Fatal("a key used since the last flush was released")
		}
		f.mustUse(m, "busy", bob, OpEncrypt, 1)
		flush() // idle: unused for a whole interval, stored: released; busy: used, stored, kept
		if held("idle") || !held("busy") || m.analytics.tracked.Load() != 1 {
			t.Fatalf("after an idle interval: idle held %v, busy held %v, %d callers tracked", held("idle"), held("busy"), m.analytics.tracked.Load())
		}
		f.mustUse(m, "idle", alice, OpEncrypt, 2)
		if r := m.UsageOf("idle"); r.Uses != 5 || r.Operations[OpEncrypt].Callers["ent-alice"].Uses != 5 {
			t.Fatalf("released, then used again: %+v", r)
		}
		flush()
		flush()
		if r := m.Usage(f.ctx, f.s, "idle"); r.Uses != 5 {
			t.Fatalf("read again after a second release: %+v", r)
		}

		// A repeat mark lives in memory only: the key is kept while it stands.
		m.excuse(f.ctx, f.s, "busy", "ent-bob")
		flush()
		flush()
		if !held("busy") {
			t.Fatal("a key with an anomaly's repeat mark was released")
		}
	})
}
