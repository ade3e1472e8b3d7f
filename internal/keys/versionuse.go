package keys

import (
	"context"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// What each version of a key did, for the migration view (keys/:name/migration): how many times it applied
// protection (encrypt, sign, hmac, the encrypting half of rewrap and datakey: "made") and how many times something
// relied on it (decrypt, verify, the decrypting half of rewrap: "opened"), and when each last happened. An owner
// reads there what still depends on an old version or algorithm before it is retired.
//
// Counted with the key's usage analytics (analytics.go): in memory at each use, stored with the key's analytics
// entry by the periodic flush, so that a restart or failover loses at most one flush interval's counts, and not
// counted while analytics are off. A verification counts only when the signature or HMAC is valid (forged ones
// naming an old version must not keep it in use); a decryption counts whatever it yields, as PKCS#1 v1.5's implicit
// rejection must not be told apart from a valid padding, here or anywhere. Each use of a version whose type the mount deprecates (config/keys
// deprecated_types) is also told to the observer, which counts it and warns in the request's answer.

// VersionUse is what one version did since its key's analytics began.
type VersionUse struct {
	Made       uint64    `json:"made,omitempty"`
	Opened     uint64    `json:"opened,omitempty"`
	LastMade   time.Time `json:"last_made,omitzero"`
	LastOpened time.Time `json:"last_opened,omitzero"`
}

// add counts one use at now: made, or opened.
func (u *VersionUse) add(made bool, now time.Time) {
	if made {
		u.Made++
		u.LastMade = later(u.LastMade, now)
		return
	}
	u.Opened++
	u.LastOpened = later(u.LastOpened, now)
}

// merge adds what another process counted (stored counts, or this process's before they were read).
func (u *VersionUse) merge(o VersionUse) {
	u.Made += o.Made
	u.Opened += o.Opened
	u.LastMade = later(u.LastMade, o.LastMade)
	u.LastOpened = later(u.LastOpened, o.LastOpened)
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// noteVersion counts a use of version v of k that made (true) or opened (false) something, and tells the observer
// when the version's type is deprecated on the mount.
func (m *Manager) noteVersion(ctx context.Context, s logical.Storage, k *Key, v int, ver *Version, made bool) {
	if m.Deprecated != nil {
		if since, ok := m.Deprecated(ctx, s, ver.Type); ok {
			m.observer().DeprecatedUse(ctx, k.Name, ver.Type, since)
		}
	}
	if !m.AnalyticsOn() {
		return
	}
	ku := m.lockLive(ctx, s, k.Name, m.keyUsage(ctx, s, k.Name))
	defer ku.mu.Unlock()
	if ku.versions == nil {
		ku.versions = make(map[int]*VersionUse, 1)
	}
	u := ku.versions[v]
	if u == nil {
		u = &VersionUse{}
		ku.versions[v] = u
	}
	now := m.now()
	u.add(made, now)
	if ku.versionsSince.IsZero() {
		ku.versionsSince = now
	}
	ku.dirty = true
}

// noteNamed counts a use that opened what names version n (a ciphertext, signature or HMAC) of k.
func (m *Manager) noteNamed(ctx context.Context, s logical.Storage, k *Key, n int) {
	if ver := k.Versions[n]; ver != nil {
		m.noteVersion(ctx, s, k, n, ver, false)
	}
}

// VersionUses is what each version of k did, read from storage the first time (as Usage), and since when every use
// of its versions is counted (zero: not now, analytics being off, or never yet): from the key's creation when
// analytics were on then, else from its first counted use, and never before analytics were last turned back on.
// A version made before that may have made or opened what nobody counted.
func (m *Manager) VersionUses(ctx context.Context, s logical.Storage, k *Key) (map[int]VersionUse, time.Time) {
	if !m.AnalyticsOn() {
		return map[int]VersionUse{}, time.Time{} // nothing is read into memory while analytics are off
	}
	ku := m.lockLive(ctx, s, k.Name, m.keyUsage(ctx, s, k.Name))
	out := make(map[int]VersionUse, len(ku.versions))
	for v, u := range ku.versions {
		out[v] = *u
	}
	// The caller analytics' own start (since) may predate counting per version (an engine upgraded): only when
	// this engine first counted a version's use, or the key's creation with analytics on, says it; and nothing
	// does while the stored counts could not be read.
	loaded, from, restarted := ku.loaded.Load(), ku.versionsSince, ku.versionsRestarted
	ku.mu.Unlock()
	if !loaded {
		return out, time.Time{}
	}
	if k.UsesCounted && !restarted {
		from = k.CreatedAt
	}
	if on := m.analytics.since.Load(); on != nil && !from.IsZero() && on.After(from) {
		from = *on
	}
	return out, from
}

// Complete reports whether what version v of k did is all counted, given the time counting began (VersionUses).
func (k *Key) Complete(v int, countedFrom time.Time) bool {
	ver := k.Versions[v]
	return ver != nil && !countedFrom.IsZero() && !ver.CreatedAt.Before(countedFrom)
}

// VerifySignature checks a signature of k as Key.VerifySignature does, and counts the use of the version it names
// when the signature is valid: forged signatures naming an old version must not keep it in use (the decrypt window).
func (m *Manager) VerifySignature(ctx context.Context, s logical.Storage, k *Key, signature string, input []byte, o SignOptions) (bool, error) {
	valid, err := k.VerifySignature(signature, input, o)
	if err == nil && valid {
		m.noteNamed(ctx, s, k, NamedVersion(signature))
	}
	return valid, err
}
