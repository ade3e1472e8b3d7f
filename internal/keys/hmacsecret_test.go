package keys

import (
	"bytes"
	"context"
	"crypto"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm"
	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// Real tokens for the tests of the model that depend on what a token can prove: SoftHSM, which marks the keys it
// generates CKA_LOCAL, and NSS softokn, which marks none. Made on first use (most of this package's tests need
// none), in a directory of the run's own, and stopped by TestMain.
var realTokens struct {
	once      sync.Once
	dir       string
	providers map[tokentest.Kind]*tokentest.Provider
	err       error
}

func TestMain(m *testing.M) {
	code := m.Run()
	for _, p := range realTokens.providers {
		p.Close()
	}
	if realTokens.dir != "" {
		os.RemoveAll(realTokens.dir)
	}
	os.Exit(code)
}

// onProvingAndUnprovingTokens runs fn on a SoftHSM token and on NSS softokn (those of CMK_TOKENS), each opened for
// the engine as a mount's token is.
func onProvingAndUnprovingTokens(t *testing.T, fn func(t *testing.T, kind tokentest.Kind, tok *hsm.Token)) {
	t.Helper()
	realTokens.once.Do(func() {
		realTokens.providers = map[tokentest.Kind]*tokentest.Provider{}
		if realTokens.dir, realTokens.err = os.MkdirTemp("", "cmk-keys-test-"); realTokens.err != nil {
			return
		}
		for _, kind := range tokentest.Selected() {
			if kind != tokentest.SoftHSM && kind != tokentest.NSS {
				continue
			}
			p, err := tokentest.Setup(kind, filepath.Join(realTokens.dir, string(kind)))
			if err != nil {
				realTokens.err = err
				return
			}
			realTokens.providers[kind] = p
		}
	})
	if realTokens.err != nil {
		t.Fatal(realTokens.err)
	}
	for _, kind := range []tokentest.Kind{tokentest.SoftHSM, tokentest.NSS} {
		p := realTokens.providers[kind]
		if p == nil {
			continue
		}
		t.Run(string(kind), func(t *testing.T) {
			tk, err := p.Token("keys-test")
			if err != nil {
				t.Fatal(err)
			}
			tok, err := hsm.Open(hsm.Config{Library: tk.Library, InitParams: tk.InitParams, TokenLabel: tk.Label, PIN: tk.PIN, PoolSize: 2,
				Mount: "keys-test"}, hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: testOutput{t}}))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(tok.Close)
			fn(t, kind, tok)
		})
	}
}

type testOutput struct{ t *testing.T }

func (w testOutput) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// failingPut fails, without storing anything, the next write of a storage key with the prefix while armed: the
// plugin died, or storage went away, before the write.
type failingPut struct {
	logical.Storage
	mu     sync.Mutex
	prefix string
	// before, when set, runs instead of failing: a snapshot taken at that moment, while the change is under way.
	before func()
}

func (s *failingPut) arm(prefix string, before func()) {
	s.mu.Lock()
	s.prefix, s.before = prefix, before
	s.mu.Unlock()
}

func (s *failingPut) Put(ctx context.Context, e *logical.StorageEntry) error {
	s.mu.Lock()
	hit := s.prefix != "" && strings.HasPrefix(e.Key, s.prefix)
	before := s.before
	if hit {
		s.prefix, s.before = "", nil
	}
	s.mu.Unlock()
	switch {
	case hit && before != nil:
		before()
	case hit:
		return errors.New("storage unavailable")
	}
	return s.Storage.Put(ctx, e)
}

// hmacWith computes an HMAC with version n of key name as the hmac path does: the version's secret is made (or
// found) first, under the key's lock, when storage does not record it yet.
func hmacWith(m *Manager, s logical.Storage, tok *hsm.Token, name string, n int, requestID string) ([]byte, error) {
	ctx := context.Background()
	k, err := m.Get(ctx, s, name)
	if err != nil {
		return nil, err
	}
	if k.Versions[n].HMACDeferred {
		if k, err = m.Update(ctx, s, name, Actor{DisplayName: "test", RequestID: requestID}, func(tx *Tx) error { return tx.EnsureHMACSecret(n, true) }); err != nil {
			return nil, err
		}
	}
	return tok.HMAC(ctx, k.Versions[n].ID(), crypto.SHA256, []byte("data"))
}

// Issue 19 item 5, the review's defect: the engine's own HMAC secret, made by a version's first HMAC that storage
// never came to record (the key write failed; or storage was restored from a snapshot taken while that HMAC was
// under way, and the WAL rollback ran), was found by the next HMAC and refused where the token cannot prove it
// generated it (NSS): unusable for good, and removing it as advised destroyed the only key that verifies the
// HMACs issued with it. The engine's record, written before it makes the secret, vouches for it now: the next
// HMAC takes it and gives the same HMAC as before, on every token; the rollback never destroys it. A secret
// with no record stays refused where nothing proves it (TestPlantedHMACSecretIsRefused, and the end of this test).
func TestOwnHMACSecretSurvivesAnUnrecordedFirstUse(t *testing.T) {
	onProvingAndUnprovingTokens(t, func(t *testing.T, kind tokentest.Kind, tok *hsm.Token) {
		ctx := context.Background()
		mount := fmt.Sprintf("hmac-%s-%d", kind, os.Getpid())
		managerOn := func(s logical.Storage) *Manager {
			return NewManager(hclog.NewNullLogger(), mount, func(context.Context, logical.Storage) (HSM, *Nonces, error) { return tok, nil, nil })
		}
		newKey := func(t *testing.T, m *Manager, s logical.Storage, name string) *Key {
			k, _, err := m.Create(ctx, s, &Key{Name: name, Type: TypeAES256GCM96, DeletionAllowed: true}, who, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _, _ = tok.DestroyKeys(context.Background(), k.Versions[1].ID()) })
			return k
		}

		t.Run("key-write-failed", func(t *testing.T) {
			s := &failingPut{Storage: &logical.InmemStorage{}}
			m := managerOn(s)
			newKey(t, m, s, "failed")
			s.arm(VersionsPrefix+"failed/", nil)
			if _, err := hmacWith(m, s, tok, "failed", 1, "req-hmac-1"); err == nil {
				t.Fatal("the failed key write was not reported")
			}
			k, _ := m.Get(ctx, s, "failed")
			if !k.Versions[1].HMACDeferred {
				t.Fatal("storage records a secret whose write failed")
			}
			// The secret was made: HMACs under it may have gone out meanwhile (another node, a retry that
			// computed before failing); here, one computed with it directly.
			before, err := tok.HMAC(ctx, k.Versions[1].ID(), crypto.SHA256, []byte("data"))
			if err != nil {
				t.Fatalf("the first HMAC made no secret: %v", err)
			}
			got, err := hmacWith(m, s, tok, "failed", 1, "req-hmac-2")
			if err != nil {
				t.Fatalf("the next HMAC with the engine's own secret on %s: %v", kind, err)
			}
			if !bytes.Equal(got, before) {
				t.Fatal("the next HMAC used another secret")
			}
			if k, _ := m.Get(ctx, s, "failed"); k.Versions[1].HMACDeferred {
				t.Fatal("storage does not record the secret after the HMAC that took it")
			}
			if records, _ := versionWALs(ctx, s); len(records) != 0 {
				t.Fatalf("records left once storage records the secret: %+v", records)
			}
		})

		t.Run("storage-restored", func(t *testing.T) {
			s := &failingPut{Storage: &logical.InmemStorage{}}
			m := managerOn(s)
			newKey(t, m, s, "restored")
			var snap *logical.InmemStorage
			s.arm(VersionsPrefix+"restored/", func() { snap = snapshot(t, s.Storage) })
			issued, err := hmacWith(m, s, tok, "restored", 1, "req-hmac-1")
			if err != nil || snap == nil {
				t.Fatalf("first HMAC: %v (snapshot taken: %v)", err, snap != nil)
			}

			// The node restored from the snapshot taken while that first HMAC was under way: the version has no
			// secret in storage, the WAL entry of the HMAC is there, and its rollback runs before the next HMAC.
			m2 := managerOn(snap)
			entries, err := framework.ListWAL(ctx, snap)
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range entries { // as Vault does, then deletes each entry whose rollback returned
				w, err := framework.GetWAL(ctx, snap, id)
				if err != nil || w == nil {
					t.Fatal(err)
				}
				if err := m2.RollbackVersion(ctx, snap, w.Data); err != nil {
					t.Fatal(err)
				}
				if err := framework.DeleteWAL(ctx, snap, id); err != nil {
					t.Fatal(err)
				}
			}
			r, err := m2.Reconcile(ctx, snap, "restored", false, false, who)
			if err != nil || len(r.Untrusted) != 0 {
				t.Fatalf("reconcile after the restore reports the engine's own secret as untrusted: %+v %v", r, err)
			}
			got, err := hmacWith(m2, snap, tok, "restored", 1, "req-hmac-2")
			if err != nil {
				t.Fatalf("the next HMAC after the restore on %s: %v", kind, err)
			}
			if !bytes.Equal(got, issued) {
				t.Fatal("an HMAC issued before the restore no longer verifies")
			}
			if records, _ := versionWALs(ctx, snap); len(records) != 0 {
				t.Fatalf("records left once storage records the secret: %+v", records)
			}
		})

		// The planting defence holds: a secret the engine has no record of, left on the token, is taken only where
		// the token proves it generated it (SoftHSM), never on NSS.
		t.Run("no-record", func(t *testing.T) {
			s := &failingPut{Storage: &logical.InmemStorage{}}
			m := managerOn(s)
			k := newKey(t, m, s, "unrecorded")
			if err := tok.EnsureHMACKey(ctx, k.Versions[1].ID(), k.Versions[1].Label, k.HMACKeyBytes(), false); err != nil {
				t.Fatal(err)
			}
			_, err := hmacWith(m, s, tok, "unrecorded", 1, "req-hmac-1")
			if proven := kind != tokentest.NSS; proven && err != nil || !proven && !errors.Is(err, hsm.ErrUntrustedObject) {
				t.Fatalf("a secret with no record on %s: %v", kind, err)
			}
		})
	})
}
