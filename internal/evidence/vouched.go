package evidence

import "encoding/json"

// Vouched says, event by event, whether the signed head vouches for it in its place: the head's signature
// verifies, the event at the head's seq hashes to the head's hash, and each event before it hashes to the
// prev_hash of the one after it, back to the first break. Only these events are what the audit key signed.
//
// Walking back from the head is what makes the marks sound: walking forward, a first break at event i says
// nothing of the events before it, which an attacker may have rewritten and chained again from the start (the
// break is then where the forgery meets the original). Events after a break whose content was altered are still
// vouched for: the head commits to them through their own hashes.
func Vouched(key string, events []json.RawMessage, head *Head, keys AuditKeys) []bool {
	vouched := make([]bool, len(events))
	if head == nil || head.Key != key || keys.Verify(head.AuditKeyVersion, head.SignedBytes(), head.Signature) != nil {
		return vouched
	}
	i := len(events) - 1
	for ; i >= 0; i-- { // events appended after the head was signed are not vouched for
		var f chainFields
		if json.Unmarshal(events[i], &f) != nil || f.Seq == nil || *f.Seq <= head.Seq {
			break
		}
	}
	wantSeq, wantHash := head.Seq, head.Hash
	for ; i >= 0 && wantSeq >= 1; i-- {
		var f chainFields
		if json.Unmarshal(events[i], &f) != nil || f.Seq == nil || *f.Seq != wantSeq {
			break
		}
		if h, err := EventHash(events[i]); err != nil || h != wantHash {
			break
		}
		vouched[i] = true
		wantSeq, wantHash = wantSeq-1, f.Prev
	}
	return vouched
}
