package cmk

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/keys"
)

// The docs are read by people deciding whether to trust the engine: a test name or a field they cite that the code
// does not have is a claim nobody can check. These tests keep the names in step with the code.

var (
	reBackquoted = regexp.MustCompile("`([^`\n]+)`")
	reTestName   = regexp.MustCompile(`^(Test|Fuzz|Benchmark)[A-Z0-9]\w*$`)
	reGoFile     = regexp.MustCompile(`^[\w./-]+\.go$`)
	// A backquoted snake_case identifier, alone or as name=value: what the docs write for a field.
	reFieldLike = regexp.MustCompile(`^([a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?:=\S*)?$`)
	rePathWord  = regexp.MustCompile(`[a-z][a-z0-9]*(?:_[a-z0-9]+)+`)
)

// testFuncs finds every top-level Test, Fuzz and Benchmark function of the repository's test files, and the files
// (relative to the repository's root) that declare each.
func testFuncs(t *testing.T) map[string][]string {
	t.Helper()
	funcs := map[string][]string{}
	fset := token.NewFileSet()
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path != "." && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata") {
				return filepath.SkipDir // build outputs, dev servers' state, fuzz corpora
			}
			return nil
		}
		if !strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		for _, decl := range f.Decls {
			if fn, ok := decl.(*ast.FuncDecl); ok && fn.Recv == nil && reTestName.MatchString(fn.Name.Name) {
				funcs[fn.Name.Name] = append(funcs[fn.Name.Name], filepath.ToSlash(path))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return funcs
}

// docFiles are the Markdown files a user reads: the README and everything under docs/.
func docFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	return append([]string{"README.md"}, files...)
}

// Every test docs/RELIABILITY.md names exists, in the file the same cell names after it; a test the README or
// another doc names exists somewhere.
func TestReliabilityNamesOnlyTestsThatExist(t *testing.T) {
	funcs := testFuncs(t)
	if len(funcs) < 100 {
		t.Fatalf("found only %d test functions: the walk of the repository is broken", len(funcs))
	}
	checked := 0
	for _, doc := range docFiles(t) {
		raw, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		for i, line := range strings.Split(string(raw), "\n") {
			// In RELIABILITY.md a cell reads "`TestA`, `TestB` (`dir/file_test.go`)": the file names where the
			// tests before it are, back to the previous file.
			var pending []string
			for _, cell := range strings.Split(line, "|") {
				pending = pending[:0]
				for _, m := range reBackquoted.FindAllStringSubmatch(cell, -1) {
					word := m[1]
					switch {
					case reTestName.MatchString(word):
						checked++
						if funcs[word] == nil {
							t.Errorf("%s:%d names %s, which no test file declares", doc, i+1, word)
							continue
						}
						pending = append(pending, word)
					case reGoFile.MatchString(word) && doc == "docs/RELIABILITY.md":
						for _, name := range pending {
							if !contains(funcs[name], word) {
								t.Errorf("%s:%d puts %s in %s; it is in %s", doc, i+1, name, word, strings.Join(funcs[name], ", "))
							}
						}
						pending = pending[:0]
					}
				}
			}
		}
	}
	if checked < 60 {
		t.Fatalf("only %d test names found in the docs: the parsing is broken", checked)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// notFields are backquoted snake_case words of the docs that are not fields of this engine's API, each with what
// it is. Anything else the docs backquote in snake_case must be a request field of a path or a response field the
// code emits.
var notFields = map[string]string{
	"decrypt_only":                 "a version's state, a value of state",
	"destroy_scheduled":            "a version's state, a value of state",
	"deletion_scheduled":           "a key's state in inventory, a value of state",
	"version_adopted":              "a history event, a value of event",
	"decrypt_window_advanced":      "a history event, a value of event",
	"xks_denied":                   "a history event, a value of event",
	"rotation_skipped":             "a history event, a value of event",
	"require_grant":                "a value of on_anomaly",
	"block_caller":                 "a value of on_anomaly",
	"plugin_directory":             "Vault's server configuration",
	"min_encryption_versoin":       "Terraform's misspelling, accepted and ignored with a warning",
	"asociated_data":               "a misspelt field, the README's example of a typo refused",
	"max_json_array_element_count": "Vault's listener setting",
	"max_json_string_value_length": "Vault's listener setting",
	"max_request_size":             "Vault's listener setting",
}

// TestDocsNameOnlyFieldsTheCodeHas reads every backquoted snake_case word of the README and docs/ (a field, as the
// docs write them) and fails on one that is neither a request field of a path, nor a response field the code
// emits, nor a name listed in notFields; and on a notFields entry the docs no longer use.
func TestDocsNameOnlyFieldsTheCodeHas(t *testing.T) {
	known := map[string]bool{}
	for name := range requestFields(t) {
		known[name] = true
	}
	for name := range responseFields(t) {
		known[name] = true
	}
	for _, name := range metricNames() {
		known[name] = true
	}
	if !known["hsm_objects_missing"] || !known["adoptable_by_operator"] || !known["token_label"] {
		t.Fatalf("the code's field names were not all found (%d found): the collection is broken", len(known))
	}
	used := map[string]bool{}
	for _, doc := range docFiles(t) {
		raw, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		for i, line := range strings.Split(string(raw), "\n") {
			for _, m := range reBackquoted.FindAllStringSubmatch(line, -1) {
				f := reFieldLike.FindStringSubmatch(m[1])
				if f == nil {
					continue
				}
				used[f[1]] = true
				if !known[f[1]] && notFields[f[1]] == "" {
					t.Errorf("%s:%d names `%s`, which is no field of any path and no response field the code emits", doc, i+1, f[1])
				}
			}
		}
	}
	for name := range notFields {
		if !used[name] {
			t.Errorf("notFields lists %s, which no doc names any more", name)
		}
	}
}

// requestFields are the fields of every path's schema, and the words of the paths themselves (wrapping_key).
func requestFields(t *testing.T) map[string]bool {
	t.Helper()
	conf := logical.TestBackendConfig()
	conf.Logger = hclog.NewNullLogger()
	b := newBackend(conf)
	out := map[string]bool{}
	for _, p := range b.Backend.Paths {
		for name := range p.Fields {
			out[name] = true
		}
		for _, word := range rePathWord.FindAllString(p.Pattern, -1) {
			out[word] = true
		}
	}
	// Transit's fields accepted by name and refused when set (what the HSM cannot serve).
	for name := range transitUnsupported {
		out[name] = true
	}
	return out
}

// responseFields are the names the engine's responses carry: the string keys the package's handlers put into the
// maps they return (map literals and m["key"] = … assignments in its non-test files), and the JSON names of the
// reconcile report, usage report and anomalies, which are returned as their JSON form.
func responseFields(t *testing.T) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	for _, file := range files {
		if strings.HasSuffix(file, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, file, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			switch x := n.(type) {
			case *ast.CompositeLit:
				if mt, ok := x.Type.(*ast.MapType); ok && isResponseValue(mt.Value) {
					for _, el := range x.Elts {
						if kv, ok := el.(*ast.KeyValueExpr); ok {
							if s, ok := stringLit(kv.Key); ok {
								out[s] = true
							}
						}
					}
				}
			case *ast.AssignStmt:
				for _, lhs := range x.Lhs {
					if ix, ok := lhs.(*ast.IndexExpr); ok {
						if s, ok := stringLit(ix.Index); ok {
							out[s] = true
						}
					}
				}
			}
			return true
		})
	}
	// Whatever Manager.Reconcile returns, as path_reconcile.go answers with it.
	jsonNames(reflect.TypeOf((*keys.Manager).Reconcile).Out(0), out)
	// And what keys/:name/usage, keys/:name/anomalies and their lift answer with, their JSON form.
	jsonNames(reflect.TypeOf((*keys.Manager).UsageOf).Out(0), out)
	jsonNames(reflect.TypeOf(anomaliesView{}), out)
	jsonNames(reflect.TypeOf(liftView{}), out)
	// keys/:name/migration's and reports/compliance's per-algorithm lines.
	jsonNames(reflect.TypeOf(migrationAlgorithm{}), out)
	jsonNames(reflect.TypeOf(algorithmSummary{}), out)
	return out
}

// isResponseValue says whether a map literal's value type is what responses are made of (interface{} or string),
// not a schema or a lookup table of other values.
func isResponseValue(e ast.Expr) bool {
	switch v := e.(type) {
	case *ast.InterfaceType:
		return true
	case *ast.Ident:
		return v.Name == "string" || v.Name == "any"
	}
	return false
}

func stringLit(e ast.Expr) (string, bool) {
	if lit, ok := e.(*ast.BasicLit); ok && lit.Kind == token.STRING {
		s, err := strconv.Unquote(lit.Value)
		return s, err == nil
	}
	return "", false
}

// jsonNames adds the JSON field names of a struct type and of the structs it holds.
func jsonNames(tp reflect.Type, out map[string]bool) {
	for tp.Kind() == reflect.Slice || tp.Kind() == reflect.Pointer || tp.Kind() == reflect.Map {
		tp = tp.Elem()
	}
	if tp.Kind() != reflect.Struct {
		return
	}
	for i := 0; i < tp.NumField(); i++ {
		f := tp.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name != "" && name != "-" {
			out[name] = true
		}
		jsonNames(f.Type, out)
	}
}

// metricNames are the names of the series the metrics path serves, as their collectors describe them.
func metricNames() []string {
	m := newMetrics(func() hsmToken { return nil })
	ch := make(chan *prometheus.Desc, 64)
	go func() {
		for _, c := range m.collectors {
			c.Describe(ch)
		}
		close(ch)
	}()
	var names []string
	for d := range ch {
		if f := reMetricName.FindStringSubmatch(d.String()); f != nil {
			names = append(names, f[1])
		}
	}
	return names
}

var reMetricName = regexp.MustCompile(`fqName: "([a-z_]+)"`)
