package main

// What stock tlsmgr lacks: readable sessions, bounded caches, and
// sessions and ticket keys kept across restarts (opt-in).

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// keptStore opens a store with tlsmgr_keep_sessions/_ticket_keys as given.
func keptStore(t *testing.T, db string, keepSessions, keepKeys bool, caches []cacheConfig) *store {
	t.Helper()
	st, err := openStoreWith(db, caches, storeOptions{sweepBatch: 500, keepSessions: keepSessions, keepKeys: keepKeys})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// The sessions view shows what the blob holds, for an OpenSSL session,
// and NULLs for anything else; the blob is stored unchanged either way.
func TestReadableSessionColumns(t *testing.T) {
	st, err := openStore(filepath.Join(t.TempDir(), "tlsmgr.sqlite"), allCaches(3600), 500)
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	smtp := st.caches["smtp"]
	for _, tc := range decodeCases {
		if st.update(smtp, tc.file, testSession(t, tc.file)) != statOK {
			t.Fatalf("update %s", tc.file)
		}
	}
	st.update(smtp, "opaque", []byte("not an OpenSSL session"))

	for _, tc := range decodeCases {
		var protocol, cipher, sni, subject, fingerprint, notAfter *string
		var ticket *bool
		var rawKey *int64
		err := asAdmin(t, st).QueryRow("SELECT protocol, cipher, sni, ticket, peer_subject, peer_fingerprint, peer_not_after, peer_rpk FROM sessions WHERE id = ?", tc.file).
			Scan(&protocol, &cipher, &sni, &ticket, &subject, &fingerprint, &notAfter, &rawKey)
		if err != nil {
			t.Fatalf("%s: %v", tc.file, err)
		}
		rpk := "NULL"
		if rawKey != nil {
			rpk = fmt.Sprint(*rawKey)
		}
		got := fmt.Sprint(deref(protocol), " ", deref(cipher), " sni=", deref(sni), " ticket=", ticket != nil && *ticket,
			" peer=", deref(subject), " ", deref(fingerprint), " ", deref(notAfter), " rpk=", rpk)
		want := fmt.Sprint(tc.protocol, " ", tc.cipher, " sni=", tc.sni, " ticket=", tc.ticket, " peer=", "", " ", "", " ", "", " rpk=NULL")
		if p := oraclePeer(t, tc.file, tc.peer); p != nil {
			after, rpk := "", "0"
			if p.notAfter != 0 {
				after = time.Unix(p.notAfter, 0).UTC().Format("2006-01-02T15:04:05Z")
			}
			if tc.peer == "rpk" {
				rpk = "1"
			}
			want = fmt.Sprint(tc.protocol, " ", tc.cipher, " sni=", tc.sni, " ticket=", tc.ticket, " peer=", p.subject, " ", p.fingerprint, " ", after, " rpk=", rpk)
		}
		if got != want {
			t.Errorf("%s:\n got %s\nwant %s", tc.file, got, want)
		}
	}
	var nulls int
	asAdmin(t, st).QueryRow("SELECT (protocol IS NULL) + (cipher IS NULL) + (ticket IS NULL) + (peer_subject IS NULL) FROM sessions WHERE id = 'opaque'").Scan(&nulls)
	if nulls != 4 {
		t.Errorf("an opaque blob got columns: %d NULLs of 4", nulls)
	}
	if b, status := st.lookup(smtp, "tls13-ticket-sni"); status != statOK || !bytes.Equal(b, testSession(t, "tls13-ticket-sni")) {
		t.Errorf("the blob did not come back unchanged: %d", status)
	}
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// tableCounts is what the table really holds.
func tableCounts(t *testing.T, st *store, label string) (entries, bytes int64) {
	t.Helper()
	if err := st.writer.QueryRow("SELECT count(*), coalesce(sum(length(session)), 0) FROM "+label+"_cache").Scan(&entries, &bytes); err != nil {
		t.Fatal(err)
	}
	return entries, bytes
}

// A cache at its entry limit evicts its oldest sessions, a batch at a
// time: never more than the limit in the table, the newest kept, every
// eviction counted, and one rate-limited warning naming the parameter.
func TestEntryLimitEvictsOldest(t *testing.T) {
	logged := captureLog(t)
	caches := allCaches(3600)
	caches[1].entryLimit = 100
	st, err := openStore(filepath.Join(t.TempDir(), "tlsmgr.sqlite"), caches, 500)
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	smtp := st.caches["smtp"]
	clock := int64(1_800_000_000)
	st.now = func() time.Time { clock++; return time.Unix(clock, 0) }
	for i := range 1000 {
		st.update(smtp, fmt.Sprintf("id%04d", i), bytes.Repeat([]byte{1}, 100))
		if n, _ := tableCounts(t, st, "smtp"); n > 100 {
			t.Fatalf("after update %d the table holds %d entries, limit 100", i, n)
		}
	}
	n, b := tableCounts(t, st, "smtp")
	if n != smtp.entries.Load() || b != smtp.bytes.Load() {
		t.Errorf("counted %d entries / %d bytes, the table holds %d / %d", smtp.entries.Load(), smtp.bytes.Load(), n, b)
	}
	if _, status := st.lookup(smtp, "id0999"); status != statOK {
		t.Error("the newest session was evicted")
	}
	if _, status := st.lookup(smtp, "id0000"); status != statErr {
		t.Error("the oldest session survived")
	}
	if got := smtp.count.evictions.Load(); got != 1000-n {
		t.Errorf("%d evictions counted, %d sessions gone", got, 1000-n)
	}
	if c := strings.Count(logged(), "tlsmgr_smtp_session_cache_entry_limit = 100; raise that limit"); c != 1 {
		t.Errorf("%d warnings naming the limit, want 1 (rate-limited):\n%s", c, logged())
	}
}

// A cache far over its entry limit (a lowered limit, kept sessions): one
// transaction, however many clients' updates it carries, evicts at most
// one sweep batch more than it adds, so that no client waits for more
// than one batch; the cache then goes down, a transaction at a time.
func TestEvictionPerTransaction(t *testing.T) {
	caches := allCaches(3600)
	st, err := openStore(filepath.Join(t.TempDir(), "tlsmgr.sqlite"), caches, 16)
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	smtp := st.caches["smtp"]
	for i := range 1000 {
		st.update(smtp, fmt.Sprintf("old%04d", i), []byte("x"))
	}
	smtp.entryLimit = 100 // as if lowered before a restart

	release := make(chan struct{})
	held := make(chan struct{})
	go st.whileNoWrites(func() { close(held); <-release })
	<-held
	var wg sync.WaitGroup
	for i := range maxWriteBatch {
		wg.Add(1)
		go func() { defer wg.Done(); st.update(smtp, fmt.Sprintf("new%02d", i), []byte("y")) }()
	}
	waitQueued(t, st, maxWriteBatch)
	close(release)
	wg.Wait()
	if got, most := smtp.count.evictions.Load(), int64(maxWriteBatch+16); got > most {
		t.Errorf("one transaction of %d updates evicted %d sessions, more than %d", maxWriteBatch, got, most)
	}
	for i := 0; smtp.entries.Load() > 100; i++ {
		if i == 1000 {
			t.Fatalf("still %d entries after 1,000 more updates", smtp.entries.Load())
		}
		st.update(smtp, fmt.Sprintf("more%04d", i), []byte("z"))
	}
}

// The byte limit holds too, and replacing a session counts its new size.
func TestSizeLimitEvictsOldest(t *testing.T) {
	caches := allCaches(3600)
	caches[0].sizeLimit = 100_000
	st, err := openStore(filepath.Join(t.TempDir(), "tlsmgr.sqlite"), caches, 500)
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	smtpd := st.caches["smtpd"]
	for i := range 500 {
		st.update(smtpd, fmt.Sprintf("id%d", i%300), bytes.Repeat([]byte{2}, 1000+i))
		if _, b := tableCounts(t, st, "smtpd"); b > 100_000 {
			t.Fatalf("after update %d the table holds %d bytes, limit 100000", i, b)
		}
	}
	n, b := tableCounts(t, st, "smtpd")
	if n != smtpd.entries.Load() || b != smtpd.bytes.Load() || smtpd.count.evictions.Load() == 0 {
		t.Errorf("counted %d/%d with %d evictions, table %d/%d", smtpd.entries.Load(), smtpd.bytes.Load(), smtpd.count.evictions.Load(), n, b)
	}
}

// Off by default: a restart forgets sessions and keys, as Postfix does.
// With tlsmgr_keep_sessions the unexpired sessions, their counts and the
// statistics carry on; with tlsmgr_keep_ticket_keys the two keys do.
func TestKeptAcrossRestart(t *testing.T) {
	for _, tc := range []struct {
		keepSessions, keepKeys bool
	}{{false, false}, {true, false}, {false, true}, {true, true}} {
		t.Run(fmt.Sprintf("sessions=%v keys=%v", tc.keepSessions, tc.keepKeys), func(t *testing.T) {
			db := filepath.Join(t.TempDir(), "tlsmgr.sqlite")
			st := keptStore(t, db, tc.keepSessions, tc.keepKeys, allCaches(3600))
			st.update(st.caches["smtp"], "dest", testSession(t, "tls12-ticket-sni"))
			st.lookup(st.caches["smtp"], "dest")
			cur := &ticketKey{name: [16]byte{1}, bits: [32]byte{2}, hmac: [32]byte{3}, tout: st.now().Unix() + 100}
			prev := &ticketKey{name: [16]byte{4}, tout: st.now().Unix() - 100}
			if err := st.saveTicketKeys([]ticketKey{*cur, *prev}); err != nil {
				t.Fatal(err)
			}
			if err := st.saveCounters(); err != nil {
				t.Fatal(err)
			}
			st.close()

			st = keptStore(t, db, tc.keepSessions, tc.keepKeys, allCaches(3600))
			defer st.close()
			_, status := st.lookup(st.caches["smtp"], "dest")
			if kept := status == statOK; kept != tc.keepSessions {
				t.Errorf("session kept: %v", kept)
			}
			if hits := st.caches["smtp"].count.hits.Load(); (hits == 2) != tc.keepSessions && (hits == 1) != !tc.keepSessions {
				t.Errorf("hits after restart: %d", hits)
			}
			keys, err := readTicketKeys(context.Background(), st.writer)
			if err != nil {
				t.Fatal(err)
			}
			if tc.keepKeys {
				if len(keys) != 2 || keys[0] != *cur || keys[1].name != prev.name {
					t.Errorf("kept keys: %d: %+v", len(keys), keys)
				}
			} else if len(keys) != 0 {
				t.Errorf("%d keys kept with tlsmgr_keep_ticket_keys = no", len(keys))
			}
			var stored int
			st.writer.QueryRow("SELECT count(*) FROM ticket_keys").Scan(&stored)
			if !tc.keepKeys && stored != 0 {
				t.Errorf("the database still holds %d ticket keys", stored)
			}
		})
	}
}

// Restored keys follow the T/2 rules as if there had been no restart: a
// key past tout + H is dropped, one past tout decrypts but does not issue.
// A key whose tout is beyond now + H cannot have been made by these rules:
// it is dropped with one warning, and a new key is made (a key ten years
// ahead was used for ten years).
func TestRestoredTicketKeys(t *testing.T) {
	logged := captureLog(t)
	p, _ := newPool()
	keys := newTicketKeys(3600, p)
	now := keys.now().Unix()
	name := func(b byte) []byte { return append([]byte{b}, make([]byte, 15)...) }
	keys.restore([]ticketKey{
		{name: [16]byte{3}, tout: now + 10*365*86400}, // ten years ahead
		{name: [16]byte{1}, tout: now - 10},           // stopped issuing, still decrypts
		{name: [16]byte{2}, tout: now - 1800},         // past tout + H
	})
	if _, ok := keys.find(name(1)); !ok {
		t.Error("a kept key within tout + H does not decrypt")
	}
	if _, ok := keys.find(name(2)); ok {
		t.Error("a kept key past tout + H decrypts")
	}
	if _, ok := keys.find(name(3)); ok {
		t.Error("a kept key ten years ahead decrypts")
	}
	if k, _, err := keys.issue(); err != nil || k.name == [16]byte{3} || k.name == [16]byte{1} || k.tout != now+1799 {
		t.Errorf("issued %x (tout %d, %v), want a new key", k.name, k.tout-now, err)
	}
	if n := strings.Count(logged(), "warning:"); n != 1 || !strings.Contains(logged(), "kept session ticket key 03000000000000000000000000000000 would issue tickets until") {
		t.Errorf("want one warning about the key ten years ahead:\n%s", logged())
	}
}

// A clock stepped back, or forward, never lengthens a key's life: a key
// issues tickets for at most H - 1 s and decrypts them for at most 2H - 1 s
// on the monotonic clock, whatever the wall clock says.
func TestTicketKeysClockSteps(t *testing.T) {
	p, _ := newPool()
	keys := newTicketKeys(120, p) // H = 60 s
	wall, mono := time.Unix(1_800_000_000, 0), time.Hour
	keys.now = func() time.Time { return wall }
	keys.mono = func() time.Duration { return mono }
	a, _, _ := keys.issue()

	wall, mono = wall.Add(-time.Hour), mono+30*time.Second // stepped back an hour, 30 s later
	if k, made, _ := keys.issue(); made || k.name != a.name {
		t.Fatal("the key changed before its time")
	}
	mono += 29 * time.Second // H - 1 s after it was made: the wall clock says 59 min more
	b, made, _ := keys.issue()
	if !made || b.name == a.name {
		t.Error("a key kept issuing past H - 1 s because the wall clock was stepped back")
	}
	if _, ok := keys.find(a.name[:]); !ok {
		t.Error("the previous key no longer decrypts within 2H")
	}
	mono += 60 * time.Second // 2H - 1 s after a was made
	if _, ok := keys.find(a.name[:]); ok {
		t.Error("a key decrypted past 2H - 1 s because the wall clock was stepped back")
	}

	wall = wall.Add(2 * time.Hour) // stepped forward: the wall clock retires b at once
	if c, made, _ := keys.issue(); !made || c.name == b.name {
		t.Error("a key outlived its tout on the wall clock")
	}
}

// A start cut short while it checks a kept database (postfix reload right
// after a start) leaves the database as it was: an unfinished check is no
// reason to empty it.
func TestKeptDatabaseSurvivesCancelledStart(t *testing.T) {
	db := filepath.Join(t.TempDir(), "tlsmgr.sqlite")
	st := keptStore(t, db, true, true, allCaches(3600))
	fillStore(t, st, 20)
	st.close()
	st, err := newStore(allCaches(3600), storeOptions{sweepBatch: 500, keepSessions: true, keepKeys: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.openFiles(db, os.Geteuid(), 0); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := st.open(ctx); err == nil {
		t.Error("a start cut short opened the database")
	}
	st.close()
	st = keptStore(t, db, true, true, allCaches(3600))
	defer st.close()
	if _, status := st.lookup(st.caches["smtp"], "id7"); status != statOK {
		t.Errorf("a kept session is gone after a start was cut short: %d", status)
	}
}

// With keeping on, a damaged database, or one whose schema is not exactly
// ours, is emptied with one warning and started again: it never stops the
// daemon, and no copy of it (it holds sessions and keys) is left behind.
func TestKeptDatabaseDamaged(t *testing.T) {
	for _, tc := range damageKinds {
		if tc.name == "a directory" {
			continue // TestDamagedDatabaseAtStart: cannot be removed, caching is off
		}
		t.Run(tc.name, func(t *testing.T) {
			db := filepath.Join(t.TempDir(), "tlsmgr.sqlite")
			st := keptStore(t, db, true, true, allCaches(3600))
			fillStore(t, st, 20)
			st.close()
			tc.damage(t, db)
			logged := captureLog(t)
			st = keptStore(t, db, true, true, allCaches(3600))
			defer st.close()
			if st.update(st.caches["smtp"], "new", []byte("x")) != statOK {
				t.Error("update after the damage")
			}
			warnings := strings.Count(logged(), "warning:")
			left, _ := filepath.Glob(db + ".dam*")
			if tc.name == "garbage -wal and -shm" { // SQLite ignores a -wal without a valid header
				if warnings != 0 {
					t.Errorf("a database SQLite can read was emptied:\n%s", logged())
				}
				if _, status := st.lookup(st.caches["smtp"], "id1"); status != statOK {
					t.Errorf("a kept session was lost: %d", status)
				}
				return
			}
			if warnings != 1 || !strings.Contains(logged(), "emptied it and started a new one") || len(left) != 0 {
				t.Errorf("want one warning and no copy (%v):\n%s", left, logged())
			}
			if _, status := st.lookup(st.caches["smtp"], "id1"); status != statErr {
				t.Errorf("a session of the damaged database is served: %d", status)
			}
		})
	}
}

// A database kept by the tlsmgr before peer_rpk (schema version 4, as
// testdata/schema-v4.sql, that version's schema.sql, made it) keeps its
// sessions and ticket keys: it is brought to version 5 in place and comes
// out exactly schema.sql's, so the next start keeps it as it is. A
// version 4 file with anything of its own is emptied, as any other.
func TestKeptVersion4IsBroughtUp(t *testing.T) {
	v4, err := os.ReadFile("testdata/schema-v4.sql")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(v4), "PRAGMA user_version = 4;") {
		t.Fatal("testdata/schema-v4.sql is not version 4")
	}
	for _, tc := range []struct {
		name  string
		extra []string
		kept  bool
	}{
		{"as it was left", nil, true},
		{"with a trigger of its own", []string{"CREATE TRIGGER planted AFTER INSERT ON smtp_cache BEGIN DELETE FROM ticket_keys; END"}, false},
		{"with peer_rpk already", []string{"ALTER TABLE smtp_cache ADD COLUMN peer_rpk INTEGER"}, false},
		// Each of these would come out of the upgrade as exactly ours, or
		// make it run the file's own expressions (ALTER TABLE checks a
		// STRICT table's rows): only an exact version 4 may be upgraded.
		{"with another sessions view", []string{"DROP VIEW cache_stats", "DROP VIEW sessions", "CREATE VIEW sessions AS SELECT 1",
			"CREATE VIEW cache_stats AS SELECT 1"}, false},
		{"with cache_stats a table", []string{"DROP VIEW cache_stats", "CREATE TABLE cache_stats (x)"}, false},
		{"with a STRICT table that checks its rows", []string{"DROP VIEW cache_stats", "DROP VIEW sessions", "DROP TABLE lmtp_cache",
			"CREATE TABLE lmtp_cache (hash INTEGER PRIMARY KEY, id TEXT NOT NULL CHECK (length(id) < 1000)) STRICT"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := filepath.Join(t.TempDir(), "tlsmgr.sqlite")
			h, err := sql.Open("sqlite", db)
			if err != nil {
				t.Fatal(err)
			}
			h.SetMaxOpenConns(1)
			blob := testSession(t, "tls13-rpk")
			now := time.Now().Unix()
			for _, q := range append(append([]string{"PRAGMA journal_mode = WAL", string(v4)}, tc.extra...),
				fmt.Sprintf("INSERT INTO smtp_cache (hash, id, session, stored, expires, protocol) VALUES (%d, 'dest', x'%x', %d, %d, 'TLSv1.3')", rowKey("dest"), blob, now, now+3600),
				fmt.Sprintf("INSERT INTO ticket_keys VALUES (0, x'%032x', zeroblob(32), zeroblob(32), %d)", 7, now+600),
				"PRAGMA wal_checkpoint(TRUNCATE)") {
				if _, err := h.Exec(q); err != nil {
					t.Fatalf("%s: %v", q, err)
				}
			}
			h.Close()

			logged := captureLog(t)
			st := keptStore(t, db, true, true, allCaches(3600))
			got, status := st.lookup(st.caches["smtp"], "dest")
			if kept := status == statOK && bytes.Equal(got, blob); kept != tc.kept {
				t.Errorf("session kept: %v, want %v; log:\n%s", kept, tc.kept, logged())
			}
			keys, err := readTicketKeys(context.Background(), st.writer)
			if err != nil {
				t.Fatal(err)
			}
			if kept := len(keys) == 1 && keys[0].name == [16]byte{15: 7}; kept != tc.kept {
				t.Errorf("ticket key kept: %v (%d keys), want %v", kept, len(keys), tc.kept)
			}
			if tc.kept {
				if !strings.Contains(logged(), "brought from schema version 4 to 5") || strings.Contains(logged(), "warning:") {
					t.Errorf("log:\n%s", logged())
				}
			} else if strings.Count(logged(), "warning:") != 1 || !strings.Contains(logged(), "emptied it and started a new one") {
				t.Errorf("want one warning, that it was emptied:\n%s", logged())
			}
			if why := schemaProblem(context.Background(), st.writer); why != "" {
				t.Errorf("after the start the database %s", why)
			}
			// A session stored now gets the new column.
			if st.update(st.caches["smtp"], "rpk", blob) != statOK {
				t.Fatal("update")
			}
			st.close()

			logged = captureLog(t)
			st = keptStore(t, db, true, true, allCaches(3600))
			defer st.close()
			if strings.Contains(logged(), "warning:") || strings.Contains(logged(), "brought from") {
				t.Errorf("the second start did not keep the database as it was:\n%s", logged())
			}
			var rawKey int
			if err := asAdmin(t, st).QueryRow("SELECT peer_rpk FROM sessions WHERE id = 'rpk'").Scan(&rawKey); err != nil || rawKey != 1 {
				t.Errorf("peer_rpk %d, %v", rawKey, err)
			}
		})
	}
}

// ourSchemaBefore, derived from schema.sql, is version 4's schema.sql as
// SQLite records it: the exact check a kept version 4 database must pass
// before it is upgraded.
func TestSchemaBefore(t *testing.T) {
	v4, err := os.ReadFile("testdata/schema-v4.sql")
	if err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite", ":memory:")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	if _, err := db.Exec(string(v4)); err != nil {
		t.Fatal(err)
	}
	if why := schemaDiffers(context.Background(), db, 4, ourSchemaBefore); why != "" {
		t.Errorf("testdata/schema-v4.sql %s", why)
	}
	if why := schemaProblem(context.Background(), db); why == "" {
		t.Error("version 4 passes as version 5")
	}
}

// A kept database whose sessions are damaged still gives its ticket keys:
// their own table is checked and read before the whole file is, so that a
// fault in the sessions (or a file too large to check within tktkey's
// wait) does not cost the keys. The rest of the file is emptied.
func TestKeptKeysSurviveDamagedSessions(t *testing.T) {
	db := filepath.Join(t.TempDir(), "tlsmgr.sqlite")
	st := keptStore(t, db, true, true, allCaches(3600))
	fillStore(t, st, 200)
	cur := ticketKey{name: [16]byte{9}, bits: [32]byte{2}, hmac: [32]byte{3}, tout: st.now().Unix() + 100}
	if err := st.saveTicketKeys([]ticketKey{cur}); err != nil {
		t.Fatal(err)
	}
	var root int64
	if err := st.writer.QueryRow("SELECT rootpage FROM sqlite_schema WHERE name = 'smtp_cache'").Scan(&root); err != nil {
		t.Fatal(err)
	}
	st.close()
	f, err := os.OpenFile(db, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	// the b-tree page type of smtp_cache's root page: no valid type
	if _, err := f.WriteAt([]byte{0xff}, (root-1)*pageSize); err != nil {
		t.Fatal(err)
	}
	f.Close()

	logged := captureLog(t)
	st, err = newStore(allCaches(3600), storeOptions{sweepBatch: 500, keepSessions: true, keepKeys: true})
	if err != nil {
		t.Fatal(err)
	}
	var kept []ticketKey
	st.keptKeys = func(keys []ticketKey, err error) { kept = keys }
	if err := st.openFiles(db, os.Geteuid(), 0); err != nil {
		t.Fatal(err)
	}
	if err := st.open(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer st.close()
	if !strings.Contains(logged(), "is damaged (quick_check") || !strings.Contains(logged(), "emptied it and started a new one") {
		t.Errorf("the damaged file was not emptied for its damage:\n%s", logged())
	}
	if len(kept) != 1 || kept[0].name != cur.name {
		t.Errorf("kept keys %d, want the one saved", len(kept))
	}
	if _, status := st.lookup(st.caches["smtp"], "id1"); status == statOK {
		t.Error("a session of the damaged file is served")
	}
}
