package tests

import (
	"fmt"
	"math/rand"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSnapshotRestoreDrill is the recovery drill of the README's backup and recovery section, on Vault with
// integrated storage (one node, and a three-node cluster) and the engine on a SoftHSM token: snapshot, rotate (to
// another algorithm) and encrypt and sign, restore the snapshot. Every ciphertext and signature issued before and after the snapshot
// decrypts or verifies, versions stay contiguous, no version number is used twice, and the token holds no label
// twice (read with pkcs11-tool, from outside Vault); the versions adopted keep the types they were made with.
func TestSnapshotRestoreDrill(t *testing.T) {
	for _, n := range []int{1, 3} {
		t.Run(fmt.Sprintf("%d nodes", n), func(t *testing.T) {
			t.Parallel()
			restoreDrill(t, n)
		})
	}
}

func restoreDrill(t *testing.T, n int) {
	nodes, c := startCluster(t, n)
	active := activeNode(t, nodes, nil)
	cl := active.client
	anyNode := func() *clusterNode { return nodes[rand.Intn(len(nodes))] } // standbys forward to the active node
	mustWrite(t, cl, "cmk/keys/k", map[string]interface{}{"type": "aes128-gcm96"})
	mustWrite(t, cl, "cmk/keys/s", map[string]interface{}{"type": "ecdsa-p256"})

	issued := map[string]string{}     // ciphertext → plaintext
	signatures := map[string]string{} // signature → message
	issue := func(tag string) {
		for i := 0; i < 5; i++ {
			pt := fmt.Sprintf("%s %d", tag, i)
			issued[encrypt(t, anyNode().client, mount{Path: "cmk"}, "k", pt)] = pt
		}
		sig := mustWrite(t, anyNode().client, "cmk/sign/s", map[string]interface{}{"input": b64(tag)}).Data["signature"].(string)
		signatures[sig] = tag
	}
	issue("before the snapshot")
	// A key with a small usage limit: the encryptions made after the snapshot must still count after the restore.
	const limit, used = 100, 99 // reserved 16 at a time: the snapshot holds a reservation of 16
	mustWrite(t, cl, "cmk/keys/budget", map[string]interface{}{"max_encryptions_per_version": limit})
	encrypt(t, cl, mount{Path: "cmk"}, "budget", "before the snapshot")
	snap := filepath.Join(t.TempDir(), "drill.snap")
	c.vault(t, active.addr, "operator", "raft", "snapshot", "save", snap)

	for i := 1; i < used; i++ {
		encrypt(t, anyNode().client, mount{Path: "cmk"}, "budget", "after the snapshot")
	}
	// A key born after the snapshot, by an application's upsert: the restore forgets it, its material stays.
	born := encrypt(t, anyNode().client, mount{Path: "cmk"}, "born", "a key born after the snapshot")

	// After the snapshot both keys change algorithm: the restore must adopt versions of the new types as they are.
	mustWrite(t, cl, "cmk/keys/k/rotate", map[string]interface{}{"type": "aes256-gcm96"})
	mustWrite(t, cl, "cmk/keys/s/rotate", map[string]interface{}{"type": "ed25519"})
	issue("after the snapshot, v2")
	mustWrite(t, cl, "cmk/keys/k/rotate", nil)
	issue("after the snapshot, v3")

	c.vault(t, active.addr, "operator", "raft", "snapshot", "restore", "-force", snap)
	active = activeNode(t, nodes, nil)
	cl = active.client
	// The restored storage is what the engine serves: the key is as it was at the snapshot.
	deadline := time.Now().Add(time.Minute)
	for {
		k, err := cl.Logical().Read("cmk/keys/k")
		if err == nil && k != nil && mustNumber(t, k.Data["latest_version"]) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the restored key is not served within a minute: %v %v", k, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	report := mustWrite(t, cl, "cmk/reconcile", nil).Data
	t.Logf("reconcile after the restore: %d unreferenced objects, %d missing", len(report["unreferenced_objects"].([]interface{})),
		len(report["missing_objects"].([]interface{})))

	for ct, pt := range issued {
		if got := decrypt(t, anyNode().client, mount{Path: "cmk"}, "k", ct); got != pt {
			t.Fatalf("%s decrypts to %q, want %q", ct, got, pt)
		}
	}
	for sig, msg := range signatures {
		v := mustWrite(t, anyNode().client, "cmk/verify/s", map[string]interface{}{"input": b64(msg), "signature": sig})
		if v.Data["valid"] != true {
			t.Fatalf("signature %s of %q does not verify after the restore", sig, msg)
		}
	}
	// No version gets its budget back (issue 19, finding 2): version 1 of budget made 9 of its 10 encryptions.
	v1 := 0
	for i := 0; i < limit; i++ {
		if strings.HasPrefix(encrypt(t, anyNode().client, mount{Path: "cmk"}, "budget", "after the restore"), "vault:v1:") {
			v1++
		}
	}
	if v1 > limit-used {
		t.Fatalf("after the restore version 1 of budget made %d more encryptions; it had made %d of its %d", v1, used, limit)
	}
	// The key born after the snapshot, made again by the application's next upsert, adopts its material (issue 19,
	// finding 1): what it encrypted decrypts.
	if ct := encrypt(t, anyNode().client, mount{Path: "cmk"}, "born", "after the restore"); !strings.HasPrefix(ct, "vault:v2:") {
		t.Fatalf("the key made again encrypts with %.9s, not a version of its own", ct)
	}
	if got := decrypt(t, anyNode().client, mount{Path: "cmk"}, "born", born); got != "a key born after the snapshot" {
		t.Fatalf("the born key's ciphertext decrypts to %q", got)
	}
	mustWrite(t, cl, "cmk/keys/k/rotate", nil)
	mustWrite(t, cl, "cmk/keys/s/rotate", nil)
	for name, latest := range map[string]int{"k": 4, "s": 3} {
		k, err := cl.Logical().Read("cmk/keys/" + name)
		if err != nil {
			t.Fatal(err)
		}
		versions := k.Data["versions"].(map[string]interface{})
		if got := int(mustNumber(t, k.Data["latest_version"])); got != latest || len(versions) != latest {
			t.Fatalf("key %s: latest %d, %d versions; want %d, contiguous", name, got, len(versions), latest)
		}
		for v := 1; v <= latest; v++ {
			if versions[fmt.Sprint(v)] == nil {
				t.Fatalf("key %s: version %d missing", name, v)
			}
			want := map[string]string{"k": "aes256-gcm96", "s": "ed25519"}[name]
			if v == 1 {
				want = map[string]string{"k": "aes128-gcm96", "s": "ecdsa-p256"}[name]
			}
			if got := versions[fmt.Sprint(v)].(map[string]interface{})["type"]; got != want {
				t.Fatalf("key %s: version %d is %v after the restore, was made as %s", name, v, got, want)
			}
		}
	}
	h, err := cl.Logical().Read("cmk/keys/k/history")
	if err != nil {
		t.Fatal(err)
	}
	adopted := 0
	for _, e := range h.Data["events"].([]interface{}) {
		if e.(map[string]interface{})["event"] == "version_adopted" {
			adopted++
		}
	}
	if adopted != 2 {
		t.Fatalf("%d adoptions in k's history, want 2 (v2 and v3)", adopted)
	}
	seen := map[string]bool{}
	for _, o := range c.tokenObjects(t) {
		if !strings.Contains(o, "cmk/") {
			continue
		}
		if seen[o] {
			t.Fatalf("the token holds two objects %q: a version number was used twice", o)
		}
		seen[o] = true
	}
	report = mustWrite(t, cl, "cmk/reconcile", nil).Data
	if u, m := report["unreferenced_objects"].([]interface{}), report["missing_objects"].([]interface{}); len(u) != 0 || len(m) != 0 {
		t.Fatalf("after the drill storage and token differ: %v", report)
	}
	t.Logf("%d ciphertexts and %d signatures issued before and after the snapshot all decrypt and verify after the restore; %d token objects, no label twice",
		len(issued), len(signatures), len(seen))
}
