package keys

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// countingPuts counts the writes of storage entries under a prefix: what admission costs in storage.
type countingPuts struct {
	logical.Storage
	mu     sync.Mutex
	prefix string
	puts   int
}

func (s *countingPuts) Put(ctx context.Context, e *logical.StorageEntry) error {
	s.mu.Lock()
	if strings.HasPrefix(e.Key, s.prefix) {
		s.puts++
	}
	s.mu.Unlock()
	return s.Storage.Put(ctx, e)
}

func (s *countingPuts) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.puts
}

// grantsFixture is a key on a real token, and managers of its storage with a clock the test sets.
type grantsFixture struct {
	t     *testing.T
	ctx   context.Context
	tok   *hsm.Token
	mount string
	s     *countingPuts
	now   time.Time
	mu    sync.Mutex
}

func (f *grantsFixture) clock() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *grantsFixture) setClock(t time.Time) {
	f.mu.Lock()
	f.now = t
	f.mu.Unlock()
}

// manager is a new Manager of the fixture's storage: a fresh process (after a crash or on another node).
func (f *grantsFixture) manager() *Manager {
	m := NewManager(hclog.NewNullLogger(), f.mount, func(context.Context, logical.Storage) (HSM, *Nonces, error) { return f.tok, nil, nil })
	m.Clock = f.clock
	return m
}

func (f *grantsFixture) key(m *Manager, name string, access *Access) *Key {
	f.t.Helper()
	k, _, err := m.Create(f.ctx, f.s, &Key{Name: name, Type: TypeAES256GCM96, DeletionAllowed: true, Access: access}, who, nil)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { _, _ = f.tok.DestroyKeys(context.Background(), k.Versions[1].ID()) })
	return k
}

func (f *grantsFixture) grant(m *Manager, name string, r GrantRequest) GrantStatus {
	f.t.Helper()
	g, err := m.CreateGrant(f.ctx, f.s, name, Actor{EntityID: "owner-entity", DisplayName: "owner", Accessor: "owner-accessor"}, r)
	if err != nil {
		f.t.Fatal(err)
	}
	return g
}

func (f *grantsFixture) admit(m *Manager, k *Key, entityID string, info *EntityInfo, op Operation, items int) (bool, error) {
	return m.admitByGrant(f.ctx, f.s, k, Caller{Actor: Actor{EntityID: entityID}}, info, op, items)
}

// grantInUse is key k with an hour's grant to entity e, which has admitted one use.
func (f *grantsFixture) grantInUse() (*Manager, *Key, GrantStatus) {
	f.t.Helper()
	m := f.manager()
	k := f.key(m, "k", nil)
	g := f.grant(m, "k", GrantRequest{EntityID: "e", TTL: time.Hour})
	if ok, err := f.admit(m, k, "e", nil, OpEncrypt, 1); err != nil || !ok {
		f.t.Fatalf("live grant: admitted %v, %v", ok, err)
	}
	return m, k, g
}

// useUp uses k one use at a time until no grant admits entityID, failing past most uses; it returns the uses.
func (f *grantsFixture) useUp(m *Manager, k *Key, entityID string, op Operation, most int) int {
	f.t.Helper()
	for n := 0; ; n++ {
		ok, err := f.admit(m, k, entityID, nil, op, 1)
		if err != nil {
			f.t.Fatal(err)
		}
		if !ok {
			return n
		}
		if n == most {
			f.t.Fatalf("more than %d uses admitted", most)
		}
	}
}

// events returns the key's history events of kind.
func (f *grantsFixture) events(m *Manager, name, kind string) []Event {
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

func onGrantsFixture(t *testing.T, fn func(t *testing.T, f *grantsFixture)) {
	onProvingAndUnprovingTokens(t, func(t *testing.T, kind tokentest.Kind, tok *hsm.Token) {
		f := &grantsFixture{t: t, ctx: context.Background(), tok: tok, mount: fmt.Sprintf("grants-%s-%d-%s", kind, os.Getpid(), strings.ReplaceAll(t.Name(), "/", "-")),
			s: &countingPuts{Storage: &logical.InmemStorage{}, prefix: grantsPrefix}, now: time.Date(2026, 12, 6, 9, 0, 0, 0, time.UTC)}
		fn(t, f)
	})
}

func TestGrantAdmitsItsGranteeForItsOperations(t *testing.T) {
	onGrantsFixture(t, func(t *testing.T, f *grantsFixture) {
		m := f.manager()
		k := f.key(m, "k", nil)
		f.grant(m, "k", GrantRequest{EntityID: "contractor", Operations: []Operation{OpDecrypt}, TTL: time.Hour})
		f.grant(m, "k", GrantRequest{Group: "ops", Operations: []Operation{OpEncrypt}, TTL: time.Hour})
		f.grant(m, "k", GrantRequest{Group: "group-id-2", Operations: []Operation{OpSign}, TTL: time.Hour})
		ops := &EntityInfo{Groups: []GroupRef{{ID: "group-id-1", Name: "ops"}}}
		auditors := &EntityInfo{Groups: []GroupRef{{ID: "group-id-2", Name: "auditors"}}}
		for _, c := range []struct {
			entity string
			info   *EntityInfo
			op     Operation
			want   bool
		}{
			{"contractor", nil, OpDecrypt, true},
			{"contractor", nil, OpEncrypt, false}, // not its operation
			{"someone-else", nil, OpDecrypt, false},
			{"", nil, OpDecrypt, false},               // a token without an entity
			{"member", ops, OpEncrypt, true},          // group by name
			{"member", ops, OpDecrypt, false},         // not the group's operation
			{"member", auditors, OpSign, true},        // group by id
			{"member", auditors, OpEncrypt, false},    // another group's grant
			{"contractor", auditors, OpDecrypt, true}, // entity grant, whatever its groups
		} {
			got, err := f.admit(m, k, c.entity, c.info, c.op, 1)
			if err != nil {
				t.Fatal(err)
			}
			if got != c.want {
				t.Errorf("entity %q groups %v %s: admitted %v, want %v", c.entity, c.info, c.op, got, c.want)
			}
		}
		created := f.events(m, "k", "grant_created")
		if len(created) != 3 {
			t.Fatalf("%d grant_created events, want 3", len(created))
		}
		if e := created[0]; e.EntityID != "owner-entity" || !strings.Contains(e.Details, "granted by owner (entity owner-entity)") ||
			!strings.Contains(e.Details, "to entity contractor for decrypt") || e.AccessorHMAC == "" || strings.Contains(fmt.Sprint(e), "owner-accessor") {
			t.Errorf("grant_created event %+v", e)
		}
	})
}

func TestGrantExpiresExactlyAtItsTime(t *testing.T) {
	onGrantsFixture(t, func(t *testing.T, f *grantsFixture) {
		m := f.manager()
		k := f.key(m, "k", nil)
		g := f.grant(m, "k", GrantRequest{EntityID: "e", TTL: 2 * time.Hour})
		idle := f.grant(m, "k", GrantRequest{EntityID: "idle", TTL: 2 * time.Hour})
		if !g.ExpiresAt.Equal(f.clock().Add(2 * time.Hour)) {
			t.Fatalf("expires_at %s, want the clock plus the ttl", g.ExpiresAt)
		}
		f.setClock(g.ExpiresAt.Add(-time.Nanosecond))
		if ok, err := f.admit(m, k, "e", nil, OpEncrypt, 1); err != nil || !ok {
			t.Fatalf("a nanosecond before expiry: admitted %v, %v", ok, err)
		}
		f.setClock(g.ExpiresAt)
		// A fresh manager (a restart, another node) judges by the stored expiry just as well.
		for _, mm := range []*Manager{m, f.manager()} {
			if ok, err := f.admit(mm, k, "e", nil, OpEncrypt, 1); err != nil || ok {
				t.Fatalf("at expiry: admitted %v, %v", ok, err)
			}
		}
		if ok, _ := f.admit(m, k, "e", nil, OpEncrypt, 1); ok {
			t.Fatal("admitted after expiry")
		}
		st, err := m.GrantByID(f.ctx, f.s, "k", g.ID)
		if err != nil || st == nil || st.State != GrantExpired {
			t.Fatalf("read after expiry: %+v, %v", st, err)
		}
		if ev := f.events(m, "k", "grant_expired"); len(ev) != 1 || !strings.Contains(ev[0].Details, "granted by owner") ||
			!strings.Contains(ev[0].Details, "grant "+g.ID) {
			t.Fatalf("grant_expired events %+v, want one naming the grant and who granted it", ev)
		}
		// The grant nobody uses again has its end recorded by the periodic function, once, in a process that
		// has read no grant yet.
		fresh := f.manager()
		for range 2 {
			if err := fresh.Tick(f.ctx, f.s, f.clock()); err != nil {
				t.Fatal(err)
			}
		}
		if ev := f.events(m, "k", "grant_expired"); len(ev) != 2 || !strings.Contains(ev[1].Details, "grant "+idle.ID) {
			t.Fatalf("grant_expired events after ticks %+v, want the idle grant's once", ev)
		}
	})
}

// The uses of a grant are reserved in blocks stored before they are used: a process that dies with part of a
// block unused loses that part, and the next process (a restart, another node) never admits more uses in all than
// max_uses. Storage is written once per block, not once per use.
func TestGrantUsesNeverExceedMaxUsesAcrossACrash(t *testing.T) {
	onGrantsFixture(t, func(t *testing.T, f *grantsFixture) {
		first := f.manager()
		k := f.key(first, "k", nil)
		g := f.grant(first, "k", GrantRequest{EntityID: "e", MaxUses: 25}) // blocks of 2 uses
		writesBefore := f.s.count()
		admitted := 0
		for range 7 {
			ok, err := f.admit(first, k, "e", nil, OpDecrypt, 1)
			if err != nil || !ok {
				t.Fatalf("use %d: %v, %v", admitted+1, ok, err)
			}
			admitted++
		}
		if w := f.s.count() - writesBefore; w > 4 {
			t.Errorf("%d grant writes for 7 uses: a write per use", w)
		}
		e, err := f.s.Get(f.ctx, grantsKey("k", g.ID))
		if err != nil {
			t.Fatal(err)
		}
		var stored Grant
		if err := e.DecodeJSON(&stored); err != nil {
			t.Fatal(err)
		}
		if stored.Reserved <= 7 {
			t.Fatalf("reserved %d after 7 uses: the crash below loses nothing, so proves nothing", stored.Reserved)
		}
		// The first process dies here, with uses reserved and unused; the next one reads the grant from storage.
		second := f.manager()
		admitted += f.useUp(second, k, "e", OpDecrypt, 25)
		if want := 25 - int(stored.Reserved-7); admitted != want {
			t.Errorf("%d uses admitted in all, want %d (max_uses less what the crash lost)", admitted, want)
		}
		st, err := second.GrantByID(f.ctx, f.s, "k", g.ID)
		if err != nil {
			t.Fatal(err)
		}
		if st.State != GrantUsedUp || st.Uses != 25 || st.Remaining != 0 {
			t.Errorf("after use-out: state %s uses %d remaining %d", st.State, st.Uses, st.Remaining)
		}
		// A third process admits nothing either.
		if ok, err := f.admit(f.manager(), k, "e", nil, OpDecrypt, 1); err != nil || ok {
			t.Fatalf("after a second restart: admitted %v, %v", ok, err)
		}
		if ev := f.events(second, "k", "grant_used_up"); len(ev) != 1 {
			t.Fatalf("%d grant_used_up events, want 1", len(ev))
		}
	})
}

func TestGrantBatchBeyondTheUsesLeftIsRefusedWhole(t *testing.T) {
	onGrantsFixture(t, func(t *testing.T, f *grantsFixture) {
		m := f.manager()
		k := f.key(m, "k", nil)
		g := f.grant(m, "k", GrantRequest{EntityID: "e", MaxUses: 5, TTL: time.Hour})
		if ok, err := f.admit(m, k, "e", nil, OpEncrypt, 3); err != nil || !ok {
			t.Fatalf("batch of 3: %v, %v", ok, err)
		}
		_, err := f.admit(m, k, "e", nil, OpEncrypt, 3)
		var denied *DeniedError
		if !errors.As(err, &denied) || denied.Condition != "grant" || !strings.Contains(err.Error(), "2 uses left") {
			t.Fatalf("batch of 3 with 2 uses left: %v, want a grant denial naming the 2 uses left", err)
		}
		if st, _ := m.GrantByID(f.ctx, f.s, "k", g.ID); st.Uses != 3 {
			t.Fatalf("the refused batch counted: %d uses", st.Uses)
		}
		if ok, err := f.admit(m, k, "e", nil, OpEncrypt, 2); err != nil || !ok {
			t.Fatalf("batch of 2 with 2 uses left: %v, %v", ok, err)
		}
		if ok, err := f.admit(m, k, "e", nil, OpEncrypt, 1); err != nil || ok {
			t.Fatalf("after use-out: admitted %v, %v (want no grant, not a denial)", ok, err)
		}
		if ev := f.events(m, "k", "grant_used_up"); len(ev) != 1 || !strings.Contains(ev[0].Details, "uses made: 5") {
			t.Fatalf("grant_used_up events %+v, want one", ev)
		}
	})
}

func TestGrantRevokedAdmitsNothing(t *testing.T) {
	onGrantsFixture(t, func(t *testing.T, f *grantsFixture) {
		m, k, g := f.grantInUse()
		revoker := Actor{EntityID: "custodian", DisplayName: "custodian"}
		for range 2 {
			st, err := m.RevokeGrant(f.ctx, f.s, "k", g.ID, revoker)
			if err != nil || st == nil || st.State != GrantRevoked || st.RevokedBy.EntityID != "custodian" {
				t.Fatalf("revoke: %+v, %v", st, err)
			}
		}
		for _, mm := range []*Manager{m, f.manager()} {
			if ok, err := f.admit(mm, k, "e", nil, OpEncrypt, 1); err != nil || ok {
				t.Fatalf("revoked grant: admitted %v, %v", ok, err)
			}
		}
		ev := f.events(m, "k", "grant_revoked")
		if len(ev) != 1 || ev[0].EntityID != "custodian" || !strings.Contains(ev[0].Details, "granted by owner") {
			t.Fatalf("grant_revoked events %+v, want one by the custodian naming who granted it", ev)
		}
		if st, err := m.RevokeGrant(f.ctx, f.s, "k", "no-such-grant", revoker); err != nil || st != nil {
			t.Fatalf("revoking an unknown grant: %+v, %v", st, err)
		}
	})
}

// Grants are read once per process; a change stored by another node reaches this one through Vault's
// invalidation, and the key's deletion takes its grants with it.
func TestGrantsCachedInvalidatedAndDeletedWithTheKey(t *testing.T) {
	onGrantsFixture(t, func(t *testing.T, f *grantsFixture) {
		m, k, g := f.grantInUse()
		other := f.manager()
		if _, err := other.RevokeGrant(f.ctx, f.s, "k", g.ID, who); err != nil {
			t.Fatal(err)
		}
		if ok, _ := f.admit(m, k, "e", nil, OpEncrypt, 1); !ok {
			t.Fatal("the grant was read from storage again without an invalidation: no cache")
		}
		m.Invalidate(grantsKey("k", g.ID))
		if ok, _ := f.admit(m, k, "e", nil, OpEncrypt, 1); ok {
			t.Fatal("the grant revoked on another node still admits after its invalidation")
		}

		f.grant(m, "k", GrantRequest{EntityID: "e", TTL: time.Hour})
		if _, err := m.Update(f.ctx, f.s, "k", who, func(tx *Tx) error { return tx.Delete(0) }); err != nil {
			t.Fatal(err)
		}
		if left, err := f.s.List(f.ctx, grantsPrefix+"k/"); err != nil || len(left) != 0 {
			t.Fatalf("grants left after the key's deletion: %v, %v", left, err)
		}
		k2 := f.key(m, "k", nil)
		if ok, err := f.admit(m, k2, "e", nil, OpEncrypt, 1); err != nil || ok {
			t.Fatalf("a new key of the deleted key's name admitted by its grant: %v, %v", ok, err)
		}
	})
}

func TestGrantTTLIsBounded(t *testing.T) {
	onGrantsFixture(t, func(t *testing.T, f *grantsFixture) {
		m := f.manager()
		f.key(m, "bounded", &Access{MaxGrantTTL: 2 * time.Hour})
		f.key(m, "free", nil)
		for _, c := range []struct {
			key  string
			r    GrantRequest
			want string // part of the refusal; empty: accepted
		}{
			{"bounded", GrantRequest{EntityID: "e", TTL: 2 * time.Hour}, ""},
			{"bounded", GrantRequest{EntityID: "e", TTL: 2*time.Hour + time.Second}, "exceeds the key's max_grant_ttl"},
			{"free", GrantRequest{EntityID: "e", TTL: MaxGrantTTLCeiling}, ""},
			{"free", GrantRequest{EntityID: "e", TTL: MaxGrantTTLCeiling + time.Second}, "exceeds the ceiling"},
			{"free", GrantRequest{EntityID: "e"}, "needs a ttl or max_uses"},
			{"free", GrantRequest{EntityID: "e", Group: "g", TTL: time.Hour}, "one grantee"},
			{"free", GrantRequest{TTL: time.Hour}, "one grantee"},
			{"free", GrantRequest{EntityID: "e", TTL: time.Hour, Operations: []Operation{"launch"}}, `unknown operation "launch"`},
			{"missing", GrantRequest{EntityID: "e", TTL: time.Hour}, "not found"},
			{"free", GrantRequest{EntityID: "e", TTL: time.Hour, Reason: strings.Repeat("x", maxGrantReason+1)}, "reason is longer"},
		} {
			_, err := m.CreateGrant(f.ctx, f.s, c.key, who, c.r)
			switch {
			case c.want == "" && err != nil:
				t.Errorf("%s %+v: %v", c.key, c.r, err)
			case c.want != "" && (!IsCaller(err) || !strings.Contains(err.Error(), c.want)):
				t.Errorf("%s %+v: %v, want a caller error with %q", c.key, c.r, err, c.want)
			}
		}
		// Only max_uses: the grant lasts the longest ttl allowed.
		g, err := m.CreateGrant(f.ctx, f.s, "bounded", who, GrantRequest{EntityID: "e", MaxUses: 3})
		if err != nil || !g.ExpiresAt.Equal(f.clock().Add(2*time.Hour)) || len(g.Operations) != len(Operations) {
			t.Fatalf("grant by max_uses only: %+v, %v", g, err)
		}
	})
}

// Concurrent uses of one grant, single and in batches, are admitted up to max_uses exactly, never beyond (run
// with -race).
func TestGrantConcurrentUsesStopAtMaxUses(t *testing.T) {
	onGrantsFixture(t, func(t *testing.T, f *grantsFixture) {
		m := f.manager()
		k := f.key(m, "k", nil)
		f.grant(m, "k", GrantRequest{EntityID: "e", MaxUses: 200, TTL: time.Hour})
		var mu sync.Mutex
		admitted := 0
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				items := 1 + w%3
				for range 40 {
					ok, err := f.admit(m, k, "e", nil, OpEncrypt, items)
					if err != nil && !IsDenied(err) {
						t.Error(err)
						return
					}
					if ok {
						mu.Lock()
						admitted += items
						mu.Unlock()
					}
				}
			}()
		}
		wg.Wait()
		admitted += f.useUp(m, k, "e", OpEncrypt, 200) // what batches larger than the rest left
		if admitted != 200 {
			t.Fatalf("%d uses admitted, want max_uses (200) exactly", admitted)
		}
	})
}
