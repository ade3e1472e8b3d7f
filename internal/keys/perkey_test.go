package keys

import (
	"fmt"
	"sync"
	"testing"
)

// Range may change the map it ranges over (signHeadsLeftBehind deletes what it signed; usage's forget deletes the
// versions it finds): as with the sync.Map it replaces, nothing deadlocks and every name held throughout is seen.
func TestPerKeyRangeMayChangeTheMap(t *testing.T) {
	var p perKey[int]
	for i := range 100 {
		p.Store(fmt.Sprint(i), i)
	}
	seen := 0
	p.Range(func(name string, v int) bool {
		seen++
		p.Delete(name)
		p.Store("new"+name, v) // stored during the Range: seen or not, never a deadlock
		return true
	})
	if seen < 100 {
		t.Fatalf("Range saw %d of the 100 names held when it began", seen)
	}
	if _, ok := p.Load("7"); ok {
		t.Fatal("a name deleted during the Range is still held")
	}
	if v, ok := p.Load("new7"); !ok || v != 7 {
		t.Fatalf("a name stored during the Range: %d, %v", v, ok)
	}
}

func TestPerKeyLoadOrStoreKeepsTheFirst(t *testing.T) {
	var p perKey[*int]
	var wg sync.WaitGroup
	got := make([]*int, 8)
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v := i
			got[i], _ = p.LoadOrStore("k", &v)
		}()
	}
	wg.Wait()
	for _, g := range got {
		if g != got[0] {
			t.Fatal("LoadOrStore gave two callers two values")
		}
	}
	other := 99
	p.DeleteIf("k", func(held *int) bool { return held == &other })
	if _, ok := p.Load("k"); !ok {
		t.Fatal("DeleteIf dropped a value its test refused")
	}
	p.DeleteIf("k", func(held *int) bool { return held == got[0] })
	if _, ok := p.Load("k"); ok || p.Len() != 0 {
		t.Fatal("DeleteIf kept a value its test accepted")
	}
}

func TestReservationsRaisedLeavesTheOldSliceAlone(t *testing.T) {
	old := reservations{{version: 1, n: 100}}
	next := old.raised(1, 50).raised(2, 10)
	if n, _ := old.of(1); n != 100 || len(old) != 1 {
		t.Fatalf("the reservations in use changed: %v", old)
	}
	if n, _ := next.of(1); n != 100 {
		t.Fatalf("a reservation went down: %d", n)
	}
	if n, ok := next.of(2); !ok || n != 10 {
		t.Fatalf("version 2: %d, %v", n, ok)
	}
	if _, ok := next.of(3); ok {
		t.Fatal("a version never reserved has a reservation")
	}
	if e := next.entry(); len(e.Reserved) != 2 || e.Reserved[1] != 100 || e.Reserved[2] != 10 {
		t.Fatalf("stored as %v", e.Reserved)
	}
}
