package tests

import (
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vault-plugin-secrets-cmk/vault-plugin-secrets-cmk/internal/vaulttest"
)

// TestKillDashNine kills the plugin process (SIGKILL) three times during concurrent rotations and batch
// encryptions. Vault restarts it. Afterwards every ciphertext a client received decrypts, the key's versions are
// contiguous, and once Vault's WAL rollback has run the token holds exactly the objects storage references.
func TestKillDashNine(t *testing.T) {
	t.Parallel()
	srv, err := vaulttest.StartDev(filepath.Join(t.TempDir(), "crash"), vaultBin, pluginBin, softhsm)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	m := newMount(t, srv)
	c := srv.Client
	mustWrite(t, c, m.Path+"/keys/k", nil)

	var mu sync.Mutex
	issued := map[string]string{} // ciphertext → plaintext, for every encryption a client got back
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			cl, _ := c.Clone()
			cl.SetToken(srv.RootToken)
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				in := make([]interface{}, 50)
				for i := range in {
					in[i] = map[string]interface{}{"plaintext": b64(fmt.Sprintf("w%d-%d-%d", w, n, i))}
				}
				s, err := cl.Logical().Write(m.Path+"/encrypt/k", map[string]interface{}{"batch_input": in})
				if err != nil {
					continue // the plugin died under this request: nothing was returned to the client
				}
				mu.Lock()
				for i, r := range s.Data["batch_results"].([]interface{}) {
					item := r.(map[string]interface{})
					if ct, ok := item["ciphertext"].(string); ok && ct != "" {
						issued[ct] = fmt.Sprintf("w%d-%d-%d", w, n, i)
					}
				}
				mu.Unlock()
			}
		}(w)
	}
	wg.Add(1)
	rotations := 0
	go func() {
		defer wg.Done()
		cl, _ := c.Clone()
		cl.SetToken(srv.RootToken)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := cl.Logical().Write(m.Path+"/keys/k/rotate", nil); err == nil {
				rotations++
			}
		}
	}()

	kills := 0
	for kills < 3 {
		time.Sleep(700 * time.Millisecond)
		for _, pid := range srv.PluginPIDs() {
			if syscall.Kill(pid, syscall.SIGKILL) == nil {
				kills++
			}
		}
	}
	time.Sleep(time.Second) // let the workers run on the restarted plugin
	close(stop)
	wg.Wait()
	t.Logf("%d plugin kills, %d rotations answered, %d ciphertexts issued", kills, rotations, len(issued))
	if len(issued) == 0 {
		t.Fatal("no encryption succeeded")
	}

	// Every ciphertext a client received decrypts.
	var batch []interface{}
	var want []string
	for ct, pt := range issued {
		batch = append(batch, map[string]interface{}{"ciphertext": ct})
		want = append(want, pt)
	}
	for start := 0; start < len(batch); start += 1000 {
		end := min(start+1000, len(batch))
		s := mustWrite(t, c, m.Path+"/decrypt/k", map[string]interface{}{"batch_input": batch[start:end]})
		for i, r := range s.Data["batch_results"].([]interface{}) {
			item := r.(map[string]interface{})
			if item["plaintext"] != b64(want[start+i]) {
				t.Fatalf("ciphertext %d lost after the crashes: %v", start+i, item)
			}
		}
	}

	// Versions are contiguous: 1 … latest, each with its objects.
	k, err := c.Logical().Read(m.Path + "/keys/k")
	if err != nil {
		t.Fatal(err)
	}
	latest := int(mustNumber(t, k.Data["latest_version"]))
	versions := k.Data["versions"].(map[string]interface{})
	if len(versions) != latest {
		t.Fatalf("%d versions for latest_version %d", len(versions), latest)
	}
	for v := 1; v <= latest; v++ {
		if versions[fmt.Sprint(v)] == nil {
			t.Fatalf("version %d missing", v)
		}
	}

	// The WAL rollback (entries older than 2 minutes, about once a minute) removes objects storage never
	// referenced; until then they may exist. Nothing referenced is ever missing.
	// This mount's objects: labels start with cmk/<mount uuid>/ (other mounts may share the token).
	v1 := versions["1"].(map[string]interface{})["label"].(string)
	prefix := v1[:strings.Index(v1[len("cmk/"):], "/")+len("cmk/")+1]
	referenced := latest // one object per version: nothing here computes an HMAC, whose secret would be a second
	start, orphans := time.Now(), 0
	deadline := start.Add(5 * time.Minute)
	for {
		onToken := objectsLabelled2(t, m, prefix)
		if onToken < referenced {
			t.Fatalf("%d objects on the token, storage references %d: a referenced object is gone", onToken, referenced)
		}
		orphans = max(orphans, onToken-referenced)
		if onToken == referenced {
			t.Logf("token and storage agree: %d objects for %d versions; %d orphan objects from interrupted rotations were removed by the WAL rollback after %s",
				onToken, latest, orphans, time.Since(start).Round(time.Second))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d objects on the token, storage references %d, 5 minutes after the crashes", onToken, referenced)
		}
		time.Sleep(5 * time.Second)
	}
}

// objectsLabelled2 counts m's key objects whose label starts with prefix, as the token reports them: usage
// witnesses (hsm/witness.go, one per version that encrypted) hold no key material and are left out, as is the
// mount's audit key (cmk/<mount>/audit_key:vN), which signs history heads and is no version of a key.
func objectsLabelled2(t *testing.T, m mount, prefix string) int {
	t.Helper()
	return countObjects(t, m, func(label string) bool {
		return strings.HasPrefix(label, prefix) && !strings.Contains(label, "/uses/") && !strings.Contains(label, "/audit_key:")
	})
}

func mustNumber(t *testing.T, v interface{}) float64 {
	t.Helper()
	var f float64
	if _, err := fmt.Sscan(fmt.Sprint(v), &f); err != nil {
		t.Fatalf("not a number: %v", v)
	}
	return f
}
