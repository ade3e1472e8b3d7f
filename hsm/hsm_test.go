package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/pkcs11"
)

// newToken creates a fresh token for one test and opens it, with the options given.
func newToken(t testing.TB, poolSize int, opts ...func(*Config)) (*Token, Config) {
	t.Helper()
	label := fmt.Sprintf("hsm-test-%d", tokenCount.Add(1))
	if err := env.CreateToken(label, testPIN); err != nil {
		t.Fatal(err)
	}
	cfg := Config{Library: env.Library, TokenLabel: label, PIN: testPIN, PoolSize: poolSize, Mount: t.Name()}
	for _, o := range opts {
		o(&cfg)
	}
	tok, err := Open(cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatalf("open %s: %v", label, err)
	}
	t.Cleanup(tok.Close)
	return tok, cfg
}

func randomID(t *testing.T) []byte {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		t.Fatal(err)
	}
	return id
}

func newVersion(t *testing.T, tok *Token, bits int) []byte {
	t.Helper()
	id := randomID(t)
	alg := map[int]Algorithm{128: AES128, 256: AES256}[bits]
	if _, err := tok.GenerateVersion(context.Background(), alg, id, "cmk/test/key/v1", HMACKeySize); err != nil {
		t.Fatal(err)
	}
	return id
}

func TestEncryptDecryptRoundTrip(t *testing.T) {
	tok, _ := newToken(t, 2)
	ctx := context.Background()
	for _, bits := range []int{128, 256} {
		id := newVersion(t, tok, bits)
		cases := []struct {
			name           string
			plaintext, aad []byte
		}{
			{"plain", []byte("the quick brown fox"), nil},
			{"empty plaintext", []byte{}, nil},
			{"with aad", []byte("payload"), []byte("context")},
			{"large", bytes.Repeat([]byte{7}, 1<<20), nil},
		}
		for _, c := range cases {
			t.Run(fmt.Sprintf("aes%d/%s", bits, c.name), func(t *testing.T) {
				nonce, err := tok.GenerateRandom(ctx, GCMNonceSize)
				if err != nil {
					t.Fatal(err)
				}
				used, sealed, err := tok.EncryptGCM(ctx, id, nonce, c.aad, c.plaintext)
				if err != nil {
					t.Fatal(err)
				}
				if len(sealed) != len(c.plaintext)+GCMTagSize {
					t.Fatalf("sealed length %d, want %d", len(sealed), len(c.plaintext)+GCMTagSize)
				}
				got, err := tok.DecryptGCM(ctx, id, used, c.aad, sealed)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, c.plaintext) {
					t.Fatal("plaintext differs after round trip")
				}
				// Any change to ciphertext, tag, nonce or associated data is refused as such.
				tampered := append([]byte{}, sealed...)
				tampered[len(tampered)-1] ^= 1
				if _, err := tok.DecryptGCM(ctx, id, used, c.aad, tampered); !errors.Is(err, ErrInvalidCiphertext) {
					t.Fatalf("tampered tag: got %v, want ErrInvalidCiphertext", err)
				}
				if _, err := tok.DecryptGCM(ctx, id, used, []byte("other"), sealed); !errors.Is(err, ErrInvalidCiphertext) {
					t.Fatalf("wrong aad: got %v, want ErrInvalidCiphertext", err)
				}
				if _, err := tok.DecryptGCM(ctx, id, used, c.aad, sealed[:GCMTagSize-1]); !errors.Is(err, ErrInvalidCiphertext) {
					t.Fatalf("truncated: got %v, want ErrInvalidCiphertext", err)
				}
			})
		}
	}
}

func TestForeignKeyCannotDecrypt(t *testing.T) {
	tok, _ := newToken(t, 1)
	ctx := context.Background()
	a, b := newVersion(t, tok, 256), newVersion(t, tok, 256)
	nonce := make([]byte, GCMNonceSize)
	_, sealed, err := tok.EncryptGCM(ctx, a, nonce, nil, []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tok.DecryptGCM(ctx, b, nonce, nil, sealed); !errors.Is(err, ErrInvalidCiphertext) {
		t.Fatalf("got %v, want ErrInvalidCiphertext", err)
	}
}

// TestKeyObjectsAreProtected reads every object on the token and checks what DESIGN.md requires of key
// material: token objects, sensitive, never extractable, no usage beyond their purpose, value unreadable.
func TestKeyObjectsAreProtected(t *testing.T) {
	tok, _ := newToken(t, 1)
	ctx := context.Background()
	newVersion(t, tok, 128)
	newVersion(t, tok, 256)
	objs, err := tok.ListObjects(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 4 {
		t.Fatalf("%d objects on the token, want 4 (2 versions × AES + HMAC)", len(objs))
	}
	for _, o := range objs {
		if o.Class != "secret_key" || !o.Token || !o.Private || !o.Sensitive || !o.AlwaysSensitive ||
			o.Extractable || !o.NeverExtractable || o.Modifiable {
			t.Errorf("object %q is not protected as required: %+v", o.Label, o)
		}
		want := "encrypt,decrypt"
		if strings.HasSuffix(o.Label, "/hmac") {
			want = "sign,verify"
			if o.KeyType != "generic_secret" {
				t.Errorf("%q: key type %s", o.Label, o.KeyType)
			}
		} else if o.KeyType != "aes" {
			t.Errorf("%q: key type %s", o.Label, o.KeyType)
		}
		if got := strings.Join(o.Usage, ","); got != want {
			t.Errorf("%q: usage %s, want %s", o.Label, got, want)
		}
	}
	// The value itself must be refused by the token.
	err = tok.do(ctx, "read value", func(p pkcs11API, s session) error {
		hs, err := findObjects(p, s.h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}, 0)
		if err != nil {
			return err
		}
		for _, h := range hs {
			if v, err := p.GetAttributeValue(s.h, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)}); err == nil {
				return fmt.Errorf("CKA_VALUE readable (%d bytes)", len(v[0].Value))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestDestroyIsRepeatable(t *testing.T) {
	tok, _ := newToken(t, 1)
	ctx := context.Background()
	id := newVersion(t, tok, 256)
	objs, _ := tok.ListObjects(ctx, "")
	if len(objs) != 2 {
		t.Fatalf("%d objects after a generation, want 2", len(objs))
	}
	n, err := tok.DestroyKeys(ctx, id)
	if err != nil || n != 2 {
		t.Fatalf("destroy: %d, %v", n, err)
	}
	if _, _, err := tok.EncryptGCM(ctx, id, make([]byte, 12), nil, []byte("x")); !errors.Is(err, ErrObjectNotFound) {
		t.Fatalf("encrypt after destroy: %v, want ErrObjectNotFound", err)
	}
	if n, err := tok.DestroyKeys(ctx, id); err != nil || n != 0 {
		t.Fatalf("second destroy: %d, %v", n, err)
	}
}

func TestOpenRefusesWrongPINAndUnknownToken(t *testing.T) {
	_, cfg := newToken(t, 1)
	bad := cfg
	bad.PIN = "wrong-pin-9876"
	_, err := Open(bad, nil)
	if !errors.Is(err, ErrPINIncorrect) {
		t.Fatalf("wrong PIN on a token another Token is logged into: %v", err)
	}
	if strings.Contains(err.Error(), bad.PIN) || strings.Contains(err.Error(), testPIN) {
		t.Fatalf("error carries a PIN: %v", err)
	}
	// A token nobody in the process is logged into yet.
	label := "hsm-test-fresh-pin"
	if err := env.CreateToken(label, testPIN); err != nil {
		t.Fatal(err)
	}
	_, err = Open(Config{Library: env.Library, TokenLabel: label, PIN: "nope", PoolSize: 1}, nil)
	if !errors.Is(err, ErrPINIncorrect) {
		t.Fatalf("wrong PIN: %v", err)
	}
	_, err = Open(Config{Library: env.Library, TokenLabel: "no-such-token", PIN: testPIN, PoolSize: 1}, nil)
	if !errors.Is(err, ErrTokenNotFound) {
		t.Fatalf("unknown label: %v", err)
	}
}

// Two users of one token in the process (two mounts) share the module and the login; closing one leaves the
// other working, with its cached handles.
func TestTwoTokensShareModule(t *testing.T) {
	a, cfg := newToken(t, 1)
	b, err := Open(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	id := newVersion(t, a, 256)
	nonce := make([]byte, 12)
	if _, _, err := b.EncryptGCM(ctx, id, nonce, nil, []byte("x")); err != nil {
		t.Fatal(err)
	}
	b.Close()
	if _, _, err := a.EncryptGCM(ctx, id, nonce, nil, []byte("x")); err != nil {
		t.Fatalf("after the other user closed: %v", err)
	}
}

func TestRecoversFromClosedSession(t *testing.T) {
	tok, _ := newToken(t, 1)
	ctx := context.Background()
	id := newVersion(t, tok, 256)
	// Close the pooled session behind the pool's back.
	tok.pool.mu.Lock()
	if len(tok.pool.idle) != 1 {
		tok.pool.mu.Unlock()
		t.Fatalf("%d idle sessions, want 1", len(tok.pool.idle))
	}
	_ = tok.mod.ctx.CloseSession(tok.pool.idle[0].h)
	tok.pool.mu.Unlock()
	if _, _, err := tok.EncryptGCM(ctx, id, make([]byte, 12), nil, []byte("x")); err != nil {
		t.Fatalf("after a closed session: %v", err)
	}
}

// C_Finalize behind the token's back is what a lost device looks like to the library's users: every call
// fails with CKR_CRYPTOKI_NOT_INITIALIZED until someone initialises again.
func TestRecoversFromModuleLoss(t *testing.T) {
	tok, _ := newToken(t, 1)
	ctx := context.Background()
	id := newVersion(t, tok, 256)
	tok.mod.mu.Lock()
	_ = tok.mod.ctx.Finalize()
	tok.mod.mu.Unlock()
	if _, _, err := tok.EncryptGCM(ctx, id, make([]byte, 12), nil, []byte("x")); err != nil {
		t.Fatalf("after module loss: %v", err)
	}
	if ok, _ := tok.Status(); !ok {
		t.Fatal("status not connected after recovery")
	}
}

// SoftHSM lists only the tokens that existed at C_Initialize. A token created later is found by re-initialising
// the module, which makes every other user of it reconnect. Issue 19 (6): a configuration naming a token that does
// not exist never re-initialises a module other mounts use (each one did, every 30 s, and logged every mount out);
// a fresh copy of the library, in a child process, says first whether the token exists.
func TestTokenCreatedAfterInitialize(t *testing.T) {
	other, _ := newToken(t, 1) // the module is initialised, and another mount uses it
	id := newVersion(t, other, 256)
	label := "hsm-test-late"
	if err := env.CreateToken(label, testPIN); err != nil {
		t.Fatal(err)
	}
	other.mod.tokensMu.Lock()
	other.mod.findByReinitAfter = time.Time{} // the module outlives tests: forget earlier tests' lookups
	other.mod.tokensMu.Unlock()
	gen := other.mod.generation.Load()
	tok, err := Open(Config{Library: env.Library, TokenLabel: label, PIN: testPIN, PoolSize: 1}, nil)
	if err != nil {
		t.Fatalf("token created after C_Initialize: %v", err)
	}
	tok.Close()
	if other.mod.generation.Load() != gen+1 {
		t.Fatalf("generation %d, want one re-initialisation after %d", other.mod.generation.Load(), gen)
	}
	// Unknown labels, one after another: no re-initialisation, and the other mount is undisturbed.
	gen = other.mod.generation.Load()
	for i := 0; i < 5; i++ {
		_, err := Open(Config{Library: env.Library, TokenLabel: fmt.Sprintf("no-such-token-%d", i), PIN: testPIN, PoolSize: 1}, nil)
		if !errors.Is(err, ErrTokenNotFound) {
			t.Fatalf("unknown label: %v", err)
		}
		if _, _, err := other.EncryptGCM(context.Background(), id, make([]byte, 12), nil, []byte("x")); err != nil {
			t.Fatalf("the other mount during unknown-label lookups: %v", err)
		}
	}
	if n := other.mod.generation.Load() - gen; n != 0 {
		t.Fatalf("%d re-initialisations under another mount for 5 configurations naming absent tokens", n)
	}
}

func TestConcurrentUse(t *testing.T) {
	tok, _ := newToken(t, 4)
	ctx := context.Background()
	ids := [][]byte{newVersion(t, tok, 256), newVersion(t, tok, 128)}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				id := ids[(g+i)%2]
				msg := []byte(fmt.Sprintf("%d-%d", g, i))
				nonce, err := tok.GenerateRandom(ctx, 12)
				if err != nil {
					errs <- err
					return
				}
				used, sealed, err := tok.EncryptGCM(ctx, id, nonce, nil, msg)
				if err != nil {
					errs <- err
					return
				}
				got, err := tok.DecryptGCM(ctx, id, used, nil, sealed)
				if err != nil || !bytes.Equal(got, msg) {
					errs <- fmt.Errorf("round trip %d-%d: %v", g, i, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestCapabilities(t *testing.T) {
	tok, _ := newToken(t, 1)
	caps, err := tok.Capabilities(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, alg := range []Algorithm{AES256, HMACOnly, RSA2048, ECDSAP256} {
		if ok, missing := caps.Serves(alg); !ok {
			t.Errorf("SoftHSM cannot serve %s: lacks %v", alg, missing)
		}
	}
	if !strings.Contains(strings.Join(caps.MechanismNames(), " "), "CKM_AES_GCM") {
		t.Fatalf("offered: %v", caps.MechanismNames())
	}
	if !caps.AllowedMechanisms || caps.OAEPSHA256 || caps.KeyWrap != MechAESKeyWrapPad {
		t.Fatalf("SoftHSM 2.6 probed as %+v", caps)
	}
	if info := tok.Info(); info.ManufacturerID == "" || info.Label == "" {
		t.Fatalf("token info: %+v", info)
	}
}
