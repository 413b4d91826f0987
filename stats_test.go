package main

import (
	"bytes"
	"encoding/json"
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
	snap, err := readStatsDB(st.reader)
	if err != nil {
		t.Fatal(err)
	}
	if err := writeStatsTable(&out, snap); err != nil {
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

// -stats right after a store shows the store: it asks the running daemon
// (tlsmgr_stats) instead of reading counters written up to 5 s ago; it
// falls back to the database when no daemon answers. Every format.
func TestStatsFromTheRunningDaemon(t *testing.T) {
	s := newStandalone(t)
	s.start()
	c, _ := s.dialWithin(5 * time.Second)
	if got := c.req("request", "update", "cache_type", "smtp", "cache_id", "id1", "session", b64("hello")); got != "status=0" {
		t.Fatalf("update: %s", got)
	}
	stats := func(format string) string {
		t.Helper()
		out, err := exec.Command(tlsmgrBinary(t), "-stats", "-format", format, "-socket", s.sock, "-data", s.data,
			"-user", s.owner).CombinedOutput()
		if err != nil {
			t.Fatalf("-stats -format %s: %v\n%s", format, err, out)
		}
		return string(out)
	}
	table := stats("table")
	if !strings.Contains(table, "from the running tlsmgr") || !regexp.MustCompile(`(?m)^ +smtp +1 +5 +0 +0 +0 +- +0 +1 `).MatchString(table) {
		t.Errorf("-stats right after a store:\n%s", table)
	}
	om := stats("openmetrics")
	for _, want := range []string{
		"# TYPE tlsmgr_cache_stores_total counter\n", `tlsmgr_cache_stores_total{cache="smtp"} 1` + "\n",
		"# HELP tlsmgr_cache_entries ", `tlsmgr_cache_entries{cache="smtp"} 1` + "\n", "tlsmgr_stats_live 1\n",
		"# TYPE tlsmgr_seed_bytes_total counter\n",
	} {
		if !strings.Contains(om, want) {
			t.Errorf("openmetrics lacks %q:\n%s", want, om)
		}
	}
	var js struct {
		Live   bool `json:"live"`
		Caches map[string]struct {
			Entries  int64            `json:"entries"`
			Counters map[string]int64 `json:"counters"`
		} `json:"caches"`
	}
	if err := json.Unmarshal([]byte(stats("json")), &js); err != nil || !js.Live || js.Caches["smtp"].Counters["stores"] != 1 || js.Caches["smtp"].Entries != 1 {
		t.Errorf("json: %v %+v", err, js)
	}
	s.stop()
	if table := stats("table"); strings.Contains(table, "running") || !regexp.MustCompile(`(?m)^ +smtp +1 +5 +0 +0 +0 +- +0 +1 `).MatchString(table) {
		t.Errorf("-stats after the daemon exited (from the database):\n%s", table)
	}
	if out, err := exec.Command(tlsmgrBinary(t), "-stats", "-format", "xml", "-data", s.data).CombinedOutput(); err == nil ||
		!strings.Contains(string(out), "-format xml: use table, openmetrics or json") {
		t.Errorf("-format xml: %v %s", err, out)
	}
}

// Only root and mail_owner may ask a running tlsmgr for its counters: the
// peer's credentials on the UNIX socket decide.
func TestStatsRequestRefusedToOthers(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOutsideCI(t, "needs root: a client of another uid")
	}
	s := startServer(t, allCaches(3600))
	if snap, err := askDaemonStats(s.sock); err != nil || !snap.live {
		t.Fatalf("root's request: %v", err)
	}
	os.Chmod(filepath.Dir(filepath.Dir(s.sock)), 0o755)
	os.Chmod(filepath.Dir(s.sock), 0o755)
	os.Chmod(s.sock, 0o777)
	logged := captureLog(t)
	script := `import socket,sys
s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5)
buf=b""
while buf.count(b"\0\0")<1: buf+=s.recv(4096)
s.sendall(b"request\0tlsmgr_stats\0\0")
rep=b""
while not rep.endswith(b"\0\0"): rep+=s.recv(4096)
print(rep.replace(b"\0", b" ").decode())`
	out, err := exec.Command("setpriv", "--reuid=1", "--regid=1", "--clear-groups", "/usr/bin/python3", "-c", script, s.sock).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "status 4294967294" { // -2, FAIL, as attr0 sends it
		t.Errorf("another uid's request: %v %q", err, out)
	}
	if !strings.Contains(logged(), "tlsmgr_stats request from uid 1") {
		t.Errorf("no warning: %s", logged())
	}
}
