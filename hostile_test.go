package cmk

import (
	"encoding/json"
	"fmt"
	"regexp/syntax"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// concretePaths turns a path pattern into request paths that route to it: named groups become value ("name"),
// "1" (version) or a sample of their own pattern; optional parts are taken once with and once without.
func concretePaths(pattern, value string) []string {
	re, err := syntax.Parse(pattern, syntax.Perl)
	if err != nil {
		panic(err)
	}
	var out []string
	for _, withOptional := range []bool{true, false} {
		out = append(out, sample(re, value, withOptional))
	}
	return out
}

func sample(re *syntax.Regexp, value string, withOptional bool) string {
	switch re.Op {
	case syntax.OpLiteral:
		return string(re.Rune)
	case syntax.OpCharClass:
		return string(re.Rune[0])
	case syntax.OpAnyChar, syntax.OpAnyCharNotNL:
		return "x"
	case syntax.OpCapture:
		switch re.Name {
		case "name":
			return value
		case "version":
			return "1"
		}
		return sample(re.Sub[0], value, withOptional)
	case syntax.OpConcat:
		var b strings.Builder
		for _, sub := range re.Sub {
			b.WriteString(sample(sub, value, withOptional))
		}
		return b.String()
	case syntax.OpAlternate:
		return sample(re.Sub[0], value, withOptional)
	case syntax.OpQuest, syntax.OpStar:
		if withOptional {
			return sample(re.Sub[0], value, withOptional)
		}
		return ""
	case syntax.OpPlus, syntax.OpRepeat:
		return sample(re.Sub[0], value, withOptional)
	}
	return ""
}

// hostileValues are values of every wrong JSON type, and sizes and contents that break naive code.
func hostileValues() []interface{} {
	return []interface{}{
		nil, true, 12.5, json.Number("-1"), json.Number("99999999999999999999"), "", "\x00",
		strings.Repeat("A", 1<<20), "../../etc/passwd", "名前🔑", []interface{}{}, []interface{}{nil, 1, "x"},
		map[string]interface{}{"plaintext": 5}, map[string]interface{}{},
		[]interface{}{map[string]interface{}{"plaintext": []interface{}{}, "reference": 7, "key_version": "x"}},
	}
}

// TestHostileInputNeverA500: every path, every operation it has, fed wrong types, huge and empty values, and
// hostile names, answers with a status that is not 500 (bad input is the caller's: 400; an absent key: 404 or
// 400; the HSM being unconfigured: 503) and never panics.
func TestHostileInputNeverA500(t *testing.T) {
	e := newTestBackend(t)
	e.ok(e.write("keys/k", nil))
	e.ok(e.write("keys/s", map[string]interface{}{"type": "ecdsa-p256"}))
	names := []string{"k", "s", "missing", strings.Repeat("n", 1000), "a.b-c@d", "名前"}
	ops := []logical.Operation{logical.ReadOperation, logical.UpdateOperation, logical.CreateOperation, logical.DeleteOperation, logical.ListOperation}
	checked := 0
	seen := map[int]int{}
	for _, p := range e.b.Paths {
		if strings.Contains(p.Pattern, "config/hsm") {
			continue // covered by TestConfigHSM; hostile writes would reconnect the token on every request
		}
		fields := make([]string, 0, len(p.Fields))
		for f := range p.Fields {
			fields = append(fields, f)
		}
		fields = append(fields, "batch_input", "unknown_field")
		for _, name := range names {
			for _, path := range concretePaths(p.Pattern, name) {
				for _, op := range ops {
					if !supports(p, op) {
						continue
					}
					for _, f := range fields {
						for _, v := range hostileValues() {
							resp, err := safeRequest(e, op, path, map[string]interface{}{f: v})
							checked++
							code := status(resp, err)
							seen[code]++
							if code == 500 || code == 0 {
								t.Fatalf("%s %s {%s: %.40v}: status %d, err %v, resp %.300s", op, path, f, v, code, err, respText(resp))
							}
						}
					}
				}
			}
		}
	}
	// Deleted keys must not have been destroyed by the hostile deletes: deletion_allowed was never set.
	if r := e.ok(e.read("keys/k")); r.Data["latest_version"] == nil {
		t.Fatal("key k lost")
	}
	t.Logf("%d hostile requests, none a 500; statuses seen: %v", checked, seen)
	if seen[404] == checked {
		t.Fatal("every request was unroutable: the test reaches no handler")
	}
}

func supports(p *framework.Path, op logical.Operation) bool {
	_, ok := p.Operations[op]
	return ok
}

// safeRequest turns a panic into a test-visible status 0.
func safeRequest(e *testEnv, op logical.Operation, path string, data map[string]interface{}) (resp *logical.Response, err error) {
	defer func() {
		if r := recover(); r != nil {
			resp, err = nil, fmt.Errorf("panic: %v", r)
			e.t.Errorf("panic on %s %s: %v", op, path, r)
		}
	}()
	return e.request(op, path, data)
}
