package keys

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
)

// A key's lifecycle events are kept in pages of historyPageSize under history/<name>/<page>, so that no storage
// entry grows with the key's life. History outlives the key: it is the evidence of its destruction.
const (
	historyPrefix   = "history/"
	historyPageSize = 100
)

// Event is one lifecycle event: what happened, to which version, why, and who caused it.
type Event struct {
	Time        time.Time `json:"time"`
	Event       string    `json:"event"`
	Version     int       `json:"version,omitempty"`
	Cause       string    `json:"cause,omitempty"`
	EntityID    string    `json:"entity_id,omitempty"`
	DisplayName string    `json:"display_name,omitempty"`
	// AccessorHMAC is the token accessor's HMAC under the mount's salt (see actor.go), never the accessor.
	AccessorHMAC string `json:"token_accessor_hmac,omitempty"`
	// LegacyAccessor is what engines before the HMAC stored: the accessor in clear. Read only, to be sealed:
	// History returns its HMAC in AccessorHMAC instead, and the page is stored sealed when next written.
	LegacyAccessor string `json:"token_accessor,omitempty"`
	Details        string `json:"details,omitempty"`
	// The event's link in the key's hash chain (internal/evidence): its place (from 1), the hash of the event before
	// it (absent at seq 1) and its own, over its stored JSON without "hash". Absent in events stored before the
	// engine chained history: those are listed as unchained, and nothing vouches for them.
	Seq      int    `json:"seq,omitempty"`
	PrevHash string `json:"prev_hash,omitempty"`
	Hash     string `json:"hash,omitempty"`
}

// Actor is who caused a lifecycle event, from the request: the entity and display name, and the token's
// accessor (never the token itself). Accessor is in clear and stays in memory: a change records and logs
// AccessorHMAC in its place (Manager.sealed), and String never shows the accessor in clear.
type Actor struct {
	EntityID     string
	DisplayName  string
	Accessor     string
	AccessorHMAC string
	RequestID    string // the Vault request, to recognise its retry
}

// SchedulerActor is the cause of what the periodic function does on its own.
var SchedulerActor = Actor{DisplayName: "cmk scheduler"}

func (a Actor) String() string {
	switch {
	case a.EntityID != "" && a.DisplayName != "":
		return a.DisplayName + " (entity " + a.EntityID + ")"
	case a.EntityID != "":
		return "entity " + a.EntityID
	case a.AccessorHMAC != "":
		return a.DisplayName + legacyAccessorMark + a.AccessorHMAC + ")"
	}
	return a.DisplayName
}

func (a Actor) event(kind string, version int, cause, details string) Event {
	return Event{Time: time.Now().UTC(), Event: kind, Version: version, Cause: cause,
		EntityID: a.EntityID, DisplayName: a.DisplayName, AccessorHMAC: a.AccessorHMAC, Details: details}
}

// RecordEvent adds an event about key name that changes nothing of the key (a dual-control approval's steps),
// under the key's lock so that it never interleaves with a change's events. The key need not exist any more:
// history outlives it.
func (m *Manager) RecordEvent(ctx context.Context, s logical.Storage, name string, who Actor, kind string, version int, details string) error {
	l := m.lock(name)
	l.Lock()
	defer l.Unlock()
	who, err := m.sealed(ctx, s, who)
	if err != nil {
		return err
	}
	return m.appendHistory(ctx, s, name, nil, who.event(kind, version, "", details))
}

func historyPageKey(name string, page int) string {
	return fmt.Sprintf("%s%s/%08d", historyPrefix, name, page)
}

// appendHistory adds evs to the key's history, chained: each event carries its place, the previous event's hash and
// its own. Stored events are kept byte for byte; only events stored by engines before the chain with a clear
// accessor are stored sealed, before the chain begins: seq 1's prev_hash pins them as they are then stored
// (evidence.UnchainedPin). The head is then signed (vouch); a chain that begins neither at the key's creation nor
// over unchained events (what follows a history deleted whole) is recorded and never signed.
// The caller holds the key's lock: the read-modify-write of the page is never concurrent for one key. ahead is
// what was read ahead of the append under that lock (nil: nothing).
func (m *Manager) appendHistory(ctx context.Context, s logical.Storage, name string, ahead *historyAhead, evs ...Event) error {
	if len(evs) == 0 {
		return nil
	}
	pages, hasHead, audit, err := ahead.listing(ctx, s, name)
	if err != nil {
		return err
	}
	page := 0
	var events []json.RawMessage
	var end chainLink
	if len(pages) > 0 {
		page = pages[len(pages)-1]
		if events, err = readRawPage(ctx, s, name, page); err != nil {
			return err
		}
		if len(events) > 0 {
			if end, err = linkOf(events[len(events)-1]); err != nil {
				return fmt.Errorf("history of key %q: %w", name, err)
			}
		}
	}
	started := end.seq == 0 // the chain begins with this append
	if started && len(pages) > 0 {
		// seq 1 pins the unchained events before it, as stored from now on: sealed first.
		unchained, err := m.sealPages(ctx, s, name, pages)
		if err != nil {
			return err
		}
		if len(unchained) > 0 {
			if end.hash, err = evidence.UnchainedPin(unchained); err != nil {
				return fmt.Errorf("history of key %q: %w", name, err)
			}
		}
		if events, err = readRawPage(ctx, s, name, page); err != nil {
			return err
		}
	}
	var before []json.RawMessage // the page before the one written, when this append begins a page
	if len(events) >= historyPageSize {
		before, page, events = events, page+1, nil
	} else if err := m.sealLegacy(ctx, s, events); err != nil {
		return err
	}
	for _, ev := range evs {
		ev.Seq, ev.PrevHash, ev.Hash = end.seq+1, end.hash, ""
		unhashed, err := json.Marshal(ev)
		if err != nil {
			return err
		}
		if ev.Hash, err = evidence.EventHash(unhashed); err != nil {
			return err
		}
		raw, err := json.Marshal(ev)
		if err != nil {
			return err
		}
		events = append(events, raw)
		end = chainLink{seq: ev.Seq, hash: ev.Hash}
	}
	e, err := logical.StorageEntryJSON(historyPageKey(name, page), events)
	if err != nil {
		return err
	}
	// The head is signed while the page is written (the HSM's signature and the storage write take as long as
	// each other), and stored only once the page is.
	put := make(chan error, 1)
	go func() { put <- s.Put(ctx, e) }()
	just := &appended{events: append(before, events...), whole: len(pages) <= 1, noHead: !hasHead, audit: audit, put: put}
	m.vouch(ctx, s, name, started, just)
	return just.pageStored()
}

// sealPages stores sealed the clear accessors of the key's unchained events, page by page, before a chain pins
// them, and returns every event as stored then, oldest first.
func (m *Manager) sealPages(ctx context.Context, s logical.Storage, name string, pages []int) ([]json.RawMessage, error) {
	var all []json.RawMessage
	for _, page := range pages {
		events, err := readRawPage(ctx, s, name, page)
		if err != nil {
			return nil, err
		}
		sealed := append([]json.RawMessage(nil), events...)
		if err := m.sealLegacy(ctx, s, sealed); err != nil {
			return nil, err
		}
		changed := false
		for i := range events {
			changed = changed || !bytes.Equal(sealed[i], events[i])
		}
		if changed {
			e, err := logical.StorageEntryJSON(historyPageKey(name, page), sealed)
			if err == nil {
				err = s.Put(ctx, e)
			}
			if err != nil {
				return nil, err
			}
		}
		all = append(all, sealed...)
	}
	return all, nil
}

// sealLegacy stores sealed the clear accessor of unchained events (engines before the HMAC). A chained event is
// never altered once hashed.
func (m *Manager) sealLegacy(ctx context.Context, s logical.Storage, events []json.RawMessage) error {
	for i, raw := range events {
		var ev Event
		if err := json.Unmarshal(raw, &ev); err != nil {
			return err
		}
		if ev.Seq != 0 || ev.LegacyAccessor == "" {
			continue
		}
		one := []Event{ev}
		if err := m.sealEvents(ctx, s, one); err != nil {
			return err
		}
		b, err := json.Marshal(one[0])
		if err != nil {
			return err
		}
		events[i] = b
	}
	return nil
}

// recordEventLocked adds to the key's history an event that goes with no change of the key (a grant created,
// revoked, used up or expired): the one way to record one outside Update. who is sealed here; the caller holds
// the key's lock, as for every append.
func (m *Manager) recordEventLocked(ctx context.Context, s logical.Storage, name string, who Actor, kind, details string) error {
	who, err := m.sealed(ctx, s, who)
	if err != nil {
		return err
	}
	return m.appendHistory(ctx, s, name, nil, who.event(kind, 0, "", details))
}

func historyPages(ctx context.Context, s logical.Storage, name string) ([]int, error) {
	pages, _, err := historyListing(ctx, s, name)
	return pages, err
}

// historyAhead is what recording a change's events reads before it writes (the key's history listing, the audit
// key), read while the change itself is stored: storage round trips a key's creation would otherwise wait for one
// after another. Read under the key's lock, which every writer of the key's history holds; the audit key may be
// rotated meanwhile, and a head signed with the version before stays verifiable.
type historyAhead struct {
	done    chan struct{}
	pages   []int
	hasHead bool
	audit   *AuditKey
	err     error
}

// readHistoryAhead begins reading what appending to key name's history reads first.
func readHistoryAhead(ctx context.Context, s logical.Storage, name string) *historyAhead {
	a := &historyAhead{done: make(chan struct{})}
	go func() {
		defer close(a.done)
		if a.pages, a.hasHead, a.err = historyListing(ctx, s, name); a.err == nil {
			a.audit, a.err = readAuditKey(ctx, s)
		}
	}()
	return a
}

// wait returns once the reads are done.
func (a *historyAhead) wait() {
	if a != nil {
		<-a.done
	}
}

// listing is the key's history listing and the audit key as read ahead, or (nil, or a read that failed) as read
// now; the audit key is nil when not read ahead.
func (a *historyAhead) listing(ctx context.Context, s logical.Storage, name string) ([]int, bool, *AuditKey, error) {
	if a != nil {
		if a.wait(); a.err == nil {
			return a.pages, a.hasHead, a.audit, nil
		}
	}
	pages, hasHead, err := historyListing(ctx, s, name)
	return pages, hasHead, nil, err
}

// historyListing lists the key's history pages, in order, and says whether a head is stored beside them.
func historyListing(ctx context.Context, s logical.Storage, name string) ([]int, bool, error) {
	keys, err := s.List(ctx, historyPrefix+name+"/")
	if err != nil {
		return nil, false, err
	}
	var pages []int
	hasHead := false
	for _, k := range keys {
		if n, err := strconv.Atoi(k); err == nil {
			pages = append(pages, n)
		}
		hasHead = hasHead || k == headName
	}
	sort.Ints(pages)
	return pages, hasHead, nil
}

func readRawPage(ctx context.Context, s logical.Storage, name string, page int) ([]json.RawMessage, error) {
	e, err := s.Get(ctx, historyPageKey(name, page))
	if err != nil || e == nil {
		return nil, err
	}
	var events []json.RawMessage
	if err := json.Unmarshal(e.Value, &events); err != nil {
		return nil, fmt.Errorf("history page %d of key %q: %w", page, name, err)
	}
	return events, nil
}

func readHistoryPage(ctx context.Context, s logical.Storage, name string, page int) ([]Event, error) {
	e, err := s.Get(ctx, historyPageKey(name, page))
	if err != nil || e == nil {
		return nil, err
	}
	var events []Event
	return events, json.Unmarshal(e.Value, &events)
}

// History returns the key's events, oldest first, at most limit of the newest ones (0: all). Events stored with a
// clear accessor by engines before the HMAC show its HMAC, as newer events do: one token's events keep one value,
// and no response carries an accessor in clear.
func (m *Manager) History(ctx context.Context, s logical.Storage, name string, limit int) ([]Event, error) {
	events, err := ReadHistory(ctx, s, name, limit)
	if err != nil {
		return nil, err
	}
	return events, m.sealEvents(ctx, s, events)
}

// sealEvents replaces the clear accessor of events stored by engines before the HMAC by its HMAC.
func (m *Manager) sealEvents(ctx context.Context, s logical.Storage, events []Event) error {
	for i, e := range events {
		if e.LegacyAccessor == "" {
			continue
		}
		h, err := m.AccessorHMAC(ctx, s, e.LegacyAccessor)
		if err != nil {
			return err
		}
		events[i].AccessorHMAC, events[i].LegacyAccessor = h, ""
	}
	return nil
}

// ReadHistory returns the key's events as stored, oldest first, at most limit of the newest ones (0: all).
func ReadHistory(ctx context.Context, s logical.Storage, name string, limit int) ([]Event, error) {
	pages, err := historyPages(ctx, s, name)
	if err != nil {
		return nil, err
	}
	var out []Event
	for i := len(pages) - 1; i >= 0; i-- {
		events, err := readHistoryPage(ctx, s, name, pages[i])
		if err != nil {
			return nil, err
		}
		out = append(events, out...)
		if limit > 0 && len(out) >= limit {
			return out[len(out)-limit:], nil
		}
	}
	return out, nil
}
