package main

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// openTestStore opens a store with all three caches, closed when the test ends.
func openTestStore(t *testing.T) *store {
	t.Helper()
	st, err := openStore(filepath.Join(t.TempDir(), "tlsmgr.sqlite"), allCaches(3600), 500)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.close)
	return st
}

// waitQueued waits until n writes wait for the writer.
func waitQueued(t *testing.T, st *store, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		st.queueMu.Lock()
		queued := len(st.queue)
		st.queueMu.Unlock()
		if queued == n {
			return
		}
	}
	t.Fatalf("%d writes never queued", n)
}

// Writes that queue while a transaction is under way commit together in
// the next one; a write of that batch that fails gets its error, leaves
// nothing behind, and costs the others nothing.
func TestGroupCommit(t *testing.T) {
	st := openTestStore(t)
	c := st.caches["smtp"]

	release := make(chan struct{})
	held := make(chan struct{})
	go st.whileNoWrites(func() { close(held); <-release })
	<-held

	const n, failing = 8, 7 // the failing write queues last, so the others run before it
	var counted atomic.Int64
	seen := make([]int, n) // how many writes of its transaction ran before it
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		if i == failing {
			waitQueued(t, st, failing)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = st.write(func(tx *writeTx) error {
				seen[i] = max(seen[i], len(tx.deltas)) // it runs again alone after the failure
				tx.add(&counted, 1)
				if err := tx.exec(c.updateStmt, append([]any{rowKey(fmt.Sprint(i)), fmt.Sprint(i), []byte("s"), 1, 2}, decodedValues(nil)...)...); err != nil {
					return err
				}
				if i == failing {
					return errors.New("this write fails")
				}
				return nil
			})
		}()
	}
	waitQueued(t, st, n)
	close(release)
	wg.Wait()

	batched := 0
	for i := range n {
		if i == failing {
			if errs[i] == nil {
				t.Errorf("the failing write succeeded")
			}
			continue
		}
		if errs[i] != nil {
			t.Errorf("write %d: %v", i, errs[i])
		}
		if seen[i] > 0 {
			batched++
		}
	}
	if batched == 0 {
		t.Errorf("no write ran in a transaction after another: %v", seen)
	}
	if got := counted.Load(); got != n-1 {
		t.Errorf("counted %d writes, want %d: a rolled-back write must not count", got, n-1)
	}
	var rows int
	st.reader.QueryRow("SELECT count(*) FROM smtp_cache").Scan(&rows)
	if rows != n-1 {
		t.Errorf("%d rows, want %d: the failed write must leave nothing", rows, n-1)
	}
	var failed int
	st.reader.QueryRow("SELECT count(*) FROM smtp_cache WHERE id = ?", fmt.Sprint(failing)).Scan(&failed)
	if failed != 0 {
		t.Error("the failed write's row is there")
	}
}

// After close, writes are refused, not lost in a queue nobody serves.
func TestWriteAfterClose(t *testing.T) {
	st, err := openStore(filepath.Join(t.TempDir(), "tlsmgr.sqlite"), allCaches(3600), 500)
	if err != nil {
		t.Fatal(err)
	}
	st.close()
	done := make(chan error)
	go func() { done <- st.write(func(*writeTx) error { return nil }) }()
	select {
	case err := <-done:
		if !errors.Is(err, errStoreClosed) {
			t.Errorf("write after close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a write after close hangs")
	}
	if got := st.update(st.caches["smtpd"], "x", []byte("s")); got != statErr {
		t.Errorf("update after close: %d", got)
	}
	if _, got := st.lookup(st.caches["smtpd"], "x"); got != statErr {
		t.Errorf("lookup after close: %d", got)
	}
}

// Rows are found by the hash of their id. An id whose hash another id
// already holds misses on lookup and delete, and replaces that row on
// update, keeping the counts right. (SHA-256 gives no such pair; the test
// plants one.)
func TestSameHashOtherID(t *testing.T) {
	st := openTestStore(t)
	c := st.caches["smtpd"]
	if st.update(c, "planted", []byte("first")) != statOK {
		t.Fatal("update")
	}
	if _, err := st.writer.Exec("UPDATE smtpd_cache SET hash = ? WHERE id = 'planted'", rowKey("other")); err != nil {
		t.Fatal(err)
	}
	if _, status := st.lookup(c, "other"); status != statErr {
		t.Error("lookup of another id with the same hash found a session")
	}
	if st.remove(c, "other") != statErr {
		t.Error("delete of another id with the same hash deleted a session")
	}
	if st.update(c, "other", []byte("second!")) != statOK {
		t.Fatal("update of the colliding id")
	}
	if session, status := st.lookup(c, "other"); status != statOK || string(session) != "second!" {
		t.Errorf("lookup after the colliding update: %q, %d", session, status)
	}
	var rows int
	st.reader.QueryRow("SELECT count(*) FROM smtpd_cache").Scan(&rows)
	if rows != 1 || c.entries.Load() != 1 || c.bytes.Load() != int64(len("second!")) {
		t.Errorf("%d rows, counts %d entries, %d bytes; want 1, 1, 7", rows, c.entries.Load(), c.bytes.Load())
	}
}

// Housekeeping (the sweep, counters) yields to clients: a background write
// that queued first runs after the clients' writes that queued behind it.
func TestBackgroundWritesYield(t *testing.T) {
	st := openTestStore(t)
	release, held := make(chan struct{}), make(chan struct{})
	go st.whileNoWrites(func() { close(held); <-release })
	<-held

	var mu sync.Mutex
	var order []string
	record := func(name string) writeFunc {
		return func(*writeTx) error { mu.Lock(); order = append(order, name); mu.Unlock(); return nil }
	}
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); st.writeBackground(record("sweep")) }()
	waitQueued(t, st, 1)
	go func() { defer wg.Done(); st.write(record("client1")) }()
	go func() { defer wg.Done(); st.write(record("client2")) }()
	waitQueued(t, st, 3)
	close(release)
	wg.Wait()
	if len(order) != 3 || order[2] != "sweep" {
		t.Errorf("ran in the order %v; the background write must come last", order)
	}
}
