package tests

import (
	"fmt"
	"math/rand"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestRaftFailover runs a three-node Vault cluster with integrated storage, built by scripts/cluster.sh (as an
// operator would), every node's plugin on one shared SoftHSM token. Under encryption and rotation load the active
// node is stopped: a standby takes over and serves, every ciphertext a client received decrypts, versions stay
// contiguous, and a rotation scheduled for after the failover happens exactly once.
func TestRaftFailover(t *testing.T) {
	t.Parallel()
	nodes, _ := startCluster(t, 3)
	active := activeNode(t, nodes, nil)
	c := active.client
	mustWrite(t, c, "cmk/keys/k", nil)
	mustWrite(t, c, "cmk/keys/sched", map[string]interface{}{"auto_rotate_period": "1h"})
	due := time.Now().Add(40 * time.Second).UTC()
	mustWrite(t, c, "cmk/keys/sched/config", map[string]interface{}{"next_rotation_time": due.Format(time.RFC3339)})

	var mu sync.Mutex
	issued := map[string]string{}
	failed := map[string]int{} // node name → requests that got no answer
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 3; w++ { // clients spread over every node: standbys forward to the active one
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				node := nodes[rand.Intn(len(nodes))]
				pt := fmt.Sprintf("w%d-%d", w, n)
				s, err := node.client.Logical().Write("cmk/encrypt/k", map[string]interface{}{"plaintext": b64(pt)})
				mu.Lock()
				if err != nil {
					failed[node.name]++ // the stopped node, or the election: the client got nothing
				} else {
					issued[s.Data["ciphertext"].(string)] = pt
				}
				mu.Unlock()
			}
		}(w)
	}
	wg.Add(1)
	go func() { // rotations through whichever node answers
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(300 * time.Millisecond):
			}
			_, _ = nodes[rand.Intn(len(nodes))].client.Logical().Write("cmk/keys/k/rotate", nil)
		}
	}()

	time.Sleep(5 * time.Second)
	t.Logf("stopping the active node %s (pid %d)", active.name, active.pid)
	if err := syscall.Kill(active.pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitExit(t, active.pid)
	stopped := active
	active = activeNode(t, nodes, stopped)
	t.Logf("%s took over", active.name)
	time.Sleep(8 * time.Second) // load on the new active node
	close(stop)
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	c = active.client
	before := len(issued)
	for ct, pt := range issued {
		if got := decrypt(t, c, mount{Path: "cmk"}, "k", ct); got != pt {
			t.Fatalf("%s decrypts to %q, want %q", ct, got, pt)
		}
	}
	k := mustWrite(t, c, "cmk/encrypt/k", map[string]interface{}{"plaintext": b64("after")})
	if k == nil {
		t.Fatal("no encryption after failover")
	}
	kr, err := c.Logical().Read("cmk/keys/k")
	if err != nil {
		t.Fatal(err)
	}
	latest := int(mustNumber(t, kr.Data["latest_version"]))
	versions := kr.Data["versions"].(map[string]interface{})
	for v := 1; v <= latest; v++ {
		if versions[fmt.Sprint(v)] == nil {
			t.Fatalf("version %d of %d missing", v, latest)
		}
	}
	if len(versions) != latest {
		t.Fatalf("%d versions for latest_version %d", len(versions), latest)
	}
	t.Logf("%d ciphertexts issued across the failover all decrypt; %d versions, contiguous; requests that got no answer, by node: %v (%s was stopped)",
		before, latest, failed, stopped.name)

	// The scheduled rotation falls after the failover: the new active node makes it, once.
	deadline := due.Add(3 * time.Minute)
	for {
		s, err := c.Logical().Read("cmk/keys/sched")
		if err == nil && mustNumber(t, s.Data["latest_version"]) >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the rotation due at %s did not happen on the new active node (%v)", due, err)
		}
		time.Sleep(2 * time.Second)
	}
	time.Sleep(70 * time.Second) // another periodic pass: it must not rotate again
	s, err := c.Logical().Read("cmk/keys/sched")
	if err != nil {
		t.Fatal(err)
	}
	if v := mustNumber(t, s.Data["latest_version"]); v != 2 {
		t.Fatalf("scheduled rotation made %v versions, want 2", v)
	}
	h, err := c.Logical().ReadWithData("cmk/keys/sched/history", nil)
	if err != nil {
		t.Fatal(err)
	}
	scheduled := 0
	for _, e := range h.Data["events"].([]interface{}) {
		ev := e.(map[string]interface{})
		if ev["event"] == "rotated" && ev["cause"] == "scheduled" {
			scheduled++
		}
	}
	if scheduled != 1 {
		t.Fatalf("%d scheduled rotations in the history, want 1: %v", scheduled, h.Data["events"])
	}
}
