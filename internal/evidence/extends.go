package evidence

import (
	"encoding/json"
	"fmt"
)

// Extends checks that cur's history goes on from prev's, two bundles of one key taken at different times: the
// event prev's signed head vouched for is in cur at the same seq with the same hash (which pins every event before
// it), and cur's head is not behind it. Each bundle verifies alone even when storage was rolled back between them
// (an older head restored with the pages it signed); only a comparison with what an auditor kept shows that, as
// CloudTrail's digest files each name the one before.
func Extends(prev, cur *Document) error {
	if prev.Key.Name != cur.Key.Name {
		return fmt.Errorf("the earlier bundle is of key %q, this one of %q", prev.Key.Name, cur.Key.Name)
	}
	if cur.GeneratedAt.Before(prev.GeneratedAt) {
		return fmt.Errorf("the earlier bundle was generated at %s, after this one (%s)", prev.GeneratedAt.UTC(), cur.GeneratedAt.UTC())
	}
	ph := prev.History.Head
	if ph == nil {
		return fmt.Errorf("the earlier bundle's history has no signed head: there is nothing to compare")
	}
	if ch := cur.History.Head; ch == nil || ch.Seq < ph.Seq {
		seq := 0
		if ch != nil {
			seq = ch.Seq
		}
		return fmt.Errorf("history rolled back: the earlier bundle's head was signed at seq %d, this one's is at seq %d", ph.Seq, seq)
	}
	for _, raw := range cur.History.Events {
		var f chainFields
		if err := json.Unmarshal(raw, &f); err != nil || f.Seq == nil || *f.Seq != ph.Seq {
			continue
		}
		if h, err := EventHash(raw); err != nil || h != ph.Hash || f.Hash != ph.Hash {
			return fmt.Errorf("history rewritten: the event at seq %d is not the one the earlier bundle's head signed", ph.Seq)
		}
		return nil
	}
	return fmt.Errorf("history cut: the event at seq %d that the earlier bundle's head signed is not in this one", ph.Seq)
}
