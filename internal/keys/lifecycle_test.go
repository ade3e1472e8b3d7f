package keys

import (
	"strings"
	"testing"
	"time"
)

// key makes a key of n versions; states gives explicit states by version.
func key(n int, states map[int]string) *Key {
	k := &Key{Name: "k", Type: TypeAES256GCM96, LatestVersion: n, MinDecryptionVersion: 1, Versions: map[int]*Version{},
		CreatedAt: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	for i := 1; i <= n; i++ {
		k.Versions[i] = &Version{HSMID: "00", State: states[i]}
	}
	return k
}

// The version state machine, without an HSM: each transition from each state, with what it changes and what it
// refuses (a caller mistake, 400). Repeating a transition that happened changes nothing.
func TestVersionStateMachine(t *testing.T) {
	at := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	cases := []struct {
		name    string
		states  map[int]string
		do      func(k *Key) (bool, error)
		changed bool
		refused string // part of the error, "" for none
		want    string // version 2's state after
	}{
		{"disable active", nil, func(k *Key) (bool, error) { return k.DisableVersion(2) }, true, "", StateDisabled},
		{"disable disabled", map[int]string{2: StateDisabled}, func(k *Key) (bool, error) { return k.DisableVersion(2) }, false, "", StateDisabled},
		{"disable latest", nil, func(k *Key) (bool, error) { return k.DisableVersion(3) }, false, "is the latest", StateActive},
		{"disable destroy-scheduled", map[int]string{2: StateDestroyScheduled}, func(k *Key) (bool, error) { return k.DisableVersion(2) }, false, "enable it first", StateDestroyScheduled},
		{"disable destroyed", map[int]string{2: StateDestroyed}, func(k *Key) (bool, error) { return k.DisableVersion(2) }, false, "destroyed", StateDestroyed},
		{"disable missing", nil, func(k *Key) (bool, error) { return k.DisableVersion(9) }, false, "no version 9", StateActive},
		{"enable disabled", map[int]string{2: StateDisabled}, func(k *Key) (bool, error) { c, _, err := k.EnableVersion(2); return c, err }, true, "", StateActive},
		{"enable destroy-scheduled cancels", map[int]string{2: StateDestroyScheduled}, func(k *Key) (bool, error) { c, _, err := k.EnableVersion(2); return c, err }, true, "", StateActive},
		{"enable active", nil, func(k *Key) (bool, error) { c, _, err := k.EnableVersion(2); return c, err }, false, "", StateActive},
		{"enable destroyed", map[int]string{2: StateDestroyed}, func(k *Key) (bool, error) { c, _, err := k.EnableVersion(2); return c, err }, false, "destroyed", StateDestroyed},
		{"schedule destruction", nil, func(k *Key) (bool, error) { return k.ScheduleVersionDestruction(2, at) }, true, "", StateDestroyScheduled},
		{"schedule destruction again", map[int]string{2: StateDestroyScheduled}, func(k *Key) (bool, error) { return k.ScheduleVersionDestruction(2, at) }, false, "", StateDestroyScheduled},
		{"schedule destruction of destroyed", map[int]string{2: StateDestroyed}, func(k *Key) (bool, error) { return k.ScheduleVersionDestruction(2, at) }, false, "", StateDestroyed},
		{"schedule destruction of latest", nil, func(k *Key) (bool, error) { return k.ScheduleVersionDestruction(3, at) }, false, "rotate first", StateActive},
		{"schedule destruction of disabled", map[int]string{2: StateDisabled}, func(k *Key) (bool, error) { return k.ScheduleVersionDestruction(2, at) }, true, "", StateDestroyScheduled},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			k := key(3, c.states)
			before := k.Clone()
			changed, err := c.do(k)
			switch {
			case c.refused != "" && (err == nil || !IsCaller(err) || !strings.Contains(err.Error(), c.refused)):
				t.Fatalf("want a caller error with %q, got %v", c.refused, err)
			case c.refused == "" && err != nil:
				t.Fatal(err)
			case changed != c.changed:
				t.Fatalf("changed %v, want %v", changed, c.changed)
			case k.VersionState(2) != c.want:
				t.Fatalf("version 2 is %s, want %s", k.VersionState(2), c.want)
			}
			if before.Versions[2].State != key(3, c.states).Versions[2].State {
				t.Fatal("the snapshot's version was modified in place: snapshots share versions")
			}
		})
	}
}

// Bounds decide what serves: below min_decryption_version or min_available_version nothing, below
// min_encryption_version decryption only.
func TestVersionBounds(t *testing.T) {
	k := key(5, map[int]string{4: StateDisabled})
	k.MinDecryptionVersion, k.MinEncryptionVersion, k.MinAvailableVersion = 2, 3, 1
	want := map[int]string{1: StateDisabled, 2: StateDecryptOnly, 3: StateActive, 4: StateDisabled, 5: StateActive}
	for v, s := range want {
		if got := k.VersionState(v); got != s {
			t.Errorf("version %d: %s, want %s", v, got, s)
		}
	}
	if _, _, err := k.EncryptionVersion(2); err == nil || !IsCaller(err) {
		t.Fatalf("encrypt with a decrypt-only version: %v", err)
	}
	if v, _, err := k.EncryptionVersion(0); err != nil || v != 5 {
		t.Fatalf("latest: %d %v", v, err)
	}
	if _, err := k.DecryptionVersion(2, "ciphertext"); err != nil {
		t.Fatalf("decrypt with a decrypt-only version: %v", err)
	}
	for _, v := range []int{0, 1, 4, 6} {
		if _, err := k.DecryptionVersion(v, "signature"); err == nil || !IsCaller(err) {
			t.Fatalf("version %d decrypts: %v", v, err)
		}
	}
	if _, err := k.DecryptionVersion(9, "hmac"); !strings.Contains(err.Error(), "invalid hmac") {
		t.Fatalf("the message names what was given: %v", err)
	}
}

// Trim follows Transit: refused while min_encryption_version is not set, never lowers, never passes a bound.
func TestTrimRules(t *testing.T) {
	for _, c := range []struct {
		name                string
		minDec, minEnc, cur int
		to                  int
		refused             string
	}{
		{"min_encryption_version not set", 3, 0, 0, 2, "min_encryption_version is not set"},
		{"above min_decryption_version", 2, 3, 0, 3, "must not exceed min_decryption_version"},
		{"above min_encryption_version", 3, 2, 0, 3, "must not exceed min_encryption_version"},
		{"going down", 3, 3, 2, 1, "cannot go down"},
		{"zero", 3, 3, 0, 0, "at least 1"},
		{"allowed", 3, 3, 1, 3, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			k := key(4, nil)
			k.MinDecryptionVersion, k.MinEncryptionVersion, k.MinAvailableVersion = c.minDec, c.minEnc, c.cur
			err := k.Trim(c.to)
			if c.refused == "" {
				if err != nil || k.MinAvailableVersion != c.to {
					t.Fatalf("%v, min_available_version %d", err, k.MinAvailableVersion)
				}
				return
			}
			if err == nil || !IsCaller(err) || !strings.Contains(err.Error(), c.refused) {
				t.Fatalf("want %q, got %v", c.refused, err)
			}
		})
	}
}

// Settings: bounds checked together, rotation scheduled from the last rotation, imported keys never scheduled.
func TestApplySettings(t *testing.T) {
	two, three, zero := 2, 3, 0
	day := 24 * time.Hour
	minute := time.Minute
	k := key(3, nil)
	if err := k.Apply(Settings{MinDecryptionVersion: &three, MinEncryptionVersion: &two}); err == nil {
		t.Fatal("min_encryption_version below min_decryption_version accepted")
	}
	k = key(3, nil)
	if err := k.Apply(Settings{AutoRotatePeriod: &minute}); err == nil {
		t.Fatal("a period under an hour accepted")
	}
	k = key(3, nil)
	k.LastRotated = k.CreatedAt.Add(time.Hour)
	if err := k.Apply(Settings{AutoRotatePeriod: &day}); err != nil || !k.NextRotation.Equal(k.LastRotated.Add(day)) {
		t.Fatalf("next rotation %v, %v", k.NextRotation, err)
	}
	if err := k.Apply(Settings{AutoRotatePeriod: new(time.Duration)}); err != nil || !k.NextRotation.IsZero() {
		t.Fatalf("period 0 keeps a next rotation %v", k.NextRotation)
	}
	imported := key(1, nil)
	imported.Imported = true
	if err := imported.Apply(Settings{AutoRotatePeriod: &day}); err == nil || !strings.Contains(err.Error(), "allow_rotation") {
		t.Fatalf("rotation of an imported key without allow_rotation: %v", err)
	}
	creating := &Key{Name: "new", Type: TypeAES256GCM96}
	if err := creating.Apply(Settings{AutoRotatePeriod: &day, MinEncryptionVersion: &zero}); err != nil || !creating.NextRotation.IsZero() {
		t.Fatalf("a key being created is scheduled from its creation, not here: %v %v", creating.NextRotation, err)
	}
	hmacKey := key(1, nil)
	hmacKey.Type = TypeHMAC
	if err := hmacKey.Apply(Settings{MaxEncryptions: &two}); err == nil {
		t.Fatal("max_encryptions_per_version on a non-AES key accepted")
	}
}

// What is due: deletion first, destructions and rotation after; a disabled key waits for its rotation.
func TestNextDue(t *testing.T) {
	t1 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	k := key(3, nil)
	if !k.NextDue().IsZero() {
		t.Fatal("nothing scheduled, yet something due")
	}
	k.NextRotation = t1.Add(time.Hour)
	k.withVersion(2, func(v *Version) { v.State, v.DestroyAt = StateDestroyScheduled, t1 })
	if !k.NextDue().Equal(t1) {
		t.Fatalf("due %v, want the destruction at %v", k.NextDue(), t1)
	}
	k.Disabled = true
	k.withVersion(2, func(v *Version) { v.State = "" })
	if !k.NextDue().IsZero() {
		t.Fatal("a disabled key's rotation is due")
	}
	k.Deleting = true
	if k.NextDue().IsZero() || k.NextDue().After(t1) {
		t.Fatal("an interrupted deletion is not due at once")
	}
}
