package hsm

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/hsm/tokentest"
)

// onCopyingTokens runs fn on a connection with working copies (limit) to every token of the matrix that makes
// them: NSS softokn, whose token objects are decrypted from its database per use. SoftHSM 2.6 refuses to copy the
// engine's keys (they are unmodifiable), as TestWorkingCopyProbeOnEveryToken records. The probe's verdict is made
// "faster" whatever this machine measured, so that what is tested is the copies' behaviour, never a timing.
func onCopyingTokens(t *testing.T, limit int, fn func(t *testing.T, tk tokentest.Token, tok *Token)) {
	t.Helper()
	ran := false
	onEveryTokenUnopened(t, func(t *testing.T, tk tokentest.Token) {
		cfg := configFor(tk, 2)
		cfg.WorkingCopies = limit
		tok, err := Open(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(tok.Close)
		probe, err := tok.WorkingCopies(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if probe.Refused != "" {
			t.Skipf("this token makes no working copies: %s", probe.Refused)
		}
		state := tok.pool.tokenState()
		state.copyProbeMu.Lock()
		state.copyProbe.Speedup = max(state.copyProbe.Speedup, 2*workingCopyMinSpeedup)
		state.copyProbeMu.Unlock()
		ran = true
		fn(t, tk, tok)
	})
	if !ran {
		t.Fatalf("no token of this run (CMK_TOKENS=%q) makes working copies: include nss", os.Getenv("CMK_TOKENS"))
	}
}

// sessionCopies counts, by searching the token, the session objects that are working copies of version id.
func sessionCopies(t *testing.T, tok *Token, id []byte) int {
	t.Helper()
	var n int
	err := tok.do(context.Background(), "test: find copies", func(c pkcs11API, s session) error {
		hs, err := findObjects(c, s.h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false)}, 0)
		n = len(hs)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// encryptTimes encrypts with version id n times and checks each ciphertext decrypts.
func encryptTimes(t *testing.T, tok *Token, id []byte, n int) {
	t.Helper()
	ctx := context.Background()
	for i := 0; i < n; i++ {
		nonce := make([]byte, GCMNonceSize)
		nonce[0] = byte(i)
		pt := []byte(fmt.Sprintf("message %d", i))
		used, sealed, err := tok.EncryptGCM(ctx, id, nonce, []byte("aad"), pt)
		if err != nil {
			t.Fatal(err)
		}
		got, err := tok.DecryptGCM(ctx, id, used, []byte("aad"), sealed)
		if err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("round trip: %q, %v", got, err)
		}
	}
}

// warmUp uses version id until it has its copy, and fails with why unless exactly one is on the token.
func warmUp(t *testing.T, tok *Token, id []byte, why string) {
	t.Helper()
	encryptTimes(t, tok, id, 2)
	settled(t, tok)
	if n := sessionCopies(t, tok, id); n != 1 {
		t.Fatalf("%s: %d copies on the token", why, n)
	}
}

// settled waits until no copy is being made.
func settled(t *testing.T, tok *Token) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		tok.copies.mu.RLock()
		making := tok.copies.making
		tok.copies.mu.RUnlock()
		if !making {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("a working copy is still being made after 20 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func hasCopy(tok *Token, id []byte) bool {
	tok.copies.mu.RLock()
	defer tok.copies.mu.RUnlock()
	return tok.copies.byID[string(id)] != nil
}

// A version used twice gets a working copy: a sensitive, non-extractable session object under its CKA_ID,
// which then serves the version, and whose ciphertexts the token object decrypts.
func TestWorkingCopyServesAHotVersion(t *testing.T) {
	onCopyingTokens(t, 8, func(t *testing.T, tk tokentest.Token, tok *Token) {
		id := newVersion(t, tok, 256)
		if _, _, err := tok.EncryptGCM(context.Background(), id, make([]byte, GCMNonceSize), nil, []byte("first")); err != nil {
			t.Fatal(err)
		}
		settled(t, tok)
		if hasCopy(tok, id) || sessionCopies(t, tok, id) != 0 {
			t.Fatal("a copy was made at the version's first use")
		}
		encryptTimes(t, tok, id, 1) // its second and third uses
		settled(t, tok)
		if !hasCopy(tok, id) || sessionCopies(t, tok, id) != 1 || tok.WorkingCopiesHeld() != 1 {
			t.Fatalf("no copy after the second use: table %v, on the token %d", hasCopy(tok, id), sessionCopies(t, tok, id))
		}
		// The copy serves: a use takes it, and what it seals the token object (a connection without copies) opens.
		wc := tok.copies.acquire(id, session{gen: tok.pool.gen, epoch: tok.pool.epoch.Load()})
		if wc == nil {
			t.Fatal("the copy is not taken for use")
		}
		wc.use.RUnlock()
		before := wc.lastUse.Load()
		nonce := make([]byte, GCMNonceSize)
		used, sealed, err := tok.EncryptGCM(context.Background(), id, nonce, nil, []byte("through the copy"))
		if err != nil {
			t.Fatal(err)
		}
		if wc.lastUse.Load() == before {
			t.Fatal("the encryption did not use the copy")
		}
		plain, err := Open(configFor(tk, 1), nil) // working copies 0: none

		if err != nil {
			t.Fatal(err)
		}
		defer plain.Close()
		if got, err := plain.DecryptGCM(context.Background(), id, used, nil, sealed); err != nil || string(got) != "through the copy" {
			t.Fatalf("the token object does not open what the copy sealed: %q, %v", got, err)
		}
		if plain.WorkingCopiesHeld() != 0 {
			t.Fatal("a connection with working_copies 0 holds copies")
		}
		err = tok.do(context.Background(), "test: read the copy", func(c pkcs11API, s session) error { return checkCopy(c, s, wc.h, id) })
		if err != nil {
			t.Fatal(err)
		}
	})
}

// Barring a version (its disable) destroys its copy before it returns, no use makes one again, and the version's
// token object still serves calls made with an earlier snapshot; allowed again, it gets a copy again.
func TestNoWorkingCopyOutlivesItsVersionsBar(t *testing.T) {
	onCopyingTokens(t, 8, func(t *testing.T, _ tokentest.Token, tok *Token) {
		id := newVersion(t, tok, 256)
		warmUp(t, tok, id, "no copy to bar")
		tok.WorkingCopiesAllowed(id, false)
		if n := sessionCopies(t, tok, id); n != 0 || hasCopy(tok, id) {
			t.Fatalf("%d copies on the token after the bar", n)
		}
		encryptTimes(t, tok, id, 4)
		settled(t, tok)
		if n := sessionCopies(t, tok, id); n != 0 || hasCopy(tok, id) {
			t.Fatalf("a barred version got %d copies", n)
		}
		tok.WorkingCopiesAllowed(id, true)
		warmUp(t, tok, id, "no copy once allowed again")
	})
}

// A bar that comes while the copy is being made still leaves no copy once it returns.
func TestBarDuringACopysMakingLeavesNone(t *testing.T) {
	onCopyingTokens(t, 8, func(t *testing.T, _ tokentest.Token, tok *Token) {
		id := newVersion(t, tok, 256)
		encryptTimes(t, tok, id, 1)
		tok.copies.owner.Lock() // the copy's making waits here, after its second use asked for it
		encryptTimes(t, tok, id, 1)
		done := make(chan struct{})
		go func() { tok.WorkingCopiesAllowed(id, false); close(done) }()
		time.Sleep(50 * time.Millisecond) // let the bar be recorded before the making goes on (either order must hold)
		tok.copies.owner.Unlock()
		<-done
		settled(t, tok)
		if n := sessionCopies(t, tok, id); n != 0 || hasCopy(tok, id) {
			t.Fatalf("%d copies after a bar that raced the making", n)
		}
	})
}

// Destroying a version destroys its copy first; the version's id may be used again by nothing.
func TestDestroyKeysDestroysTheCopy(t *testing.T) {
	onCopyingTokens(t, 8, func(t *testing.T, _ tokentest.Token, tok *Token) {
		id := newVersion(t, tok, 256)
		warmUp(t, tok, id, "no copy")
		if _, err := tok.DestroyKeys(context.Background(), id); err != nil {
			t.Fatal(err)
		}
		if n := sessionCopies(t, tok, id); n != 0 || hasCopy(tok, id) {
			t.Fatalf("%d copies outlive the version's destruction", n)
		}
		if _, _, err := tok.EncryptGCM(context.Background(), id, make([]byte, GCMNonceSize), nil, []byte("x")); err == nil {
			t.Fatal("a destroyed version still encrypts")
		}
	})
}

// Copies are bounded: past the limit, the least recently used goes, from the table and from the token.
func TestWorkingCopiesLeastRecentlyUsedFirstOut(t *testing.T) {
	onCopyingTokens(t, 2, func(t *testing.T, _ tokentest.Token, tok *Token) {
		a, b, c := newVersion(t, tok, 256), newVersion(t, tok, 256), newVersion(t, tok, 256)
		for _, id := range [][]byte{a, b} {
			encryptTimes(t, tok, id, 2)
			settled(t, tok)
		}
		encryptTimes(t, tok, a, 1) // b is now the least recently used
		encryptTimes(t, tok, c, 2)
		settled(t, tok)
		if got := []int{sessionCopies(t, tok, a), sessionCopies(t, tok, b), sessionCopies(t, tok, c)}; got[0] != 1 || got[1] != 0 || got[2] != 1 {
			t.Fatalf("copies of a, b, c on the token: %v (want 1 0 1)", got)
		}
		if tok.WorkingCopiesHeld() != 2 {
			t.Fatalf("%d copies held, limit 2", tok.WorkingCopiesHeld())
		}
	})
}

// Copies die with the connection: a reconnection (the session holding them closes) and Close leave none on the
// token, and after the reconnection a hot version gets a copy again.
func TestWorkingCopiesDieWithTheConnection(t *testing.T) {
	onCopyingTokens(t, 8, func(t *testing.T, tk tokentest.Token, tok *Token) {
		id := newVersion(t, tok, 256)
		warmUp(t, tok, id, "no copy")
		tok.pool.mu.Lock()
		err := tok.pool.reconnectLocked(false)
		tok.pool.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		if n := sessionCopies(t, tok, id); n != 0 || tok.WorkingCopiesHeld() != 0 {
			t.Fatalf("%d copies outlive the connection", n)
		}
		encryptTimes(t, tok, id, 2)
		settled(t, tok)
		if sessionCopies(t, tok, id) != 1 || tok.WorkingCopiesHeld() != 1 {
			t.Fatal("no copy made again after the reconnection")
		}
		other, err := Open(configFor(tk, 1), nil) // keeps the module loaded, to look at the token after tok closes
		if err != nil {
			t.Fatal(err)
		}
		defer other.Close()
		tok.Close()
		if n := sessionCopies(t, other, id); n != 0 {
			t.Fatalf("%d copies outlive Close", n)
		}
	})
}

// Every token of the matrix answers the probe, and the matrix records what it found. SoftHSM 2.6 refuses to copy
// the engine's keys into session objects (they are made unmodifiable, and its C_CopyObject changes nothing of an
// unmodifiable object, CKA_TOKEN included): there, uses make no copy and go on serving from the token objects.
func TestWorkingCopyProbeOnEveryToken(t *testing.T) {
	onEveryTokenUnopened(t, func(t *testing.T, tk tokentest.Token) {
		cfg := configFor(tk, 2)
		cfg.WorkingCopies = 8
		tok, err := Open(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tok.Close()
		p, err := tok.WorkingCopies(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case p.Refused != "":
			record(tk.Kind, "working copies (C_CopyObject session objects)", "no: "+p.Refused)
		default:
			verdict := "not used: no faster"
			if p.Faster() {
				verdict = "used"
			}
			record(tk.Kind, "working copies (C_CopyObject session objects)", fmt.Sprintf("%s (measured %.1f× the token object)", verdict, p.Speedup))
		}
		if p.Refused == "" && p.Speedup <= 0 {
			t.Fatalf("measured nothing: %+v", p)
		}
		if tk.Kind != tokentest.SoftHSM {
			return
		}
		if p.Refused == "" {
			t.Fatalf("SoftHSM 2.6 was expected to refuse copying an unmodifiable key; it measured %+v", p)
		}
		id := newVersion(t, tok, 256)
		encryptTimes(t, tok, id, 4)
		settled(t, tok)
		if n := sessionCopies(t, tok, id); n != 0 || tok.WorkingCopiesHeld() != 0 || !tok.copies.off.Load() {
			t.Fatalf("a token that refuses copies has %d (held %d, off %v)", n, tok.WorkingCopiesHeld(), tok.copies.off.Load())
		}
	})
}

// A version destroyed while calls keep using it (a destruction without grace, a deletion) keeps no copy: none
// survives the destruction, and none is made from it afterwards.
func TestNoCopySurvivesADestructionUnderLoad(t *testing.T) {
	onCopyingTokens(t, 8, func(t *testing.T, _ tokentest.Token, tok *Token) {
		for round := 0; round < 5; round++ {
			id := newVersion(t, tok, 256)
			encryptTimes(t, tok, id, 2)
			settled(t, tok)
			stop := make(chan struct{})
			done := make(chan struct{})
			for i := 0; i < 4; i++ {
				go func() {
					defer func() { done <- struct{}{} }()
					for {
						select {
						case <-stop:
							return
						default:
						}
						_, _, _ = tok.EncryptGCM(context.Background(), id, make([]byte, GCMNonceSize), nil, []byte("x"))
					}
				}()
			}
			time.Sleep(10 * time.Millisecond)
			if _, err := tok.DestroyKeys(context.Background(), id); err != nil {
				t.Fatal(err)
			}
			if n := sessionCopies(t, tok, id); n != 0 {
				t.Fatalf("round %d: %d copies right after the destruction", round, n)
			}
			time.Sleep(10 * time.Millisecond)
			close(stop)
			for i := 0; i < 4; i++ {
				<-done
			}
			settled(t, tok)
			if n := sessionCopies(t, tok, id); n != 0 || hasCopy(tok, id) {
				t.Fatalf("round %d: %d copies after the destruction", round, n)
			}
		}
	})
}
