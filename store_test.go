package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// openStore is newStore and open together, as the daemon's pre-init does
// them, for tests that run as whoever they are.
func openStore(path string, caches []cacheConfig, sweepBatch int) (*store, error) {
	return openStoreWith(path, caches, storeOptions{sweepBatch: sweepBatch})
}

func openStoreWith(path string, caches []cacheConfig, opts storeOptions) (*store, error) {
	s, err := newStore(caches, opts)
	if err != nil {
		return nil, err
	}
	if err := s.openFiles(path, os.Geteuid(), 0); err != nil {
		return nil, err
	}
	if err := s.open(context.Background()); err != nil {
		return nil, err
	}
	return s, nil
}

// asAdmin opens the store's database as an administrator's sqlite3 would,
// by name, to read its views: tlsmgr's own connections refuse to run
// anything a view or trigger defines.
func asAdmin(t testing.TB, st *store) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+st.path+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// damageKinds are what a crash, a disk fault, another program or an older
// tlsmgr may leave where the database goes. None may stop a start.
var damageKinds = []struct {
	name   string
	damage func(t *testing.T, db string)
}{
	{"bad header", func(t *testing.T, db string) { overwrite(t, db, 0, []byte("this is not SQLite format 3")) }},
	{"truncated in the middle of a page", func(t *testing.T, db string) { os.Truncate(db, 5000) }},
	{"zeroed pages", func(t *testing.T, db string) {
		fi, _ := os.Stat(db)
		overwrite(t, db, 4096, make([]byte, fi.Size()-4096))
	}},
	{"empty file", func(t *testing.T, db string) { os.Truncate(db, 0) }},
	{"a text file", func(t *testing.T, db string) { os.WriteFile(db, []byte("hello\n"), 0600) }},
	{"an older schema", func(t *testing.T, db string) {
		os.Remove(db)
		os.Remove(db + "-wal")
		os.Remove(db + "-shm")
		old, err := sql.Open("sqlite", db)
		if err != nil {
			t.Fatal(err)
		}
		defer old.Close()
		if _, err := old.Exec("CREATE TABLE smtpd_cache (k TEXT, v TEXT); INSERT INTO smtpd_cache VALUES ('a', 'b')"); err != nil {
			t.Fatal(err)
		}
	}},
	{"garbage -wal and -shm", func(t *testing.T, db string) {
		os.WriteFile(db+"-wal", bytes.Repeat([]byte{0xff}, 10000), 0600)
		os.WriteFile(db+"-shm", bytes.Repeat([]byte{0xee}, 32768), 0600)
	}},
	{"a directory", func(t *testing.T, db string) {
		os.Remove(db)
		os.Mkdir(db, 0700)
	}},
}

func overwrite(t *testing.T, path string, at int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
}

// fillStore stores n sessions and checks that each update succeeded.
func fillStore(t *testing.T, st *store, n int) {
	t.Helper()
	for i := range n {
		if status := st.update(st.caches["smtp"], fmt.Sprintf("id%d", i), bytes.Repeat([]byte{byte(i)}, 1500)); status != statOK {
			t.Fatalf("update %d: %d", i, status)
		}
	}
}

// Whatever the damage, the next start has a working, empty database. A
// directory in its place cannot be removed: that start runs without
// caching, and says so.
func TestDamagedDatabaseAtStart(t *testing.T) {
	for _, tc := range damageKinds {
		t.Run(tc.name, func(t *testing.T) {
			db := filepath.Join(t.TempDir(), "tlsmgr.sqlite")
			st, err := openStore(db, allCaches(3600), 500)
			if err != nil {
				t.Fatal(err)
			}
			fillStore(t, st, 20)
			st.close()
			tc.damage(t, db)
			st, err = openStore(db, allCaches(3600), 500)
			if tc.name == "a directory" {
				if err == nil || !strings.Contains(err.Error(), "cannot remove the old session cache") {
					t.Errorf("a directory in the database's place: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("start after %s: %v", tc.name, err)
			}
			defer st.close()
			smtp := st.caches["smtp"]
			if _, status := st.lookup(smtp, "id1"); status != statErr {
				t.Errorf("an old entry survived: %d", status)
			}
			if status := st.update(smtp, "new", []byte("session")); status != statOK {
				t.Errorf("update: %d", status)
			}
			if b, status := st.lookup(smtp, "new"); status != statOK || string(b) != "session" {
				t.Errorf("lookup: %q %d", b, status)
			}
			var check string
			st.reader.QueryRow("PRAGMA integrity_check").Scan(&check)
			if check != "ok" {
				t.Errorf("integrity_check: %s", check)
			}
		})
	}
}

// A second store on the same file refuses and touches nothing: the first
// keeps its entries and its file.
func TestSecondStoreRefused(t *testing.T) {
	db := filepath.Join(t.TempDir(), "tlsmgr.sqlite")
	first, err := openStore(db, allCaches(3600), 500)
	if err != nil {
		t.Fatal(err)
	}
	defer first.close()
	fillStore(t, first, 5)
	before := stateOf(t, db)
	second, err := openStore(db, allCaches(3600), 500)
	var inUse *errDatabaseInUse
	if !errors.As(err, &inUse) || second != nil {
		t.Fatalf("second store: %v", err)
	}
	if after := stateOf(t, db); after != before {
		t.Error("the second store changed the first one's file")
	}
	if _, status := first.lookup(first.caches["smtp"], "id3"); status != statOK {
		t.Errorf("the first store lost an entry: %d", status)
	}
}

// A store that could not open keeps its caches offline: policy says
// "not cachable", and requests get FAIL, as for a cache that is off.
func TestOfflineStore(t *testing.T) {
	st, err := newStore(allCaches(3600), storeOptions{sweepBatch: 500})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "tlsmgr.sqlite"), 0700) // cannot be removed
	st.offline()                                        // as postJailInit does
	if err := st.openFiles(filepath.Join(dir, "tlsmgr.sqlite"), os.Geteuid(), 0); err == nil {
		t.Fatal("open over a directory succeeded")
	}
	p, _ := newPool()
	srv := &server{store: st, pool: p, keys: newTicketKeys(3600, p), streamName: "tlsmgr socket"}
	for req, want := range map[string]string{
		"request\x00policy\x00cache_type\x00smtp\x00\x00":                                     "status\x000\x00cachable\x000\x00timeout\x003600\x00\x00",
		"request\x00lookup\x00cache_type\x00smtp\x00cache_id\x00x\x00\x00":                    "status\x004294967294\x00session\x00\x00\x00",
		"request\x00update\x00cache_type\x00smtp\x00cache_id\x00x\x00session\x00eA==\x00\x00": "status\x004294967294\x00\x00",
		"request\x00seed\x00size\x004\x00\x00":                                                "status\x000\x00seed\x00",
		"request\x00tktkey\x00keyname\x00\x00\x00":                                            "status\x000\x00keybuf\x00",
	} {
		if got := answer(t, srv, req); !strings.HasPrefix(got, want) {
			t.Errorf("%q: %q, want %q...", req, got, want)
		}
	}
}

// answer runs one request through the reader and the handlers.
func answer(t *testing.T, srv *server, req string) string {
	t.Helper()
	r := &attrReader{br: bufio.NewReader(strings.NewReader(req)), streamName: srv.streamName}
	parsed, err := srv.readRequest(r)
	if err != nil || parsed == nil {
		t.Fatalf("request %q: %v", req, err)
	}
	w := &attrWriter{}
	srv.handle(parsed, w, nil)
	return string(w.buf)
}

// Deleted sessions do not stay on disk: secure_delete is on, the WAL is
// checkpointed and truncated at exit, and the pages a sweep freed are
// reused by new sessions rather than added to.
func TestDeletedSessionsLeaveNoTrace(t *testing.T) {
	top := t.TempDir()
	db := filepath.Join(top, "data", "tlsmgr.sqlite")
	os.Mkdir(filepath.Dir(db), 0700)
	st, err := openStore(db, allCaches(3600), 500)
	if err != nil {
		t.Fatal(err)
	}
	var secure int
	st.writer.QueryRow("PRAGMA secure_delete").Scan(&secure)
	if secure != 1 {
		t.Errorf("secure_delete = %d", secure)
	}
	var pages, mode string
	st.reader.QueryRow("PRAGMA page_size").Scan(&pages)
	st.reader.QueryRow("PRAGMA journal_mode").Scan(&mode)
	if pages != fmt.Sprint(pageSize) || mode != "wal" {
		t.Errorf("page_size %s, journal_mode %s; want %d, wal (the page size must be set before WAL mode)", pages, mode, pageSize)
	}
	marker := []byte("SECRET-MASTER-KEY-MATERIAL")
	smtp := st.caches["smtp"]
	for i := range 400 {
		st.update(smtp, fmt.Sprintf("id%d", i), append(bytes.Repeat([]byte{'x'}, 3000), marker...))
	}
	sizeFull := fileSize(db) + fileSize(db+"-wal") // the checkpointer may not have run yet
	st.now = func() time.Time { return time.Now().Add(2 * time.Hour) }
	if n, err := st.sweepExpired(smtp, nil); n != 400 || err != nil {
		t.Fatalf("sweep: %d, %v", n, err)
	}
	for i := range 400 { // the freed pages are reused, not added to
		st.update(smtp, fmt.Sprintf("new%d", i), bytes.Repeat([]byte{'y'}, 3000))
	}
	st.sweepExpired(smtp, nil)
	// As in a chroot, the database's name no longer leads to it: SQLite
	// will not checkpoint or remove the WAL on close; we must.
	moved := filepath.Join(top, "moved")
	if err := os.Rename(filepath.Dir(db), moved); err != nil {
		t.Fatal(err)
	}
	db = filepath.Join(moved, "tlsmgr.sqlite")
	st.close()
	if fileSize(db) > sizeFull*5/4 {
		t.Errorf("file is %d bytes after deleting 400 sessions and storing 400 new ones, was %d with the first 400", fileSize(db), sizeFull)
	}
	if n := fileSize(db + "-wal"); n > 0 {
		t.Errorf("-wal is %d bytes after close", n)
	}
	for _, f := range []string{db, db + "-wal"} {
		if b, _ := os.ReadFile(f); bytes.Contains(b, marker) {
			t.Errorf("%s still holds deleted session bytes", f)
		}
	}
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// mountTmpfs mounts a small tmpfs for a full-disk test; it needs root.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	needRoot(t, "mounting a small tmpfs")
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0755", "tlsmgr-test", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

// fillDisk writes a file until the file system is full.
func fillDisk(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 64<<10)
	for {
		if _, err := f.Write(chunk); err != nil {
			break
		}
	}
	for { // the last pages
		if _, err := f.Write(chunk[:512]); err != nil {
			return
		}
	}
}

// On a full disk an update is answered "not cached" and logged at most
// once a minute; lookups and deletes go on; storing resumes with space.
func TestStoreOnFullDisk(t *testing.T) {
	dir := mountTmpfs(t, "3m")
	db := filepath.Join(dir, "tlsmgr.sqlite")
	st, err := openStore(db, allCaches(3600), 500)
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	fillStore(t, st, 50)
	fillDisk(t, filepath.Join(dir, "filler"))
	logged := captureLog(t)
	smtp := st.caches["smtp"]
	failed := 0
	for i := range 2000 {
		if st.update(smtp, fmt.Sprintf("more%d", i), bytes.Repeat([]byte{1}, 2000)) != statOK {
			failed++
		}
	}
	if failed < 1900 {
		t.Errorf("only %d of 2000 updates failed on a full disk", failed)
	}
	if n := strings.Count(logged(), "\n"); n != 1 || !strings.Contains(logged(), "warning: smtp TLS cache: cannot store entry") {
		t.Errorf("%d log lines, want 1:\n%s", n, logged())
	}
	if b, status := st.lookup(smtp, "id7"); status != statOK || len(b) != 1500 {
		t.Errorf("lookup on a full disk: %d bytes, %d", len(b), status)
	}
	if status := st.remove(smtp, "id7"); status != statOK {
		t.Errorf("delete on a full disk: %d", status)
	}
	if _, status := st.lookup(smtp, "id7"); status != statErr {
		t.Errorf("lookup after the delete on a full disk: %d", status)
	}
	// A replacement that cannot be written must not leave the old session.
	if status := st.update(smtp, "id8", bytes.Repeat([]byte{2}, 3000)); status != statErr {
		t.Errorf("replacing an entry on a full disk: %d", status)
	}
	if _, status := st.lookup(smtp, "id8"); status != statErr {
		t.Errorf("lookup of an entry whose replacement failed: %d (the old session came back)", status)
	}
	os.Remove(filepath.Join(dir, "filler"))
	if status := st.update(smtp, "after", []byte("space is back")); status != statOK {
		t.Errorf("update once space is back: %d", status)
	}
	var rows int
	st.reader.QueryRow("SELECT count(*) FROM smtp_cache WHERE id IN ('id7', 'id8')").Scan(&rows)
	if rows != 0 || st.hiddenCount.Load() != 0 {
		t.Errorf("%d rows deleted on the full disk are still there (%d hidden)", rows, st.hiddenCount.Load())
	}
	if b, status := st.lookup(smtp, "after"); status != statOK || string(b) != "space is back" {
		t.Errorf("lookup once space is back: %q %d", b, status)
	}
}
