package hsm

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/softhsmtest"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

const testPIN = "1234-test"

var (
	// env is the SoftHSM token directory of the tests that are about SoftHSM itself (newToken).
	env        *softhsmtest.Env
	tokenCount atomic.Int32
	// matrix holds a token maker for every PKCS#11 implementation of the run (tokentest.Selected).
	matrix []*tokentest.Provider
	// testDir holds every token of the run.
	testDir string
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cmk-hsm-test-")
	if err != nil {
		panic(err)
	}
	testDir = dir
	code := func() int {
		if env, err = softhsmtest.Setup(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		for _, kind := range tokentest.Selected() {
			if kind == tokentest.SoftHSM {
				continue // newToken's directory serves the matrix too
			}
			p, err := tokentest.Setup(kind, filepath.Join(dir, string(kind)))
			if err != nil {
				fmt.Fprintln(os.Stderr, "token matrix:", err)
				return 1
			}
			defer p.Close()
			matrix = append(matrix, p)
		}
		code := m.Run()
		if out := os.Getenv("CMK_MATRIX_OUT"); out != "" && code == 0 {
			if err := os.WriteFile(out, []byte(capabilityTable()), 0o644); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
		}
		return code
	}()
	os.RemoveAll(dir)
	os.Exit(code)
}

// onEveryToken runs fn once per PKCS#11 implementation of the matrix, as a subtest named for it, with a token
// opened for it: a fresh SoftHSM token, or the run's one token of the other kinds.
func onEveryToken(t *testing.T, poolSize int, fn func(t *testing.T, tk tokentest.Token, tok *Token)) {
	t.Helper()
	kinds := map[tokentest.Kind]bool{}
	for _, k := range tokentest.Selected() {
		kinds[k] = true
	}
	if kinds[tokentest.SoftHSM] {
		t.Run(string(tokentest.SoftHSM), func(t *testing.T) {
			tok, cfg := newToken(t, poolSize, rawRSAOAEPFallback)
			fn(t, tokentest.Token{Kind: tokentest.SoftHSM, Library: cfg.Library, Label: cfg.TokenLabel, PIN: cfg.PIN}, tok)
		})
	}
	for _, p := range matrix {
		t.Run(string(p.Kind), func(t *testing.T) {
			tk, err := p.Token("hsm-test")
			if err != nil {
				t.Fatal(err)
			}
			fn(t, tk, openToken(t, tk, poolSize))
		})
	}
}

// onEveryTokenUnopened is onEveryToken for tests that open (and close) the tokens themselves: nothing of the
// test run holds the module open meanwhile.
func onEveryTokenUnopened(t *testing.T, fn func(t *testing.T, tk tokentest.Token)) {
	t.Helper()
	for _, k := range tokentest.Selected() {
		if k != tokentest.SoftHSM {
			continue
		}
		t.Run(string(k), func(t *testing.T) {
			label := fmt.Sprintf("hsm-test-%d", tokenCount.Add(1))
			if err := env.CreateToken(label, testPIN); err != nil {
				t.Fatal(err)
			}
			fn(t, tokentest.Token{Kind: tokentest.SoftHSM, Library: env.Library, Label: label, PIN: testPIN})
		})
	}
	for _, p := range matrix {
		t.Run(string(p.Kind), func(t *testing.T) {
			tk, err := p.Token("hsm-test")
			if err != nil {
				t.Fatal(err)
			}
			fn(t, tk)
		})
	}
}

// configFor is the Config that opens tk.
func configFor(tk tokentest.Token, poolSize int) Config {
	return Config{Library: tk.Library, InitParams: tk.InitParams, TokenLabel: tk.Label, PIN: tk.PIN, PoolSize: poolSize,
		Mount: "test", RawRSAOAEPFallback: true}
}

func openToken(t *testing.T, tk tokentest.Token, poolSize int) *Token {
	t.Helper()
	tok, err := Open(configFor(tk, poolSize), hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testLog{t}}))
	if err != nil {
		t.Fatalf("open %s token %q: %v", tk.Kind, tk.Label, err)
	}
	t.Cleanup(tok.Close)
	return tok
}

// matrixResults records, per token kind and row, what a matrix test found: the capability table of docs/HSMS.md
// is written from it (CMK_MATRIX_OUT, make hsm-matrix).
var (
	matrixMu      sync.Mutex
	matrixResults = map[string]map[string]string{}
	matrixRows    []string
)

func record(kind tokentest.Kind, row, result string) {
	matrixMu.Lock()
	defer matrixMu.Unlock()
	if matrixResults[row] == nil {
		matrixResults[row] = map[string]string{}
		matrixRows = append(matrixRows, row)
	}
	matrixResults[row][string(kind)] = result
}

func capabilityTable() string {
	matrixMu.Lock()
	defer matrixMu.Unlock()
	var b strings.Builder
	b.WriteString("| | SoftHSM 2.6 | NSS softokn 3.87 | opencryptoki 3.8 (soft) | tpm2-pkcs11 1.9 (swtpm) |\n|---|---|---|---|---|\n")
	for _, row := range matrixRows {
		b.WriteString("| " + row)
		for _, k := range tokentest.Kinds {
			v := matrixResults[row][string(k)]
			if v == "" {
				v = "–"
			}
			b.WriteString(" | " + strings.ReplaceAll(v, "|", "\\|"))
		}
		b.WriteString(" |\n")
	}
	return b.String()
}

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(string(p))
	return len(p), nil
}
