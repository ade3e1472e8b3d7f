package keys

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"
)

// identityStore answers for the entities a test names, as Vault's identity store would through the system view.
type identityStore map[string]*EntityInfo

func (s identityStore) Entity(_ context.Context, id string) (*EntityInfo, error) {
	if id == "fail" {
		return nil, errors.New("identity store unreachable")
	}
	return s[id], nil
}

var testIdentities = identityStore{
	"ent-alice": {Name: "alice", Metadata: map[string]string{"device": "managed", "team": "payments"},
		Groups: []GroupRef{{ID: "grp-1", Name: "payments-ops"}}},
	"ent-bob": {Name: "bob", Metadata: map[string]string{"device": "byod"}},
}

func admitWith(t *testing.T, a *Access, now time.Time, c Caller, op Operation) error {
	t.Helper()
	if a != nil {
		if err := a.Validate(); err != nil {
			t.Fatalf("validate %+v: %v", a, err)
		}
	}
	m := NewManager(hclog.NewNullLogger(), "mount", nil)
	m.Clock = func() time.Time { return now }
	c.Identity = testIdentities
	m.grants.Store("k", &grantSet{byID: map[string]*liveGrant{}}) // the key holds no grants (grants_test.go tests them)
	return m.Admit(context.Background(), &logical.InmemStorage{}, &Key{Name: "k", Access: a}, c, op, 1)
}

// wantDenied checks a denial names the condition and carries none of the other conditions' values.
func wantDenied(t *testing.T, err error, condition string, secrets ...string) {
	t.Helper()
	var d *DeniedError
	if !errors.As(err, &d) {
		t.Fatalf("want a denial by %s, got %v", condition, err)
	}
	if d.Condition != condition || !strings.Contains(err.Error(), strings.Split(condition, "/")[0]) {
		t.Fatalf("denied by %q (%v), want %q named", d.Condition, err, condition)
	}
	for _, s := range secrets {
		if strings.Contains(err.Error(), s) {
			t.Fatalf("denial %q reveals %q, another condition's value", err, s)
		}
	}
}

func TestAdmitChecksSourceAddress(t *testing.T) {
	now := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	a := &Access{AllowedCIDRs: []string{"127.0.0.1/32", "10.1.0.0/16"}, AllowedGroups: []string{"payments-ops"}}
	alice := Caller{Actor: Actor{EntityID: "ent-alice"}}
	for _, src := range []string{"127.0.0.1", "10.1.200.3", "127.0.0.1:53422", "::ffff:10.1.0.9"} {
		alice.RemoteAddr = src
		if err := admitWith(t, a, now, alice, OpEncrypt); err != nil {
			t.Errorf("from %s: %v", src, err)
		}
	}
	for _, src := range []string{"127.0.0.2", "10.2.0.1", "", "not-an-address"} {
		alice.RemoteAddr = src
		wantDenied(t, admitWith(t, a, now, alice, OpDecrypt), "allowed_cidrs", "payments-ops", "10.1.0.0")
	}
}

func TestAdmitChecksHoursInTheKeysTimeZone(t *testing.T) {
	a := &Access{AllowedHours: []string{"mon-fri 09:00-17:30", "sat 22:00-02:00"}, TimeZone: "Europe/Paris"}
	c := Caller{RemoteAddr: "127.0.0.1"}
	paris, _ := time.LoadLocation("Europe/Paris")
	cases := []struct {
		at   time.Time
		open bool
	}{
		{time.Date(2026, 12, 7, 9, 0, 0, 0, paris), true},     // Monday, opening minute
		{time.Date(2026, 12, 7, 8, 59, 0, 0, paris), false},   // a minute early
		{time.Date(2026, 12, 7, 17, 29, 0, 0, paris), true},   // last minute
		{time.Date(2026, 12, 7, 17, 30, 0, 0, paris), false},  // closed
		{time.Date(2026, 12, 7, 8, 30, 0, 0, time.UTC), true}, // 09:30 in Paris
		{time.Date(2026, 12, 6, 12, 0, 0, 0, paris), false},   // Sunday noon
		{time.Date(2026, 12, 12, 23, 0, 0, 0, paris), true},   // Saturday night
		{time.Date(2026, 12, 13, 1, 59, 0, 0, paris), true},   // Sunday 01:59: Saturday's window
		{time.Date(2026, 12, 13, 2, 0, 0, 0, paris), false},
		{time.Date(2026, 12, 12, 1, 0, 0, 0, paris), false}, // Saturday 01:00: Friday opened no night window
	}
	for _, tc := range cases {
		err := admitWith(t, a, tc.at, c, OpSign)
		if tc.open && err != nil {
			t.Errorf("%s: %v", tc.at, err)
		}
		if !tc.open {
			wantDenied(t, err, "allowed_hours", "09:00", "Europe/Paris")
		}
	}
}

func TestAdmitChecksIdentity(t *testing.T) {
	now := time.Now()
	alice := Caller{Actor: Actor{EntityID: "ent-alice"}}
	bob := Caller{Actor: Actor{EntityID: "ent-bob"}}
	root := Caller{Actor: Actor{DisplayName: "root"}}

	byGroup := &Access{AllowedGroups: []string{"payments-ops"}}
	if err := admitWith(t, byGroup, now, alice, OpHMAC); err != nil {
		t.Errorf("alice by group name: %v", err)
	}
	if err := admitWith(t, &Access{AllowedGroups: []string{"grp-1"}}, now, alice, OpHMAC); err != nil {
		t.Errorf("alice by group id: %v", err)
	}
	wantDenied(t, admitWith(t, byGroup, now, bob, OpHMAC), "allowed_groups", "payments-ops")
	wantDenied(t, admitWith(t, byGroup, now, root, OpHMAC), "entity")

	byEntity := &Access{AllowedEntityIDs: []string{"ent-bob"}}
	if err := admitWith(t, byEntity, now, bob, OpEncrypt); err != nil {
		t.Errorf("bob by entity: %v", err)
	}
	wantDenied(t, admitWith(t, byEntity, now, alice, OpEncrypt), "allowed_entity_ids", "ent-bob")

	meta := &Access{RequiredEntityMetadata: map[string]string{"device": "managed"}}
	if err := admitWith(t, meta, now, alice, OpDecrypt); err != nil {
		t.Errorf("alice with managed device: %v", err)
	}
	wantDenied(t, admitWith(t, meta, now, bob, OpDecrypt), "required_entity_metadata", "managed")
	wantDenied(t, admitWith(t, meta, now, Caller{Actor: Actor{EntityID: "ent-unknown"}}, OpDecrypt), "entity") // not in the identity store
	wantDenied(t, admitWith(t, byEntity, now, Caller{Actor: Actor{EntityID: "ent-unknown"}}, OpDecrypt), "entity")
	wantDenied(t, admitWith(t, &Access{RequiredEntityMetadata: map[string]string{"clearance": ""}}, now, alice, OpDecrypt), "required_entity_metadata") // an empty value asks for the key
	wantDenied(t, admitWith(t, meta, now, root, OpDecrypt), "entity")

	// The identity store cannot answer: no admission (closed), and not the caller's fault.
	err := admitWith(t, meta, now, Caller{Actor: Actor{EntityID: "fail"}}, OpDecrypt)
	if err == nil || IsDenied(err) {
		t.Fatalf("identity store down: want an internal error, got %v", err)
	}

	required := &Access{GrantsRequired: true}
	wantDenied(t, admitWith(t, required, now, alice, OpEncrypt), "grants_required")
}

func TestAdmitGovernsOnlyTheOperationsNamed(t *testing.T) {
	a := &Access{AllowedCIDRs: []string{"10.0.0.0/8"}, Operations: []Operation{OpDecrypt, OpRewrap}}
	c := Caller{RemoteAddr: "127.0.0.1"}
	for _, op := range Operations {
		err := admitWith(t, a, time.Now(), c, op)
		if op == OpDecrypt || op == OpRewrap {
			wantDenied(t, err, "allowed_cidrs")
		} else if err != nil {
			t.Errorf("%s is not governed: %v", op, err)
		}
	}
	if err := admitWith(t, nil, time.Now(), c, OpDecrypt); err != nil {
		t.Errorf("no settings: %v", err)
	}
}

func TestAccessValidate(t *testing.T) {
	bad := []*Access{
		{AllowedCIDRs: []string{"10.0.0.0/33"}},
		{AllowedCIDRs: []string{"example.com"}},
		{AllowedHours: []string{"mon-fri"}},
		{AllowedHours: []string{"funday 09:00-17:00"}},
		{AllowedHours: []string{"mon 09:00-09:00"}},
		{AllowedHours: []string{"mon 25:00-26:00"}},
		{AllowedHours: []string{"mon 09:00-17:00"}, TimeZone: "Mars/Olympus"},
		{TimeZone: "UTC"},
		{Operations: []Operation{"export"}},
		{MaxGrantTTL: 31 * 24 * time.Hour},
	}
	for _, a := range bad {
		if err := a.Validate(); err == nil || !IsCaller(err) {
			t.Errorf("%+v: want a caller error, got %v", a, err)
		}
	}
	a := &Access{AllowedCIDRs: []string{"10.1.2.3/8", "192.0.2.7"}, Operations: []Operation{OpSign, OpDecrypt, OpSign}}
	if err := a.Validate(); err != nil {
		t.Fatal(err)
	}
	if strings.Join(a.AllowedCIDRs, " ") != "10.0.0.0/8 192.0.2.7/32" || len(a.Operations) != 2 {
		t.Fatalf("stored as %v %v", a.AllowedCIDRs, a.Operations)
	}
}

func TestDenialsAreCountedPerKeyAndCondition(t *testing.T) {
	m := NewManager(hclog.NewNullLogger(), "mount", nil)
	at := time.Date(2026, 12, 7, 3, 0, 0, 0, time.UTC)
	m.Clock = func() time.Time { return at }
	k := &Key{Name: "k", Access: &Access{AllowedCIDRs: []string{"10.0.0.0/8"}}}
	s := &logical.InmemStorage{} // read once, for the key's anomaly actions
	for i := 0; i < 3; i++ {
		_ = m.Admit(context.Background(), s, k, Caller{RemoteAddr: "127.0.0.1"}, OpEncrypt, 1)
	}
	_ = m.Admit(context.Background(), s, k, Caller{RemoteAddr: "10.0.0.1"}, OpEncrypt, 1)
	d := m.Denials("k")
	if d.ByCondition["allowed_cidrs"] != 3 || !d.Last.Equal(at) || len(m.Denials("other").ByCondition) != 0 {
		t.Fatalf("denials %+v", d)
	}
}
