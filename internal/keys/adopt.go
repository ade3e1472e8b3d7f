package keys

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
)

// Adopt, never reuse. A version's material lives on the token, its metadata in Vault's storage. Storage restored
// from an older snapshot forgets the versions made since, while their material, and the ciphertexts and
// signatures clients hold, remain. Before a version number is given to new material, and when a request names a
// version newer than storage knows, the token is searched for that version's object by its label; one generated
// on the token and never extractable is taken back as that version ("adopted"), anything else is reported and
// blocks the number. So no ciphertext issued before a restore is lost, and no number ever names two keys.

// Adoption causes, as history records them.
const (
	CauseRestore     = "storage restore"
	CauseInterrupted = "interrupted"
	CauseOperator    = "operator"
)

// NumberTakenError: the token holds, under the label of the version number a change needs, material that may not
// be adopted. Nothing may take the number until an operator decides (keys/:name/reconcile says what is there).
type NumberTakenError struct {
	Key     string
	Version int
	Label   string
	Reason  string
	// ByOperator: adoption on an operator's word would take it (reconcile reports it adoptable_by_operator).
	ByOperator bool
}

func (e *NumberTakenError) Error() string {
	// The advice names only what would work: adoption on the operator's word where it would take the object,
	// else its removal from the token.
	advice := "it cannot be adopted, not even on an operator's word: to free the number, an operator removes it from the token (once sure nothing it protects is needed)"
	if e.ByOperator {
		advice = fmt.Sprintf("an operator who knows it is this version's material adopts it on their word (write reconcile/adopt-unverified/%s, a sudo path), or else removes it from the token", e.Key)
	}
	return fmt.Sprintf("version %d of key %q cannot take new material: the HSM token holds an object labelled %q that is not adopted as that version (%s); no other material may take its number. keys/%s/reconcile lists it; %s",
		e.Version, e.Key, e.Label, e.Reason, e.Key, advice)
}

// adoptedWAL is the record, if any, of the change that made an adopted object: that change ended (the plugin
// died, storage failed) before its metadata was stored, or storage was restored to before it. The record is its
// WAL entry (id), or the claim the WAL rollback left in its place (claim: the claim's storage key).
type adoptedWAL struct {
	id    string
	claim string
	entry WALEntry
}

// claimsPrefix holds claims: what a WAL rollback knew of material it left on the token (claims/<hsm_id>), so that
// the engine still vouches for material it generated once the WAL entry is gone.
const claimsPrefix = "claims/"

// storeClaim keeps a rolled-back WAL entry's record for the material it left on the token.
func storeClaim(ctx context.Context, s logical.Storage, w WALEntry) error {
	e, err := logical.StorageEntryJSON(claimsPrefix+w.HSMID, w)
	if err != nil {
		return err
	}
	return s.Put(ctx, e)
}

// forget deletes the record once the version it names is stored.
func (w adoptedWAL) forget(ctx context.Context, s logical.Storage) error {
	if w.claim != "" {
		if err := s.Delete(ctx, w.claim); err != nil {
			return err
		}
	}
	if w.id != "" {
		return framework.DeleteWAL(ctx, s, w.id)
	}
	return nil
}

// adoptPending adopts, in order from the version after the latest, each version whose object the token holds and
// the rule allows, up to through (0: as far as there are). It stops at the first number the token holds nothing
// under; a number held by material that may not be adopted ends it with a NumberTakenError. It returns the numbers
// adopted, with the request ID of the change that made each when a WAL entry names it.
//
// onWord: an operator has vouched for what the token holds under these labels, so material whose origin the
// token cannot prove (imported, or on a token that does not mark generated keys) is adopted too, if it is still
// protected and of the key's type.
func (tx *Tx) adoptPending(through int, onWord bool) (map[int]string, error) {
	k := tx.Key
	if k.Type.Info().Alg == "" {
		return nil, nil
	}
	tok, err := tx.hsm()
	if err != nil {
		return nil, err
	}
	var wals map[string]adoptedWAL // by HSM ID, read once if anything is found
	adopted := map[int]string{}
	for n := k.LatestVersion + 1; through <= 0 || n <= through; n++ {
		label := versionLabel(tx.m.mountID, k.Name, n)
		found, as, err := findVersionOfPurpose(tx.ctx, tok, k, label)
		if err != nil {
			return adopted, fmt.Errorf("look for version %d of key %q on the token: %w", n, k.Name, err)
		}
		if len(found) == 0 {
			return adopted, nil
		}
		if wals == nil {
			if wals, err = versionWALs(tx.ctx, tx.s); err != nil {
				return adopted, err
			}
		}
		w, made := wals[singleID(found)]
		vouched := made && w.vouchesFor(k.Name, n)
		f, reason := adoptable(found, onWord)
		automatic, _ := f.Adoptable()
		if reason != "" && vouched {
			// This engine's own WAL entry says it generated this material for this version: provenance the token
			// itself may not give (NSS leaves CKA_LOCAL false). It must still be protected and of the key's type.
			if ok, why := found[0].AdoptableOnWord(); ok {
				f, reason, automatic = found[0], "", true
			} else {
				reason = why
			}
		}
		// A key being created adopts, as any key, what the rule allows under its labels: its own interrupted
		// creation's material, or an earlier key's of that name that storage lost to a restore (a deleted key's
		// material is destroyed with it), whose ciphertexts then decrypt again.
		if reason == "" && k.referenced(f.IDHex()) {
			reason = "its CKA_ID is already another version's"
		}
		if reason != "" {
			// As reconcile's adoptable_by_operator (judge): the operator's word would take it for a stored key.
			fw, wordReason := adoptable(found, true)
			byOperator := !onWord && tx.Cur != nil && wordReason == "" && !k.referenced(fw.IDHex())
			return adopted, &NumberTakenError{Key: k.Name, Version: n, Label: label, Reason: reason, ByOperator: byOperator}
		}
		if err := tx.adopt(n, f, as, w, made, !automatic); err != nil {
			return adopted, err
		}
		adopted[n] = w.entry.RequestID
	}
	return adopted, nil
}

// findVersionOfPurpose looks under label for a version of k: of the type its new versions are made as, or, when
// the one object there is of another type of the key's purpose (a rotation that changed the type, whose metadata
// storage lost to a restore), of that type. as is the type what it returns was examined as.
func findVersionOfPurpose(ctx context.Context, tok HSM, k *Key, label string) ([]hsm.Found, VersionType, error) {
	want := k.NewVersionType()
	found, err := tok.FindVersion(ctx, want.Type.Info().Alg, label, want.HMACBytes())
	if err != nil || len(found) != 1 || found[0].Mismatch == "" {
		return found, want, err
	}
	for _, t := range TypesOf(k.Type.Purpose()) {
		other := VersionType{Type: t}
		switch {
		case t == TypeHMAC && found[0].ValueLen > 0 && found[0].ValueLen != want.HMACKeySize:
			other.HMACKeySize = found[0].ValueLen
		case t == want.Type:
			continue
		}
		again, err := tok.FindVersion(ctx, t.Info().Alg, label, other.HMACBytes())
		if err != nil {
			return nil, want, err
		}
		if len(again) == 1 && again[0].Mismatch == "" {
			return again, other, nil
		}
	}
	return found, want, nil
}

// singleID is the CKA_ID (hex) of the one object found, empty when there are several.
func singleID(found []hsm.Found) string {
	if len(found) != 1 {
		return ""
	}
	return found[0].IDHex()
}

// adoptable picks the one object that may be adopted among those found under a version's label, or says why none.
func adoptable(found []hsm.Found, onWord bool) (hsm.Found, string) {
	if len(found) == 0 {
		return hsm.Found{}, "the token holds nothing under that label"
	}
	if len(found) > 1 {
		ids := make([]string, len(found))
		for i, f := range found {
			ids[i] = f.IDHex()
		}
		return hsm.Found{}, fmt.Sprintf("%d objects carry that label (CKA_IDs %s): which one ciphertexts name cannot be told", len(found), strings.Join(ids, ", "))
	}
	check := found[0].Adoptable
	if onWord {
		check = found[0].AdoptableOnWord
	}
	if ok, reason := check(); !ok {
		return hsm.Found{}, reason
	}
	return found[0], ""
}

// adopt adds f as version n; made when a WAL entry of this engine brackets it, onWord when only an operator's
// word vouches for it.
func (tx *Tx) adopt(n int, f hsm.Found, as VersionType, w adoptedWAL, made, onWord bool) error {
	k := tx.Key
	now := time.Now().UTC()
	// Only this very request's earlier attempt is known to have encrypted nothing with it: a version whose WAL
	// entry came back with a restored snapshot may have been stored, and used, after the snapshot.
	retry := made && w.entry.RequestID != "" && w.entry.RequestID == tx.who.RequestID
	unknown := !retry
	if unknown && as.Type.IsAES() {
		// The version's usage witness on the token bounds every encryption it made (it is raised before each block
		// is used, from the stored count on): with one, the count is known, and the version goes on to its limit.
		// Without one (it never encrypted, or it was made before witnesses were kept) the count stays unknown.
		tok, err := tx.hsm()
		if err != nil {
			return err
		}
		_, witnessed, err := tok.UsageWitness(tx.ctx, f.ID)
		if err != nil {
			return fmt.Errorf("read the usage witness of version %d of key %q: %w", n, k.Name, err)
		}
		unknown = !witnessed
	}
	ver := &Version{Type: as.Type, HSMID: f.IDHex(), Label: f.Label, CreatedAt: f.Created, AdoptedAt: now,
		HMACDeferred: as.Type != TypeHMAC && !f.HMACSecret, EncryptionsUnknown: unknown}
	if as.Type == TypeHMAC {
		ver.HMACKeySize = as.HMACKeySize
	}
	if ver.CreatedAt.IsZero() {
		ver.CreatedAt = now // the token keeps no creation time: the adoption's is the earliest known
	}
	if f.Public != nil {
		pem, err := FormatPublicKey(f.Public)
		if err != nil {
			return err
		}
		ver.PublicKey, ver.pub = pem, f.Public
	}
	tx.addVersion(ver)
	cause, details := CauseRestore, "adopted from the HSM after a storage restore: storage did not know this version, the token held its material (generated on the token, never extractable)"
	switch {
	case onWord:
		_, why := f.Adoptable()
		cause, details = CauseOperator, "adopted from the HSM on an operator's word (reconcile/adopt-unverified), the token not showing it was generated there: "+why
	case made:
		cause, details = CauseInterrupted, "adopted from the HSM: made by this engine (its WAL entry says so) in a change whose metadata storage does not hold (the change ended first, or storage was restored)"
		if w.entry.RequestID != "" {
			details += "; request " + w.entry.RequestID
		}
	}
	if made {
		tx.adopted = append(tx.adopted, w) // forgotten once stored; never in tx.made: adopted material is not undone
	}
	tx.Record("version_adopted", n, cause, details)
	tx.m.log.Warn("key version adopted from the HSM", "key", k.Name, "version", n, "label", f.Label, "cause", cause)
	return nil
}

// vouchesFor: the entry records material this engine generated for version n of key name.
func (w adoptedWAL) vouchesFor(name string, n int) bool {
	return (w.id != "" || w.claim != "") && w.entry.Generated && !w.entry.HMACSecret && w.entry.Name == name && w.entry.Version == n
}

// vouchesForSecret: the entry records the HMAC secret this engine made for version n of key name (found by the
// secret's CKA_ID, which names the version's).
func (w adoptedWAL) vouchesForSecret(name string, n int) bool {
	return (w.id != "" || w.claim != "") && w.entry.Generated && w.entry.HMACSecret && w.entry.Name == name && w.entry.Version == n
}

// versionWALs reads the WAL entries of version creations and the claims rollbacks left, by the HSM ID they name.
func versionWALs(ctx context.Context, s logical.Storage) (map[string]adoptedWAL, error) {
	out := map[string]adoptedWAL{}
	claims, err := s.List(ctx, claimsPrefix)
	if err != nil {
		return nil, err
	}
	for _, c := range claims {
		e, err := s.Get(ctx, claimsPrefix+c)
		if err != nil {
			return nil, err
		}
		var w WALEntry
		if e != nil && e.DecodeJSON(&w) == nil && w.HSMID != "" {
			out[w.HSMID] = adoptedWAL{claim: claimsPrefix + c, entry: w}
		}
	}
	ids, err := framework.ListWAL(ctx, s)
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		e, err := framework.GetWAL(ctx, s, id)
		if err != nil || e == nil || e.Kind != WALKindVersion {
			continue
		}
		raw, err := json.Marshal(e.Data)
		if err != nil {
			continue
		}
		var w WALEntry
		if json.Unmarshal(raw, &w) == nil && w.HSMID != "" {
			// A claim and its WAL entry are both there between the rollback's return and Vault's deletion of
			// the entry: the record keeps both, and forgets both.
			out[w.HSMID] = adoptedWAL{id: id, claim: out[w.HSMID].claim, entry: w}
		}
	}
	return out, nil
}

// Adopt takes into key name the versions after its latest that the token holds and the rule allows, up to
// through (0: as many as there are in a row). It returns the key and the numbers adopted; a number the token
// holds material under that may not be adopted is a NumberTakenError.
//
// A request naming a version that exists nowhere (a forged or corrupted ciphertext) costs one search of the
// token per key and absentFor at most: the answer "nothing after version N" is remembered that long.
func (m *Manager) Adopt(ctx context.Context, s logical.Storage, name string, through int, who Actor) (*Key, []int, error) {
	return m.adopt(ctx, s, name, through, false, who)
}

func (m *Manager) adopt(ctx context.Context, s logical.Storage, name string, through int, onWord bool, who Actor) (*Key, []int, error) {
	if k, err := m.Get(ctx, s, name); err == nil && k != nil && through > k.LatestVersion {
		if a, ok := m.absent.Load(name); ok && a.latest == k.LatestVersion && time.Since(a.at) < absentFor {
			return k, nil, a.err
		}
	}
	var numbers []int
	var blocked error
	k, err := m.Update(ctx, s, name, who, func(tx *Tx) error {
		if through > 0 && through <= tx.Key.LatestVersion {
			return nil
		}
		adopted, err := tx.adoptPending(through, onWord)
		for n := range adopted {
			numbers = append(numbers, n)
		}
		var taken *NumberTakenError
		if errors.As(err, &taken) && len(adopted) > 0 {
			blocked, err = err, nil // keep what was adopted before the blocked number
		}
		if len(adopted) == 0 {
			// Nothing (more) to adopt after this latest: believed for absentFor, whatever stopped it, so that
			// requests naming versions that exist nowhere cost one search per key and period.
			m.absent.Store(name, absentMark{latest: tx.Key.LatestVersion, at: time.Now(), err: err})
		}
		return err
	})
	sort.Ints(numbers)
	if err == nil {
		err = blocked
	}
	return k, numbers, err
}

// absentMark remembers that the token held nothing after version latest of a key, at a time.
type absentMark struct {
	latest int
	at     time.Time
	err    error // what stopped the search, returned again meanwhile
}

// absentFor is how long "nothing after the latest version" is believed before the token is searched again.
const absentFor = 2 * time.Second

// Orphan is a token object under a key's labels that no stored version references.
type Orphan struct {
	Key       string `json:"key"`
	Version   int    `json:"version"`
	Label     string `json:"label"`
	HSMID     string `json:"hsm_id"`
	Class     string `json:"class"`
	KeyType   string `json:"key_type,omitempty"`
	Adoptable bool   `json:"adoptable"`
	Reason    string `json:"reason,omitempty"` // why it is not adopted
	// AdoptableByOperator: reconcile/adopt-unverified would adopt it (protected, of the key's type, in a row
	// after the latest), though the token cannot show it was generated there.
	AdoptableByOperator bool `json:"adoptable_by_operator"`
}

// Missing is a stored version whose material the token lacks.
type Missing struct {
	Key     string `json:"key"`
	Version int    `json:"version"`
	HSMID   string `json:"hsm_id"`
	Label   string `json:"label"`
}

// Untrusted is an object where the engine would make one itself (a version's HMAC secret, made on first use) that
// the token cannot show it generated and no record of the engine vouches for: it is never used, and an operator
// removes it.
type Untrusted struct {
	Key     string `json:"key"`
	Version int    `json:"version"`
	Label   string `json:"label"`
	HSMID   string `json:"hsm_id"`
	Reason  string `json:"reason"`
}

// Reconciliation compares storage with the token for a key, or a mount.
type Reconciliation struct {
	Keys         int         `json:"keys"`
	Objects      int         `json:"objects"`
	Unreferenced []Orphan    `json:"unreferenced_objects"`
	Missing      []Missing   `json:"missing_objects"`
	Adopted      []Missing   `json:"adopted"`
	Untrusted    []Untrusted `json:"untrusted_objects"`
}

// Reconcile compares what storage references with what the token holds under the mount's labels, for key name or
// (name empty) every key. With adopt, it first adopts what the rule allows (keys storage knows, numbers after
// their latest, in a row), and with onWord also what the token cannot show it generated; otherwise it changes
// nothing.
func (m *Manager) Reconcile(ctx context.Context, s logical.Storage, name string, adopt, onWord bool, who Actor) (*Reconciliation, error) {
	tok, err := m.connect(ctx, s)
	if err != nil {
		return nil, err
	}
	prefix := "cmk/" + m.mountID + "/"
	if name != "" {
		prefix += name + "/"
	}
	names := []string{name}
	if name == "" {
		if names, err = List(ctx, s); err != nil {
			return nil, err
		}
	}
	r := &Reconciliation{Unreferenced: []Orphan{}, Missing: []Missing{}, Adopted: []Missing{}, Untrusted: []Untrusted{}}
	var objects []hsm.ObjectInfo
	if name == "" {
		objects, err = tok.ListObjects(ctx, prefix)
	} else {
		objects, err = m.keyObjects(ctx, s, tok, name)
	}
	if err != nil {
		return nil, err
	}
	if adopt {
		for _, n := range adoptionCandidates(objects, m.mountID) {
			if name != "" && n != name {
				continue
			}
			k, numbers, err := m.adopt(ctx, s, n, 0, onWord, who)
			if errors.Is(err, ErrNotFound) {
				k, numbers, err = m.recreate(ctx, s, n, who)
			}
			var taken *NumberTakenError
			switch {
			case errors.As(err, &taken), errors.Is(err, ErrNotFound):
				// Reported below with why; the other keys go on.
			case err != nil:
				return nil, fmt.Errorf("adopt versions of key %q: %w", n, err)
			}
			if k == nil {
				continue
			}
			for _, v := range numbers {
				ver := k.Versions[v]
				r.Adopted = append(r.Adopted, Missing{Key: n, Version: v, HSMID: ver.HSMID, Label: ver.Label})
			}
		}
	}
	byID := map[string]bool{}     // versions with any object on the token
	mainID := map[string]bool{}   // versions whose main object (not an HMAC secret or public half) is there
	secretID := map[string]bool{} // versions with an HMAC secret on the token
	for _, o := range objects {
		id := strings.TrimSuffix(hex.EncodeToString(o.ID), hmacSuffixHex)
		byID[id] = true
		if o.Class != "public_key" && !strings.HasSuffix(o.Label, "/hmac") {
			mainID[id] = true
		}
		if strings.HasSuffix(o.Label, "/hmac") {
			secretID[id] = true
		}
	}
	referenced := map[string]bool{}
	known := map[string]*Key{}
	var records map[string]adoptedWAL // read once if a secret is to be examined
	for _, n := range names {
		k, err := m.Get(ctx, s, n)
		if err != nil {
			return nil, err
		}
		if k == nil {
			if name != "" {
				return nil, notFound(name)
			}
			continue
		}
		known[n] = k
		r.Keys++
		for v, ver := range k.Versions {
			if ver.PublicOnly() {
				continue // nothing on the token
			}
			referenced[ver.HSMID] = true
			if ver.State != StateDestroyed && !mainID[ver.HSMID] && !(ver.Type == TypeHMAC && byID[ver.HSMID]) {
				r.Missing = append(r.Missing, Missing{Key: n, Version: v, HSMID: ver.HSMID, Label: ver.Label})
			}
			if ver.State != StateDestroyed && ver.HMACDeferred && secretID[ver.HSMID] {
				// A secret the version's first HMAC would find instead of making one: taken only if proven, or if
				// the engine's record of making it vouches for it.
				if records == nil {
					if records, err = versionWALs(ctx, s); err != nil {
						return nil, err
					}
				}
				record, vouched := records[ver.HSMID+hmacSuffixHex]
				vouched = vouched && record.vouchesForSecret(n, v)
				var untrusted *hsm.UntrustedObjectError
				if err := tok.CheckHMACSecret(ctx, ver.ID(), ver.HMACBytes(), vouched); errors.As(err, &untrusted) {
					r.Untrusted = append(r.Untrusted, Untrusted{Key: n, Version: v, Label: untrusted.Label, HSMID: hex.EncodeToString(untrusted.ID), Reason: untrusted.Reason})
				} else if err != nil {
					return nil, fmt.Errorf("examine the HMAC secret of key %q version %d: %w", n, v, err)
				}
			}
		}
	}
	for _, o := range objects {
		r.Objects++
		id := strings.TrimSuffix(hex.EncodeToString(o.ID), hmacSuffixHex)
		if referenced[id] {
			continue
		}
		keyName, v, ok := parseVersionLabel(o.Label, m.mountID)
		isMain := o.Class != "public_key" && !strings.HasSuffix(o.Label, "/hmac")
		if !ok || (!isMain && mainID[id]) {
			continue // the mount's wrapping key; a public half or HMAC secret is reported with its main object
		}
		orphan := Orphan{Key: keyName, Version: v, Label: o.Label, HSMID: hex.EncodeToString(o.ID), Class: o.Class, KeyType: o.KeyType}
		orphan.Adoptable, orphan.AdoptableByOperator, orphan.Reason = m.judge(ctx, tok, known[keyName], v, o)
		r.Unreferenced = append(r.Unreferenced, orphan)
	}
	sort.Slice(r.Missing, func(i, j int) bool {
		return less(r.Missing[i].Key, r.Missing[i].Version, r.Missing[j].Key, r.Missing[j].Version)
	})
	sort.Slice(r.Unreferenced, func(i, j int) bool {
		a, b := r.Unreferenced[i], r.Unreferenced[j]
		if a.Key != b.Key || a.Version != b.Version {
			return less(a.Key, a.Version, b.Key, b.Version)
		}
		return a.Label < b.Label
	})
	return r, nil
}

// keyObjects finds the token objects of one key by its labels, without visiting the token's other objects: every
// number up to the key's latest (and the labels storage records), then the numbers after it, up to the first
// that the token holds nothing under (adoption takes numbers after the latest only in a row).
func (m *Manager) keyObjects(ctx context.Context, s logical.Storage, tok HSM, name string) ([]hsm.ObjectInfo, error) {
	k, err := m.Get(ctx, s, name)
	if err != nil {
		return nil, err
	}
	if k == nil {
		return nil, notFound(name)
	}
	seen := map[string]bool{}
	var labels []string
	add := func(label string) {
		for _, l := range []string{label, label + "/hmac"} {
			if !seen[l] {
				seen[l] = true
				labels = append(labels, l)
			}
		}
	}
	for v := 1; v <= k.LatestVersion; v++ {
		add(versionLabel(m.mountID, name, v))
	}
	for _, ver := range k.Versions {
		if ver.Label != "" {
			add(ver.Label)
		}
	}
	objects, err := tok.ObjectsLabelled(ctx, labels)
	if err != nil {
		return nil, err
	}
	for v := k.LatestVersion + 1; ; v++ {
		label := versionLabel(m.mountID, name, v)
		more, err := tok.ObjectsLabelled(ctx, []string{label, label + "/hmac"})
		if err != nil {
			return nil, err
		}
		if len(more) == 0 {
			return objects, nil
		}
		objects = append(objects, more...)
	}
}

// hmacSuffixHex ends the CKA_ID of a version's HMAC secret (hex), after the version's own.
var hmacSuffixHex = hex.EncodeToString([]byte("/hmac"))

// judge says whether an unreferenced object would be adopted automatically, or on an operator's word, and if
// not automatically, why.
func (m *Manager) judge(ctx context.Context, tok HSM, k *Key, v int, o hsm.ObjectInfo) (auto, onWord bool, reason string) {
	switch {
	case k == nil:
		return false, false, "storage holds no key of this name: creating the key again adopts it if the rule allows (so does reconcile with adopt when the engine's record of the material names the key's type)"
	case strings.HasSuffix(o.Label, "/hmac"):
		return false, false, "an HMAC secret whose version's main object is not referenced either"
	case v <= k.LatestVersion:
		return false, false, fmt.Sprintf("version %d is stored with other material: a number names one key only", v)
	}
	found, _, err := findVersionOfPurpose(ctx, tok, k, o.Label)
	if err != nil {
		return false, false, "could not be examined: " + err.Error()
	}
	if len(found) == 0 {
		return false, false, "the token does not find it by its label"
	}
	_, reason = adoptable(found, false)
	_, wordReason := adoptable(found, true)
	auto, onWord = reason == "", wordReason == ""
	if !onWord {
		reason = wordReason
	}
	if (auto || onWord) && v > k.LatestVersion+1 {
		reason = strings.TrimPrefix(reason+"; ", "; ") + fmt.Sprintf("adopted only once the versions before it are: adoption takes numbers in a row after the latest (%d)", k.LatestVersion)
	}
	return auto, onWord, reason
}

// adoptionCandidates are the keys with an object labelled as a version: those adopt may take something for.
func adoptionCandidates(objects []hsm.ObjectInfo, mountID string) []string {
	seen := map[string]bool{}
	var out []string
	for _, o := range objects {
		if n, _, ok := parseVersionLabel(o.Label, mountID); ok && !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

// parseVersionLabel reads the key name and version from a label made by versionLabel (or its HMAC secret's).
func parseVersionLabel(label, mountID string) (string, int, bool) {
	rest, ok := strings.CutPrefix(label, "cmk/"+mountID+"/")
	if !ok {
		return "", 0, false
	}
	rest = strings.TrimSuffix(rest, "/hmac")
	i := strings.LastIndex(rest, "/v")
	if i <= 0 {
		return "", 0, false
	}
	v, err := strconv.Atoi(rest[i+2:])
	if err != nil || v < 1 {
		return "", 0, false
	}
	return rest[:i], v, true
}

func less(ka string, va int, kb string, vb int) bool {
	if ka != kb {
		return ka < kb
	}
	return va < vb
}

// recreate makes key name again from its material on the token, when a claim left by a WAL rollback names the
// key's type (storage was restored to before the key was stored, after data was protected under it): the versions
// the rule allows are adopted, and nothing new is made. Settings are the defaults; history records the recreation.
func (m *Manager) recreate(ctx context.Context, s logical.Storage, name string, who Actor) (*Key, []int, error) {
	records, err := versionWALs(ctx, s)
	if err != nil {
		return nil, nil, err
	}
	var typ Type
	for _, w := range records {
		if w.entry.Name == name && w.entry.Version == 1 && w.entry.Type != "" && !w.entry.HMACSecret {
			typ = w.entry.Type
		}
	}
	if typ == "" {
		return nil, nil, notFound(name)
	}
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	if cur, err := m.getLocked(ctx, s, name); err != nil || cur != nil {
		return cur, nil, err
	}
	var numbers []int
	who.RequestID = "" // no retry of the creation: what it adopts has unknown usage
	k := &Key{Name: name, Type: typ, CreatedAt: time.Now().UTC()}
	key, err := m.commit(ctx, s, who, nil, k, func(tx *Tx) error {
		adopted, err := tx.adoptPending(0, false)
		if len(adopted) == 0 {
			if err == nil {
				err = notFound(name)
			}
			return err
		}
		for n := range adopted {
			numbers = append(numbers, n)
		}
		tx.Record("created", 0, CauseRestore, fmt.Sprintf("type %s; made again from its material on the token by reconcile with adopt: storage did not hold the key", typ))
		return nil
	})
	sort.Ints(numbers)
	return key, numbers, err
}
