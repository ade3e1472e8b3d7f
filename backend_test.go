package cmk

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/softhsmtest"
)

const testPIN = "4321-backend"

var (
	softhsm    *softhsmtest.Env
	tokenCount atomic.Int32
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cmk-backend-test-")
	if err != nil {
		panic(err)
	}
	softhsm, err = softhsmtest.Setup(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Setenv(LibraryEnv, softhsm.Library)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// countingStorage counts reads, to prove the hot path does none once a key is cached.
type countingStorage struct {
	logical.Storage
	gets  atomic.Int64
	lists atomic.Int64
}

func (c *countingStorage) List(ctx context.Context, prefix string) ([]string, error) {
	c.lists.Add(1)
	return c.Storage.List(ctx, prefix)
}

func (c *countingStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	c.gets.Add(1)
	return c.Storage.Get(ctx, key)
}

type testEnv struct {
	t       testing.TB
	b       *backend
	inmem   *logical.InmemStorage
	storage *countingStorage
	label   string
}

// newTestBackend mounts a backend on a token of its own and writes config/hsm.
func newTestBackend(t testing.TB) *testEnv {
	t.Helper()
	e := newUnconfiguredBackend(t)
	e.label = fmt.Sprintf("backend-test-%d", tokenCount.Add(1))
	if err := softhsm.CreateToken(e.label, testPIN); err != nil {
		t.Fatal(err)
	}
	e.ok(e.write("config/hsm", map[string]interface{}{"token_label": e.label, "pin": testPIN, "pool_size": 2}))
	return e
}

// newImportBackend is newTestBackend with the raw-RSA OAEP fallback that SoftHSM 2.6 needs for imports wrapped
// with RSA-OAEP-SHA-256 (vault transit import's default): its OAEP takes SHA-1 only.
func newImportBackend(t testing.TB) *testEnv {
	t.Helper()
	e := newTestBackend(t)
	e.ok(e.write("config/hsm", map[string]interface{}{"raw_rsa_oaep_fallback": true}))
	return e
}

func newUnconfiguredBackend(t testing.TB) *testEnv {
	t.Helper()
	conf := logical.TestBackendConfig()
	conf.BackendUUID = fmt.Sprintf("mount-%d", tokenCount.Add(1))
	conf.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testWriter{t}})
	inmem := &logical.InmemStorage{}
	st := &countingStorage{Storage: inmem}
	conf.StorageView = st
	b := newBackend(conf)
	if err := b.Setup(context.Background(), conf); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.clean(context.Background()) })
	return &testEnv{t: t, b: b, inmem: inmem, storage: st}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func (e *testEnv) request(op logical.Operation, path string, data map[string]interface{}) (*logical.Response, error) {
	return e.b.HandleRequest(context.Background(), &logical.Request{
		Operation: op, Path: path, Data: data, Storage: e.storage,
		DisplayName: "token-test", ClientTokenAccessor: "accessor-test",
	})
}

func (e *testEnv) write(path string, data map[string]interface{}) (*logical.Response, error) {
	return e.request(logical.UpdateOperation, path, data)
}

func (e *testEnv) read(path string) (*logical.Response, error) {
	return e.request(logical.ReadOperation, path, nil)
}

// ok fails the test unless the call succeeded.
func (e *testEnv) ok(resp *logical.Response, err error) *logical.Response {
	e.t.Helper()
	if err != nil || (resp != nil && resp.IsError()) {
		e.t.Fatalf("unexpected failure: err=%v resp=%v", err, respText(resp))
	}
	return resp
}

// status is the HTTP status a Vault server would send for this outcome: Vault's own mapping of errors
// (logical.RespondErrorCommon, then AdjustErrorStatusCode), 200 or 204 on success.
func status(resp *logical.Response, err error) int {
	if resp != nil && resp.Data != nil {
		if c, ok := resp.Data[logical.HTTPStatusCode].(int); ok {
			return c
		}
	}
	if err == nil && (resp == nil || !resp.IsError()) {
		if resp == nil {
			return 204
		}
		return 200
	}
	code, err := logical.RespondErrorCommon(&logical.Request{Operation: logical.UpdateOperation}, resp, err)
	logical.AdjustErrorStatusCode(&code, err) // as Vault's HTTP layer: coded errors keep their code
	return code
}

func respText(resp *logical.Response) string {
	if resp == nil {
		return "<nil>"
	}
	return fmt.Sprintf("%v", resp.Data)
}

// tokenObjects lists this mount's objects as the token itself reports them, through a separate connection.
func (e *testEnv) tokenObjects() []hsm.ObjectInfo {
	e.t.Helper()
	tok, err := hsm.Open(hsm.Config{Library: softhsm.Library, TokenLabel: e.label, PIN: testPIN, PoolSize: 1}, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	defer tok.Close()
	objs, err := tok.ListObjects(context.Background(), "cmk/"+e.b.mountID+"/")
	if err != nil {
		e.t.Fatal(err)
	}
	return objs
}
