package cmk

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

type batchResultJSON struct {
	Ciphertext string `json:"ciphertext"`
	Plaintext  string `json:"plaintext"`
	KeyVersion int    `json:"key_version"`
	HMAC       string `json:"hmac"`
	Error      string `json:"error"`
	Reference  string `json:"reference"`
}

// batchResults reads batch_results as a client would see them, through JSON.
func batchResults(t *testing.T, resp *logical.Response) []batchResultJSON {
	t.Helper()
	raw, err := json.Marshal(rawBatch(t, resp))
	if err != nil {
		t.Fatal(err)
	}
	var out []batchResultJSON
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestBatchOf1000(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	in := make([]interface{}, 1000)
	for i := range in {
		in[i] = map[string]interface{}{"plaintext": b64(fmt.Sprintf("item-%d", i)), "reference": fmt.Sprint(i)}
	}
	resp := e.ok(e.write("encrypt/k", map[string]interface{}{"batch_input": in}))
	enc := batchResults(t, resp)
	if len(enc) != 1000 {
		t.Fatalf("%d results", len(enc))
	}
	dec := make([]interface{}, len(enc))
	for i, r := range enc {
		if r.Error != "" || r.KeyVersion != 1 || r.Reference != fmt.Sprint(i) {
			t.Fatalf("item %d: %+v", i, r)
		}
		dec[i] = map[string]interface{}{"ciphertext": r.Ciphertext, "reference": r.Reference}
	}
	resp = e.ok(e.write("decrypt/k", map[string]interface{}{"batch_input": dec}))
	for i, r := range batchResults(t, resp) {
		if r.Error != "" || r.Plaintext != b64(fmt.Sprintf("item-%d", i)) || r.Reference != fmt.Sprint(i) {
			t.Fatalf("decrypt item %d: %+v", i, r)
		}
	}
	e.ok(e.write("keys/k/rotate", nil))
	resp = e.ok(e.write("rewrap/k", map[string]interface{}{"batch_input": dec}))
	for i, r := range batchResults(t, resp) {
		if r.Error != "" || r.KeyVersion != 2 || !strings.HasPrefix(r.Ciphertext, "vault:v2:") {
			t.Fatalf("rewrap item %d: %+v", i, r)
		}
	}
}

func TestBatchPerItemErrors(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	good := encryptOK(t, e, "k", "good")
	in := []interface{}{
		map[string]interface{}{"ciphertext": good, "reference": "ok"},
		map[string]interface{}{"ciphertext": "vault:v1:AAAA", "reference": "short"},
		map[string]interface{}{"ciphertext": 42, "reference": "number"},
		"not an object",
		map[string]interface{}{"reference": "missing"},
	}
	resp, err := e.write("decrypt/k", map[string]interface{}{"batch_input": in})
	if got := status(resp, err); got != 400 {
		t.Fatalf("mixed batch: status %d, want 400", got)
	}
	rs := batchResults(t, resp)
	if rs[0].Error != "" || rs[0].Plaintext != b64("good") || rs[0].Reference != "ok" {
		t.Fatalf("good item: %+v", rs[0])
	}
	for i, want := range []string{"", "too short", "must be a string", "must be an object", "missing ciphertext"} {
		if !strings.Contains(rs[i].Error, want) || (want == "" && rs[i].Error != "") {
			t.Errorf("item %d error %q, want %q", i, rs[i].Error, want)
		}
	}
	// partial_failure_response_code applies when some items succeeded.
	resp, err = e.write("decrypt/k", map[string]interface{}{"batch_input": in, "partial_failure_response_code": 207})
	if got := status(resp, err); got != 207 {
		t.Fatalf("partial failure code: %d", got)
	}
	// Not when every item failed.
	resp, err = e.write("decrypt/k", map[string]interface{}{"batch_input": in[1:], "partial_failure_response_code": 207})
	if got := status(resp, err); got != 400 {
		t.Fatalf("all failed: %d", got)
	}
	// max_batch_size bounds a batch as a whole.
	e.ok(e.write("config/keys", map[string]interface{}{"max_batch_size": 2}))
	resp, err = e.write("encrypt/k", map[string]interface{}{"batch_input": []interface{}{
		map[string]interface{}{"plaintext": ""}, map[string]interface{}{"plaintext": ""}, map[string]interface{}{"plaintext": ""},
	}})
	if status(resp, err) != 400 || !strings.Contains(respText(resp), "max_batch_size") {
		t.Fatalf("oversized batch: %d %s", status(resp, err), respText(resp))
	}
}

// A batch keeps as many items in flight as the HSM session pool allows, not one per CPU: on a network HSM each
// item is round trips spent waiting, and a batch spread over two goroutines on a two-core host would keep two
// calls in flight on a 16-session pool.
func TestBatchSpreadsOverThePoolNotTheCPUs(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	const pool = 8
	items := make([]batchItem, 4*pool*minItemsPerWorker) // enough for 32 goroutines: the pool, not the items, bounds them
	var mu sync.Mutex
	inFlight, most := 0, 0
	all := make(chan struct{})
	giveUp, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fn := func(i int, it *batchItem) (encryptResult, error) {
		mu.Lock()
		inFlight++
		most = max(most, inFlight)
		if inFlight == pool && most == pool && giveUp.Err() == nil {
			select {
			case <-all:
			default:
				close(all)
			}
		}
		mu.Unlock()
		select { // as an HSM round trip: wait until the whole pool is busy, or give up
		case <-all:
		case <-giveUp.Done():
		}
		mu.Lock()
		inFlight--
		mu.Unlock()
		return encryptResult{KeyVersion: 1}, nil
	}
	d := &framework.FieldData{Raw: map[string]interface{}{}, Schema: batchFields()}
	resp, err := runBatch(d, &logical.Request{}, items, true, pool, fn, func(r encryptResult) map[string]interface{} { return nil })
	if err != nil || resp == nil {
		t.Fatalf("batch: %v", err)
	}
	if most != pool {
		t.Fatalf("%d items in flight at most on a pool of %d (GOMAXPROCS 2)", most, pool)
	}
}
