package keys

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/evidence"
)

// A key's history is a hash chain (internal/evidence) whose head, history/<name>/head beside the pages, is signed
// by the mount's audit key. The engine signs a head only over a chain that extends the head before it (whose
// signature it checks first): that head's hash pins every event before it, so a change someone with write access
// to storage makes stays reported by verification, whatever the engine records after it.
//
// When the audit key cannot sign (the HSM is unreachable), the event is recorded all the same and the head is
// left behind: lifecycle evidence is never lost, and a change that the HSM allowed is never refused for want of a
// signature. Until the head is signed again (by the key's next event, or by the periodic function on the node that
// recorded it, once the HSM serves), verification reports the events after the head as not vouched for.
//
// A chain with no head at all (its first events were recorded while the audit key could not sign) is signed only
// by the process that began it: after a restart nothing tells such a chain from one whose head was deleted, so it
// stays reported as not vouched for.
//
// Storage put back whole as it was earlier (an older head with the events it signed) verifies by itself. Each
// process remembers the highest head it signed or saw signed per key (signedHeads): a head behind it, or another
// event at its seq, is reported as rolled back and never signed over; the event that finds it is recorded all the
// same. A process started after the rollback remembers nothing of before it: that is caught only by comparing with an
// evidence bundle taken earlier (cmk-evidence verify --previous).

const headName = "head"

func historyHeadKey(name string) string { return historyPrefix + name + "/" + headName }

// chainLink is a chained event's place and hash; zero for none.
type chainLink struct {
	seq  int
	hash string
}

// linkOf reads a stored event's place and hash; zero for an event stored before history was chained.
func linkOf(raw json.RawMessage) (chainLink, error) {
	var f struct {
		Seq  int    `json:"seq"`
		Hash string `json:"hash"`
	}
	if err := json.Unmarshal(raw, &f); err != nil {
		return chainLink{}, fmt.Errorf("an event is not a JSON object: %w", err)
	}
	return chainLink{seq: f.Seq, hash: f.Hash}, nil
}

func readHead(ctx context.Context, s logical.Storage, name string) (*evidence.Head, error) {
	e, err := s.Get(ctx, historyHeadKey(name))
	if err != nil || e == nil {
		return nil, err
	}
	var h evidence.Head
	if err := e.DecodeJSON(&h); err != nil {
		return nil, fmt.Errorf("history head of key %q: %w", name, err)
	}
	return &h, nil
}

// vouch signs the key's head after an append, or leaves it behind for the periodic function (see above). started:
// this append began the chain. Called under the key's lock.
func (m *Manager) vouch(ctx context.Context, s logical.Storage, name string, started bool, just *appended) {
	headless := started
	if v, ok := m.unsigned.Load(name); ok {
		headless = headless || v
	}
	err := m.signHead(ctx, s, name, headless, just)
	if just.pageStored() != nil {
		return // nothing was recorded: the append reports it, and nothing is left to sign
	}
	switch {
	case err == nil:
		m.unsigned.Delete(name)
	case errors.Is(err, errNotVouchable):
		m.unsigned.Delete(name)
		m.log.Error("history is not what its signed head vouches for: the head is not signed again, and history/verify reports the break",
			"key", name, "error", err)
	default:
		m.unsigned.Store(name, headless)
		if !errors.Is(err, errAuditKeyNotMade) { // logged where it was tried
			m.log.Warn("event recorded, but the audit key could not sign the history's head: signed again once the HSM serves",
				"key", name, "error", err)
		}
	}
}

// appended is what an append, under the key's lock, has just read and written of the key's history: the head's
// signing that follows reads none of it back.
type appended struct {
	events []json.RawMessage // the newest events as stored, oldest first: the page written (after the page before it, when the append began a new page)
	whole  bool              // events are the whole history
	noHead bool              // the listing held no head
	audit  *AuditKey         // the audit key as read before the append (nil: read it)
	// put is the page's write under way, its outcome received once into putErr: the head is stored only after
	// the page. Used by the appending goroutine only.
	put    chan error
	putErr error
	waited bool
}

// pageStored waits for the page's write, if one is under way, and returns its outcome.
func (a *appended) pageStored() error {
	if a == nil || a.put == nil {
		return nil
	}
	if !a.waited {
		a.putErr, a.waited = <-a.put, true
	}
	return a.putErr
}

// tail is the key's events as readTail(seq) reads them, from what was just written when that reaches back far
// enough.
func (a *appended) tail(ctx context.Context, s logical.Storage, name string, seq int) ([]json.RawMessage, error) {
	if a != nil && a.whole {
		return a.events, nil
	}
	if a != nil && seq > 0 {
		for _, raw := range a.events {
			if l, err := linkOf(raw); err != nil || l.seq <= seq {
				return a.events, nil
			}
		}
	}
	// Read from storage: only once the page's write is done, or the read may miss it.
	if err := a.pageStored(); err != nil {
		return nil, err
	}
	return readTail(ctx, s, name, seq)
}

// auditKey is the audit key as read before the append, or as read by read.
func (a *appended) auditKey(ctx context.Context, s logical.Storage, read func(context.Context, logical.Storage) (*AuditKey, error)) (*AuditKey, error) {
	if a != nil && a.audit != nil {
		return a.audit, nil
	}
	return read(ctx, s)
}

// signHead signs a head over the key's chain as stored, if the chain extends the signed head (or, with headless,
// if there is none and the chain is whole from seq 1). Nothing is written when the head is up to date. just is
// what an append has just written (nil: read everything from storage).
func (m *Manager) signHead(ctx context.Context, s logical.Storage, name string, headless bool, just *appended) error {
	var head *evidence.Head
	if just == nil || !just.noHead {
		var err error
		if head, err = readHead(ctx, s, name); err != nil {
			return err
		}
	}
	// The audit key is read once: the head is verified and the next one signed with the versions read here.
	var signer *AuditKey
	var unvouched map[int]string
	from := chainLink{seq: 1}
	if head != nil {
		stored, err := just.auditKey(ctx, s, readAuditKey)
		if err != nil {
			return err
		}
		var keys evidence.AuditKeys
		if stored != nil {
			if signer, unvouched, err = m.vouchedAuditKey(ctx, s, stored); err != nil {
				return err
			}
		}
		if keys, err = auditPublicKeys(signer); err != nil {
			return err
		}
		if head.Key != name {
			return fmt.Errorf("%w: the head is for key %q", errNotVouchable, head.Key)
		}
		if err := keys.Verify(head.AuditKeyVersion, head.SignedBytes(), head.Signature); err != nil {
			return fmt.Errorf("%w: head: %v", errNotVouchable, withUnvouched(err, head.AuditKeyVersion, unvouched))
		}
		from = chainLink{seq: head.Seq, hash: head.Hash}
	} else if !headless {
		return fmt.Errorf("%w: no signed head vouches for the chain's beginning", errNotVouchable)
	}
	if why := m.signedHeads.rolledBack(name, head, nil); why != "" {
		return fmt.Errorf("%w: %s", errNotVouchable, why)
	}
	if head != nil {
		m.signedHeads.saw(name, *head)
	}
	back := from.seq
	if head == nil {
		// The whole history is read and its beginning checked: not while no audit key can sign it (one that
		// could not be made is tried again only after a while), or every event would read every event before it.
		stored, err := just.auditKey(ctx, s, m.auditKeyForSigning)
		if err != nil {
			return err
		}
		if signer, unvouched, err = m.vouchedAuditKey(ctx, s, stored); err != nil {
			return err
		}
		back = 0
	}
	tail, err := just.tail(ctx, s, name, back)
	if err != nil {
		return err
	}
	if head == nil {
		if why := evidence.CheckBeginning(tail); why != nil {
			return fmt.Errorf("%w: %v", errNotVouchable, why)
		}
	}
	end, err := extends(tail, from)
	if err != nil {
		return err
	}
	if head != nil && end == from {
		return nil
	}
	next := evidence.Head{Key: name, Seq: end.seq, Hash: end.hash, SignedAt: m.now().UTC()}
	if signer == nil {
		return errors.New("the mount has no audit key to sign the head with")
	}
	if next.AuditKeyVersion, next.Signature, err = m.auditSignWith(ctx, s, signer, unvouched, next.SignedBytes()); err != nil {
		return err
	}
	e, err := logical.StorageEntryJSON(historyHeadKey(name), next)
	if err != nil {
		return err
	}
	if err := just.pageStored(); err != nil {
		return err
	}
	if err := s.Put(ctx, e); err != nil {
		return err
	}
	m.signedHeads.saw(name, next)
	return nil
}

// signedHeads is, per key, the highest head this process signed or saw signed (its signature verified with a
// version the token holds): what storage cannot go back from unnoticed while the process lives.
type signedHeads struct {
	mu    sync.Mutex
	heads map[string]signedHead
}

// signedHead is what rolledBack compares a stored head with. The signature and the rest of the head are not kept:
// a hundred bytes a key, with ten thousand keys held.
type signedHead struct {
	seq      int
	hash     string
	signedAt time.Time
}

// saw remembers head h of key name if it is higher than the one remembered.
func (sh *signedHeads) saw(name string, h evidence.Head) {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if sh.heads == nil {
		sh.heads = map[string]signedHead{}
	}
	if was, ok := sh.heads[name]; !ok || h.Seq > was.seq {
		sh.heads[name] = signedHead{seq: h.Seq, hash: h.Hash, signedAt: h.SignedAt}
	}
}

// rolledBack says how key name's head (nil: none) and events as stored (nil: not checked) went back from the
// highest head remembered; "" when they did not.
func (sh *signedHeads) rolledBack(name string, head *evidence.Head, events []json.RawMessage) string {
	sh.mu.Lock()
	was, ok := sh.heads[name]
	sh.mu.Unlock()
	if !ok {
		return ""
	}
	signed := fmt.Sprintf("history rolled back: seq %d was signed at %s", was.seq, was.signedAt.UTC().Format(time.RFC3339Nano))
	switch {
	case head == nil:
		return signed + ", and storage holds no head"
	case head.Seq < was.seq:
		return fmt.Sprintf("%s, and the head in storage is at seq %d", signed, head.Seq)
	case head.Seq == was.seq && head.Hash != was.hash:
		return signed + " over another event than the head in storage vouches for"
	}
	if events == nil {
		return ""
	}
	for i := len(events) - 1; i >= 0; i-- {
		if l, err := linkOf(events[i]); err == nil && l.seq == was.seq {
			if h, err := evidence.EventHash(events[i]); err != nil || h != was.hash {
				return signed + " over another event than the one stored at that seq"
			}
			return ""
		}
	}
	return fmt.Sprintf("%s, and storage holds no event of seq %d", signed, was.seq)
}

// readTail reads the key's events from the newest back to the page that holds seq (or an unchained event); all of
// them when seq is 0.
func readTail(ctx context.Context, s logical.Storage, name string, seq int) ([]json.RawMessage, error) {
	pages, err := historyPages(ctx, s, name)
	if err != nil {
		return nil, err
	}
	var out []json.RawMessage
	for i := len(pages) - 1; i >= 0; i-- {
		events, err := readRawPage(ctx, s, name, pages[i])
		if err != nil {
			return nil, err
		}
		out = append(events, out...)
		for _, raw := range events {
			if l, err := linkOf(raw); seq > 0 && (err != nil || l.seq <= seq) {
				return out, nil // the page reaches back to seq, or to what came before the chain
			}
		}
	}
	return out, nil
}

// extends checks that events, oldest first, carry the chained event from (the last of that seq; with no hash: the
// chain's first event, whose beginning the caller checked with evidence.CheckBeginning) and after it only events
// that follow one another, each matching its hash; it returns the last one's link.
func extends(events []json.RawMessage, from chainLink) (chainLink, error) {
	start := -1
	for i := len(events) - 1; i >= 0 && start < 0; i-- {
		if l, err := linkOf(events[i]); err == nil && l.seq == from.seq {
			start = i
		}
	}
	if start < 0 {
		return chainLink{}, fmt.Errorf("%w: the event of seq %d is missing", errNotVouchable, from.seq)
	}
	var prev chainLink
	for i := start; i < len(events); i++ {
		var f struct {
			Seq  *int   `json:"seq"`
			Prev string `json:"prev_hash"`
			Hash string `json:"hash"`
		}
		if err := json.Unmarshal(events[i], &f); err != nil {
			return chainLink{}, fmt.Errorf("%w: %v", errNotVouchable, err)
		}
		h, err := evidence.EventHash(events[i])
		if err != nil {
			return chainLink{}, fmt.Errorf("%w: %v", errNotVouchable, err)
		}
		switch {
		case f.Seq == nil:
			return chainLink{}, fmt.Errorf("%w: an unchained event follows chained ones", errNotVouchable)
		case i == start && from.hash != "" && h != from.hash:
			return chainLink{}, fmt.Errorf("%w: the event of seq %d is not the one the head signed", errNotVouchable, from.seq)
		case i > start && (*f.Seq != prev.seq+1 || f.Prev != prev.hash):
			return chainLink{}, fmt.Errorf("%w: the event of seq %d does not follow the one before it", errNotVouchable, *f.Seq)
		case h != f.Hash:
			return chainLink{}, fmt.Errorf("%w: the event of seq %d does not match its hash", errNotVouchable, *f.Seq)
		}
		prev = chainLink{seq: *f.Seq, hash: h}
	}
	return prev, nil
}

// signHeadsLeftBehind signs the heads that appends left behind while the audit key could not sign; the periodic
// function calls it. A head that still cannot be signed waits for the next tick.
func (m *Manager) signHeadsLeftBehind(ctx context.Context, s logical.Storage) {
	m.unsigned.Range(func(name string, _ bool) bool {
		l := m.lock(name)
		l.Lock()
		defer l.Unlock()
		if v, ok := m.unsigned.Load(name); ok { // not signed meanwhile by an append
			if err := m.signHead(ctx, s, name, v, nil); err == nil || errors.Is(err, errNotVouchable) {
				m.unsigned.Delete(name)
				if err != nil {
					m.log.Error("history is not what its signed head vouches for: the head is not signed again, and history/verify reports the break",
						"key", name, "error", err)
				} else {
					m.log.Info("history head signed after the audit key could not sign it", "key", name)
				}
			}
		}
		return ctx.Err() == nil
	})
}

// VerifyHistory checks key name's history chain against its signed head with the audit key's public keys, under
// the key's lock (so that it never sees an append half done). The public keys are those of storage that the token
// vouches for (AuditKey). It returns the events as stored, oldest first (the
// clear accessor of unchained events stored by engines before the HMAC shown sealed: no response carries one), the
// head (nil if none) and what the check found. A deleted key's history is verified alike.
func (m *Manager) VerifyHistory(ctx context.Context, s logical.Storage, name string) ([]json.RawMessage, *evidence.Head, evidence.Verification, error) {
	l := m.lock(name)
	l.RLock()
	defer l.RUnlock()
	events, err := readTail(ctx, s, name, 0)
	if err != nil {
		return nil, nil, evidence.Verification{}, err
	}
	head, err := readHead(ctx, s, name)
	if err != nil {
		return nil, nil, evidence.Verification{}, err
	}
	keys, unvouched, err := m.auditKeys(ctx, s)
	if err != nil {
		return nil, nil, evidence.Verification{}, err
	}
	v := evidence.VerifyChain(name, events, head, keys)
	if head != nil && !v.HeadSigned && unvouched[head.AuditKeyVersion] != "" {
		v.Reason = withUnvouched(errors.New(v.Reason), head.AuditKeyVersion, unvouched).Error()
	}
	if why := m.signedHeads.rolledBack(name, head, events); why != "" {
		if v.Verified {
			v.Verified, v.Broken, v.BrokenSeq, v.Reason = false, len(events), 0, why
		} else {
			v.Reason += "; " + why
		}
	} else if v.HeadSigned {
		m.signedHeads.saw(name, *head)
	}
	shown := append([]json.RawMessage(nil), events...)
	if err := m.sealLegacy(ctx, s, shown); err != nil {
		return nil, nil, evidence.Verification{}, err
	}
	return shown, head, v, nil
}

// withUnvouched adds to err, about a head signed with audit key version n, why the token does not vouch for that
// version, if it does not.
func withUnvouched(err error, n int, unvouched map[int]string) error {
	if why := unvouched[n]; why != "" {
		return fmt.Errorf("%v: audit key version %d in storage is not the token's: %s", err, n, why)
	}
	return err
}
