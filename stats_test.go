package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// Every counter follows the requests that move it, reaches the
// cache_counters view when written, and tlsmgr -stats prints it.
func TestCountersFollowRequests(t *testing.T) {
	s := startServer(t, allCaches(3600))
	st := s.srv.store
	clock := time.Now()
	st.now = func() time.Time { return clock }
	c := dial(t, s.sock)
	for _, req := range [][]string{
		{"request", "update", "cache_type", "smtpd", "cache_id", "a", "session", b64("1")},    // stores 1
		{"request", "update", "cache_type", "smtpd", "cache_id", "a", "session", b64("22")},   // replaced 1
		{"request", "update", "cache_type", "smtpd", "cache_id", "b", "session", b64("333")},  // stores 2
		{"request", "update", "cache_type", "smtpd", "cache_id", "c", "session", b64("4444")}, // stores 3
		{"request", "lookup", "cache_type", "smtpd", "cache_id", "a"},                         // hit
		{"request", "lookup", "cache_type", "smtpd", "cache_id", "a"},                         // hit
		{"request", "lookup", "cache_type", "smtpd", "cache_id", "x"},                         // miss
		{"request", "delete", "cache_type", "smtpd", "cache_id", "b"},                         // deletes 1
		{"request", "delete", "cache_type", "smtpd", "cache_id", "b"},                         // absent: not a delete
		{"request", "seed", "size", "32"},                                                     // seed 32
		{"request", "seed", "size", "100"},                                                    // seed 132
		{"request", "seed", "size", "0"},                                                      // refused: not counted
		{"request", "tktkey", "keyname", ""},                                                  // issued 1
		{"request", "tktkey", "keyname", ""},                                                  // the same key
		{"request", "tktkey", "keyname", b64("0123456789abcdef")},                             // not found
	} {
		c.req(req...)
	}
	name := s.srv.keys.current().name
	c.req("request", "tktkey", "keyname", b64(string(name[:]))) // found

	clock = clock.Add(3601 * time.Second)
	c.req("request", "lookup", "cache_type", "smtpd", "cache_id", "a") // miss, expired at lookup
	clock = clock.Add(time.Second)
	if _, err := st.sweepExpired(st.caches["smtpd"], nil); err != nil { // c: expired by sweep
		t.Fatal(err)
	}
	if err := st.saveCounters(); err != nil {
		t.Fatal(err)
	}
	var got [11]int64
	var hitRatio float64
	err := asAdmin(t, st).QueryRow(`SELECT lookups, hits, misses, hit_ratio, expired, stores, replaced, deletes, evictions, store_failures,
		(SELECT value FROM counters WHERE scope = 'smtpd' AND name = 'expired_at_lookup'),
		(SELECT value FROM counters WHERE scope = 'smtpd' AND name = 'expired_by_sweep')
		FROM cache_counters WHERE cache = 'smtpd'`).Scan(&got[0], &got[1], &got[2], &hitRatio, &got[3], &got[4], &got[5], &got[6], &got[7], &got[8], &got[9], &got[10])
	if err != nil {
		t.Fatal(err)
	}
	//                lookups hits misses expired stores replaced deletes evictions failures atLookup bySweep
	want := [11]int64{4, 2, 2, 2, 3, 1, 1, 0, 0, 1, 1}
	if got != want || hitRatio != 0.5 {
		t.Errorf("smtpd counters %v hit ratio %v, want %v 0.5", got, hitRatio, want)
	}
	service := map[string]int64{}
	rows, _ := asAdmin(t, st).Query("SELECT scope || '.' || name, value FROM statistics WHERE scope IN ('tktkey', 'seed')")
	for rows.Next() {
		var n string
		var v int64
		rows.Scan(&n, &v)
		service[n] = v
	}
	rows.Close()
	for name, want := range map[string]int64{"tktkey.keys_issued": 1, "tktkey.found": 1, "tktkey.not_found": 1, "seed.requests": 2, "seed.bytes": 132} {
		if service[name] != want {
			t.Errorf("%s = %d, want %d", name, service[name], want)
		}
	}

	var out bytes.Buffer
	if err := printStatistics(&out, st.reader); err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{
		`(?m)^ +smtpd +0 +0 +4 +2 +2 +50\.0% +2 +3 +1 +1 +0 +0 *$`,
		`(?m)^ +lmtp +0 +0 +0 +0 +0 +- +0`,
		`ticket keys: 1 issued, 1 found by name, 1 not found`,
		`seed: 2 requests, 132 bytes`,
	} {
		if !regexp.MustCompile(line).MatchString(out.String()) {
			t.Errorf("tlsmgr -stats lacks %s:\n%s", line, out.String())
		}
	}
}

// The periodic log line, when asked for, and never a secret in it.
func TestStatisticsLogLine(t *testing.T) {
	s := startServer(t, allCaches(3600))
	c := dial(t, s.sock)
	c.req("request", "update", "cache_type", "smtp", "cache_id", "dest", "session", b64("secret-session"))
	c.req("request", "lookup", "cache_type", "smtp", "cache_id", "dest")
	logged := captureLog(t)
	s.srv.store.logStatistics()
	for _, want := range []string{
		"statistics: smtp cache: 1 entries, 14 bytes; 1 lookups, 1 hits (100.0%), 0 misses",
		"statistics: smtpd cache: 0 entries",
		"statistics: ticket keys: 0 issued",
	} {
		if !strings.Contains(logged(), want) {
			t.Errorf("log lacks %q:\n%s", want, logged())
		}
	}
	if strings.Contains(logged(), "lmtp") || strings.Contains(logged(), "secret") {
		t.Errorf("a disabled cache or a session in the log:\n%s", logged())
	}
}

// tlsmgr -stats reads a database without sqlite3, and says why it cannot.
func TestStatsCommand(t *testing.T) {
	bin := tlsmgrBinary(t)
	dir := t.TempDir()
	st := keptStore(t, filepath.Join(dir, "tlsmgr.sqlite"), false, false, allCaches(3600))
	st.update(st.caches["smtp"], "dest", []byte("x"))
	st.saveCounters()
	st.close()
	user := asNobody(t, dir) // as root, -stats reads as the database's owner, never as root
	out, err := exec.Command(bin, append(user, "-stats", "-data", dir)...).CombinedOutput()
	if err != nil || !regexp.MustCompile(`(?m)^ +smtp +1 +1 +0 +0 +0 +- +0 +1 `).Match(out) {
		t.Errorf("tlsmgr -stats: %v\n%s", err, out)
	}
	out, err = exec.Command(bin, append(user, "-stats", "-data", filepath.Join(dir, "nowhere"))...).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "tlsmgr: ERROR: session cache database "+filepath.Join(dir, "nowhere", "tlsmgr.sqlite")+": no such file") {
		t.Errorf("tlsmgr -stats on a missing database: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "nowhere")); err == nil {
		t.Error("-stats created the data directory")
	}
}
