package cmk

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// batchItem is one element of batch_input (or the single request's fields), as Transit names them.
type batchItem struct {
	Plaintext      string
	Ciphertext     string
	AssociatedData string
	Context        string
	Nonce          string
	KeyVersion     int
	Reference      string
	PaddingScheme  string
	DecryptPadding string // rewrap: decrypt_padding_scheme
	EncryptPadding string // rewrap: encrypt_padding_scheme
	Input          string // sign, verify, hmac
	Signature      string // verify
	HMAC           string // verify
	hasInput       bool
	hasPlaintext   bool
	hasCiphertext  bool
	err            string // why this item could not be read; it fails alone
}

// readBatch reads batch_input, or nil when the request has none. A batch that is not a list, is empty or
// exceeds max fails the request; an element of the wrong shape fails only itself.
func readBatch(d *framework.FieldData, max int) ([]batchItem, error) {
	raw, ok := d.Raw["batch_input"]
	if !ok || raw == nil {
		return nil, nil
	}
	list, ok := raw.([]interface{})
	if !ok {
		return nil, callerf("batch_input must be a list of objects, got %s", jsonKind(raw))
	}
	if len(list) == 0 {
		return nil, callerf("missing batch input to process")
	}
	if len(list) > max {
		return nil, callerf("batch_input has %d items; max_batch_size is %d (config/keys)", len(list), max)
	}
	known := itemFields(d.Schema)
	items := make([]batchItem, len(list))
	for i, e := range list {
		m, ok := e.(map[string]interface{})
		if !ok {
			items[i].err = fmt.Sprintf("batch_input[%d] must be an object, got %s", i, jsonKind(e))
			continue
		}
		items[i] = itemFromMap(i, m)
		if err := refuseUnknownItemFields(i, m, known); err != nil {
			items[i].err = err.Error() // the item keeps its reference
		}
	}
	return items, nil
}

// readItemFields are the fields itemFromMap reads.
var readItemFields = []string{"plaintext", "ciphertext", "associated_data", "context", "nonce", "reference", "padding_scheme",
	"decrypt_padding_scheme", "encrypt_padding_scheme", "input", "signature", "hmac", "key_version"}

// transitCiphertextItem are the fields of Transit's batch item for encrypt, decrypt and rewrap (its
// BatchRequestItem, one type for the three): each of those paths accepts them all in an item, as Transit does.
var transitCiphertextItem = []string{"context", "plaintext", "ciphertext", "padding_scheme", "nonce", "key_version", "associated_data", "reference", "iv"}

// itemFields are the fields a batch item of the path with this schema may carry: those of the single request
// that are per item, and the ones Transit's item of the same path knows (key_version everywhere; sign and
// verify's signature_context, verify's cmac). iv, signature_context and cmac are refused when set.
func itemFields(schema map[string]*framework.FieldSchema) []string {
	var known []string
	for _, f := range readItemFields {
		if _, ok := schema[f]; ok || f == "key_version" {
			known = append(known, f)
		}
	}
	_, plaintext := schema["plaintext"]
	_, ciphertext := schema["ciphertext"]
	_, signature := schema["signature_algorithm"]
	_, verify := schema["signature"]
	switch {
	case plaintext || ciphertext:
		known = append(known, transitCiphertextItem...)
	case verify:
		known = append(known, "signature_context", "cmac")
	case signature:
		known = append(known, "signature_context")
	}
	slices.Sort(known)
	return slices.Compact(known)
}

// refuseUnknownItemFields fails an item that carries a field its path's items do not know (a misspelt
// associated_data would otherwise encrypt without AAD), or a Transit field that asks for what cannot be done.
func refuseUnknownItemFields(i int, m map[string]interface{}, known []string) error {
	var unknown []string
	for f, v := range m {
		switch why, unsupported := transitUnsupported[f]; {
		case !slices.Contains(known, f):
			unknown = append(unknown, f)
		case unsupported && isSet(v):
			return fmt.Errorf("batch_input[%d]: %s", i, why)
		}
	}
	if len(unknown) == 0 {
		return nil
	}
	slices.Sort(unknown)
	return fmt.Errorf("batch_input[%d]: unknown field %s; an item's fields are %s", i, strings.Join(unknown, ", "), strings.Join(known, ", "))
}

func itemFromMap(i int, m map[string]interface{}) batchItem {
	var it batchItem
	var errs []error
	str := func(field string, dst *string) bool {
		v, ok := m[field]
		if !ok || v == nil {
			return false
		}
		s, isStr := v.(string)
		if !isStr {
			errs = append(errs, fmt.Errorf("batch_input[%d].%s must be a string, got %s", i, field, jsonKind(v)))
			return false
		}
		*dst = s
		return true
	}
	it.hasPlaintext = str("plaintext", &it.Plaintext)
	it.hasCiphertext = str("ciphertext", &it.Ciphertext)
	str("associated_data", &it.AssociatedData)
	str("context", &it.Context)
	str("nonce", &it.Nonce)
	str("reference", &it.Reference)
	str("padding_scheme", &it.PaddingScheme)
	str("decrypt_padding_scheme", &it.DecryptPadding)
	str("encrypt_padding_scheme", &it.EncryptPadding)
	it.hasInput = str("input", &it.Input)
	str("signature", &it.Signature)
	str("hmac", &it.HMAC)
	if v, ok := m["key_version"]; ok && v != nil {
		n, err := toInt(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("batch_input[%d].key_version: %v", i, err))
		}
		it.KeyVersion = n
	}
	if len(errs) > 0 {
		it.err = errors.Join(errs...).Error()
	}
	return it
}

func toInt(v interface{}) (int, error) {
	switch n := v.(type) {
	case int:
		return n, nil
	case json.Number:
		i, err := n.Int64()
		if err != nil || i > math.MaxInt32 || i < math.MinInt32 {
			return 0, fmt.Errorf("%q is not a whole number in range", n.String())
		}
		return int(i), nil
	case float64:
		if n != math.Trunc(n) || n > math.MaxInt32 || n < math.MinInt32 {
			return 0, fmt.Errorf("%v is not a whole number in range", n)
		}
		return int(n), nil
	case string:
		i, err := strconv.Atoi(n)
		if err != nil {
			return 0, fmt.Errorf("%q is not a whole number", n)
		}
		return i, nil
	}
	return 0, fmt.Errorf("must be a number, got %s", jsonKind(v))
}

func jsonKind(v interface{}) string {
	switch v.(type) {
	case nil:
		return "null"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case json.Number, float64, int, int64:
		return "a number"
	case []interface{}:
		return "a list"
	case map[string]interface{}:
		return "an object"
	}
	return fmt.Sprintf("%T", v)
}

// batchOutcome tallies a batch's results to decide its single HTTP status, as Transit does: any caller error
// gives 400 (or partial_failure_response_code when some items succeeded); otherwise an unreachable HSM gives 503
// and any other failure 500.
type batchOutcome struct {
	successes bool
	worst     int // the status that decides: 400 over 503 over 500
}

func (o *batchOutcome) add(status int) {
	switch {
	case status == 0:
		o.successes = true
	case status == http.StatusBadRequest:
		o.worst = status
	case status == http.StatusServiceUnavailable && o.worst != http.StatusBadRequest:
		o.worst = status
	case o.worst == 0:
		o.worst = status
	}
}

// respond returns the batch response with its status.
func (o *batchOutcome) respond(d *framework.FieldData, req *logical.Request, resp *logical.Response) (*logical.Response, error) {
	code := o.worst
	if code == 0 {
		return resp, nil
	}
	if raw, ok := d.GetOk("partial_failure_response_code"); ok && o.successes {
		if c := raw.(int); c >= 1 && c <= 599 {
			code = c
		} else {
			resp.AddWarning(fmt.Sprintf("invalid HTTP response code override from partial_failure_response_code, reverting to %d", code))
		}
	}
	return logical.RespondWithStatusCode(resp, req, code)
}

// batchResult is what every result type carries besides its data: the caller's reference and the item's error.
type batchResult interface{ setOutcome(reference, err string) }

// minItemsPerWorker keeps small batches on one goroutine: spreading them costs more than it saves.
const minItemsPerWorker = 64

// runBatch applies fn to every item, each failing alone, and answers as Transit does: a single request gets
// single(result), or its failure's status; a batch gets batch_results, in input order, under one status.
// Items are spread over up to workers goroutines (the HSM session pool), so that a batch keeps several sessions
// busy where the token scales. The pool, not the CPUs, bounds them: a network HSM's call is a round trip spent
// waiting, and a batch capped at one goroutine per core would keep two calls in flight on a 64-session pool.
func runBatch[R any, P interface {
	*R
	batchResult
}](d *framework.FieldData, req *logical.Request, items []batchItem, batch bool, workers int,
	fn func(i int, it *batchItem) (R, error), single func(R) map[string]interface{}) (*logical.Response, error) {
	results := make([]R, len(items))
	errs := make([]error, len(items))
	run := func(i int) {
		it := &items[i]
		if it.err != "" {
			errs[i] = callerf("%s", it.err)
		} else {
			results[i], errs[i] = fn(i, it)
		}
		msg := ""
		if errs[i] != nil {
			_, msg = classify(errs[i])
		}
		P(&results[i]).setOutcome(it.Reference, msg)
	}
	workers = min(workers, len(items)/minItemsPerWorker)
	if workers <= 1 {
		for i := range items {
			run(i)
		}
	} else {
		var next atomic.Int64
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := int(next.Add(1) - 1); i < len(items); i = int(next.Add(1) - 1) {
					run(i)
				}
			}()
		}
		wg.Wait()
	}
	if !batch {
		if errs[0] != nil {
			return respond(errs[0])
		}
		return &logical.Response{Data: single(results[0])}, nil
	}
	var out batchOutcome
	for _, e := range errs {
		status := 0
		if e != nil {
			status, _ = classify(e)
		}
		out.add(status)
	}
	return out.respond(d, req, &logical.Response{Data: map[string]interface{}{"batch_results": results}})
}

// batchFields are the request fields every batch-capable path shares.
func batchFields() map[string]*framework.FieldSchema {
	return map[string]*framework.FieldSchema{
		"batch_input": {
			Type:        framework.TypeSlice,
			Description: "List of items to process in one request; each takes the single-request fields plus reference. Results keep the input's order.",
		},
		"partial_failure_response_code": {
			Type:        framework.TypeInt,
			Description: "HTTP status to return instead of 400 when some batch items fail on bad input and others succeed. If all fail, 400 is returned.",
		},
		"reference": {
			Type:        framework.TypeString,
			Description: "Caller's value echoed in the batch result, to match results to inputs.",
		},
	}
}
