package main

// Issue 21's fault tests: whoever has the postfix account plants files in
// data_directory, holds locks, and gives tlsmgr FIFOs; a remote server
// chooses certificate names. Each test runs the tlsmgr binary standalone
// (tlsmgrBinary: $TLSMGR_BINARY or a build of this tree) as root when the
// test runs as root, with mail_owner nobody, the way an administrator
// would: it must never let what nobody wrote reach root, never hang, and
// never print a control byte.

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"database/sql"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"
)

// standalone is a tlsmgr run by hand in its own directory: etc/main.cf
// names its mail_owner (nobody when the test is root), data/ is that
// user's, and the socket is in the directory. It uses no option that an
// older tlsmgr lacks, so that these tests run against one too.
type standalone struct {
	t               *testing.T
	dir, data, sock string
	cmd             *exec.Cmd
	log             *safeBuffer
	exited          chan struct{}
	uid, gid        int // mail_owner's
	owner           string
	extraMainCF     string
}

type safeBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *safeBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *safeBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func newStandalone(t *testing.T) *standalone {
	t.Helper()
	dir := t.TempDir()
	s := &standalone{t: t, dir: dir, data: filepath.Join(dir, "data"), sock: filepath.Join(dir, "tlsmgr.sock"),
		uid: os.Geteuid(), gid: os.Getegid()}
	if u, err := user.Current(); err == nil {
		s.owner = u.Username
	}
	if os.Geteuid() == 0 {
		s.uid, s.gid = nobody(t)
		s.owner = "nobody"
	}
	os.MkdirAll(filepath.Join(dir, "etc"), 0755)
	os.MkdirAll(s.data, 0700)
	s.writeMainCF("")
	asNobody(t, dir)
	os.Chown(filepath.Join(dir, "etc"), 0, 0)
	os.Chown(filepath.Join(dir, "etc", "main.cf"), 0, 0)
	return s
}

func (s *standalone) writeMainCF(more string) {
	writeFile(s.t, filepath.Join(s.dir, "etc"), "main.cf", "mail_owner = "+s.owner+"\ndata_directory = "+s.data+"\n"+more)
}

// start runs the daemon; stop (SIGTERM) is registered as cleanup.
func (s *standalone) start(args ...string) {
	s.t.Helper()
	s.log = &safeBuffer{}
	s.exited = make(chan struct{})
	s.cmd = exec.Command(tlsmgrBinary(s.t), append([]string{"-mailconfig", filepath.Join(s.dir, "etc"), "-listen", s.sock, "-data", s.data}, args...)...)
	s.cmd.Stderr = s.log
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	exited := s.exited
	go func() { s.cmd.Wait(); close(exited) }()
	cmd := s.cmd
	s.t.Cleanup(func() { cmd.Process.Kill(); <-exited })
}

func (s *standalone) stop() {
	s.t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		s.t.Fatalf("tlsmgr did not exit 10 s after SIGTERM:\n%s", s.log)
	}
}

// dialWithin connects and waits for the announcement, for at most limit
// from now; it returns the client and how long that took, or fails.
func (s *standalone) dialWithin(limit time.Duration) (*client, time.Duration) {
	s.t.Helper()
	start := time.Now()
	for time.Since(start) < limit {
		conn, err := net.Dial("unix", s.sock)
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		s.t.Cleanup(func() { conn.Close() })
		conn.SetDeadline(start.Add(limit))
		c := &client{t: s.t, conn: conn, r: &attrReader{br: bufio.NewReader(conn), streamName: "test"}}
		announce, err := readList(c.r)
		if err != nil || len(announce) != 1 || announce[0][1] != "tlsmgr_protocol" {
			s.t.Fatalf("no announcement within %v (%v); log:\n%s", limit, err, s.log)
		}
		return c, time.Since(start)
	}
	s.t.Fatalf("cannot connect within %v; log:\n%s", limit, s.log)
	return nil, 0
}

// askTimed sends one request and returns the reply and how long it took; a
// reply that takes longer than limit fails the test.
func askTimed(t *testing.T, c *client, limit time.Duration, pairs ...string) (string, time.Duration) {
	t.Helper()
	var b strings.Builder
	for _, p := range pairs {
		b.WriteString(p)
		b.WriteByte(0)
	}
	b.WriteByte(0)
	start := time.Now()
	c.conn.SetDeadline(start.Add(limit))
	if _, err := c.conn.Write([]byte(b.String())); err != nil {
		t.Fatalf("%v: %v", pairs, err)
	}
	list, err := readList(c.r)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("%v: no reply within %v: %v", pairs, limit, err)
	}
	var out []string
	for _, kv := range list {
		out = append(out, kv[0]+"="+kv[1])
	}
	return strings.Join(out, " "), took
}

// holdDatabase is another process's write transaction on the database,
// held until the connection is rolled back (or the test ends).
func (s *standalone) holdDatabase() *sql.Conn {
	s.t.Helper()
	h, err := sql.Open("sqlite", "file:"+filepath.Join(s.data, "tlsmgr.sqlite")+"?_pragma=busy_timeout(10000)")
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { h.Close() })
	conn, err := h.Conn(s.t.Context())
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { conn.Close() })
	for _, q := range []string{"BEGIN IMMEDIATE", "INSERT INTO counters VALUES ('outside', 'writer', 1)"} {
		if _, err := conn.ExecContext(s.t.Context(), q); err != nil {
			s.t.Fatalf("%s: %v", q, err)
		}
	}
	return conn
}

// keepRows adds n unexpired 600-byte sessions, the oldest first, to the
// smtpd cache of the stopped daemon's database, as a previous tlsmgr with
// tlsmgr_keep_sessions would have left them, and returns its path.
func (s *standalone) keepRows(n int) string {
	s.t.Helper()
	db := filepath.Join(s.data, "tlsmgr.sqlite")
	h, err := sql.Open("sqlite", db)
	if err != nil {
		s.t.Fatal(err)
	}
	h.SetMaxOpenConns(1)
	tx, err := h.Begin()
	if err != nil {
		s.t.Fatal(err)
	}
	session := bytes.Repeat([]byte{0x5a}, 600)
	now := time.Now().Unix()
	for i := range n {
		id := fmt.Sprintf("kept-%d", i)
		if _, err := tx.Exec("INSERT INTO smtpd_cache (hash, id, session, stored, expires) VALUES (?, ?, ?, ?, ?)",
			rowKey(id), id, session, now-int64(n-i), now+3000); err != nil {
			s.t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		s.t.Fatal(err)
	}
	h.Exec("PRAGMA wal_checkpoint(TRUNCATE)")
	h.Close()
	s.give(db, db+"-wal", db+"-shm")
	return db
}

// give makes files the mail_owner's, as if that user had written them.
func (s *standalone) give(paths ...string) {
	for _, p := range paths {
		os.Chown(p, s.uid, s.gid)
	}
}

// uids is the daemon's real, effective and saved uid, from /proc.
func (s *standalone) uids() []int {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		s.t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 4 && f[0] == "Uid:" {
			var ids []int
			for _, v := range f[1:4] {
				n, _ := strconv.Atoi(v)
				ids = append(ids, n)
			}
			return ids
		}
	}
	s.t.Fatal("no Uid line in /proc status")
	return nil
}

// plant makes db a database of schema.sql, changed by the statements in
// change, with user_version set to version, as mail_owner would leave it.
func plant(t *testing.T, db string, version int, change ...string) {
	t.Helper()
	for _, suffix := range []string{"", "-wal", "-shm", "-journal"} {
		os.Remove(db + suffix)
	}
	h, err := sql.Open("sqlite", db)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	h.SetMaxOpenConns(1)
	schema := schemaSQL
	if version == schemaVersion-1 { // as that version made it, so that only change differs
		b, err := os.ReadFile("testdata/schema-v4.sql")
		if err != nil {
			t.Fatal(err)
		}
		schema = string(b)
	}
	for _, q := range append(append([]string{"PRAGMA journal_mode = WAL", schema}, change...), fmt.Sprintf("PRAGMA user_version = %d", version), "PRAGMA wal_checkpoint(TRUNCATE)") {
		if _, err := h.Exec(q); err != nil {
			t.Fatalf("plant %s: %v", q, err)
		}
	}
}

// plantedVersions: older tlsmgrs (schema versions 3 and 4) continued a kept
// database of their own version, and version 4's is brought up to this
// one, so the planted file is tried as each.
var plantedVersions = []int{3, 4, schemaVersion}

// A kept database whose ticket_keys is a view that never ends: tlsmgr with
// tlsmgr_keep_ticket_keys read it as root, before its watchdog ran, and hung
// there forever. Now no SQL runs before the drop, and the file's schema is
// not ours, so it is emptied unread: tktkey is served at once, by a process
// none of whose uids is root's.
func TestPlantedEndlessView(t *testing.T) {
	for _, version := range plantedVersions {
		t.Run(fmt.Sprintf("schema version %d", version), func(t *testing.T) {
			s := newStandalone(t)
			db := filepath.Join(s.data, "tlsmgr.sqlite")
			plant(t, db, version,
				"DROP VIEW ticket_key_names", "DROP TABLE ticket_keys",
				`CREATE VIEW ticket_keys AS WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r)
				 SELECT n AS slot, zeroblob(16) AS name, zeroblob(32) AS cipher_key, zeroblob(32) AS hmac_key, n AS tout FROM r`)
			s.give(db, db+"-wal", db+"-shm")
			s.start("-o", "tlsmgr_keep_ticket_keys=yes")
			c, _ := s.dialWithin(10 * time.Second)
			if reply, took := askTimed(t, c, 10*time.Second, "request", "tktkey", "keyname", ""); !strings.HasPrefix(reply, "status=0 keybuf=") {
				t.Errorf("tktkey: %q after %v", reply, took)
			}
			if os.Geteuid() == 0 {
				for _, id := range s.uids() {
					if id == 0 {
						t.Errorf("the daemon kept uid 0: %v", s.uids())
					}
				}
			}
			// The database is opened beside serving: the warning may follow the reply.
			for start := time.Now(); !strings.Contains(s.log.String(), "emptied it and started a new one"); time.Sleep(10 * time.Millisecond) {
				if time.Since(start) > 10*time.Second {
					t.Fatalf("no warning that the planted database was emptied:\n%s", s.log)
				}
			}
		})
	}
}

// A kept database with a trigger that writes a marker row when tlsmgr
// deletes the ticket keys it does not keep (tlsmgr_keep_sessions alone):
// the trigger ran as root, with euid postfix and saved uid 0. Now the
// schema is not ours, so nothing runs on the file and the marker never
// appears.
func TestPlantedTrigger(t *testing.T) {
	for _, version := range plantedVersions {
		t.Run(fmt.Sprintf("schema version %d", version), func(t *testing.T) {
			s := newStandalone(t)
			db := filepath.Join(s.data, "tlsmgr.sqlite")
			plant(t, db, version,
				"CREATE TABLE marker (what TEXT)",
				"CREATE TRIGGER planted_keys AFTER DELETE ON ticket_keys BEGIN INSERT INTO marker VALUES ('ticket_keys'); END",
				"CREATE TRIGGER planted_smtpd AFTER DELETE ON smtpd_cache BEGIN INSERT INTO marker VALUES ('smtpd_cache'); END",
				"CREATE TRIGGER planted_counters AFTER INSERT ON counters BEGIN INSERT INTO marker VALUES ('counters'); END",
				"INSERT INTO ticket_keys VALUES (0, zeroblob(16), zeroblob(32), zeroblob(32), 0)",
				"INSERT INTO smtpd_cache (hash, id, session, stored, expires) VALUES (1, 'a', x'00', 0, 0)")
			s.give(db, db+"-wal", db+"-shm")
			s.start("-o", "tlsmgr_keep_sessions=yes")
			c, _ := s.dialWithin(10 * time.Second)
			askTimed(t, c, 10*time.Second, "request", "update", "cache_type", "smtpd", "cache_id", "x", "session", b64("y"))
			s.stop()
			h, err := sql.Open("sqlite", "file:"+db+"?mode=ro")
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			var ran []string
			if rows, err := h.Query("SELECT what FROM marker"); err == nil {
				for rows.Next() {
					var what string
					rows.Scan(&what)
					ran = append(ran, what)
				}
				rows.Close()
			}
			if len(ran) > 0 {
				t.Errorf("the planted triggers ran: %v", ran)
			}
		})
	}
}

// TestRenameRacer is not a test: TestRenameRaceAtCreation runs the test
// binary as mail_owner to race, with TLSMGR_RACE=DIR. It renames fresh
// copies of DIR/planted over DIR/data/tlsmgr.sqlite as fast as it can,
// keeping each copy under a second name in DIR/copies (1024 at a time, each
// compared with the original before it is reused, so that none is lost
// unchecked), until DIR/stop exists. A copy found changed is recorded in
// DIR/changed.
func TestRenameRacer(t *testing.T) {
	dir := os.Getenv("TLSMGR_RACE")
	if dir == "" {
		t.Skip("run by TestRenameRaceAtCreation")
	}
	planted, err := os.ReadFile(filepath.Join(dir, "planted"))
	if err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "data", "tlsmgr.sqlite")
	checkCopy := func(path string) {
		if b, err := os.ReadFile(path); err == nil && !bytes.Equal(b, planted) {
			os.WriteFile(filepath.Join(dir, "changed"), []byte(path), 0644)
		}
	}
	for i := 0; ; i++ {
		if i%256 == 0 {
			if _, err := os.Stat(filepath.Join(dir, "stop")); err == nil {
				break
			}
		}
		keep := filepath.Join(dir, "copies", strconv.Itoa(i%1024))
		checkCopy(keep)
		os.Remove(keep)
		if os.WriteFile(keep, planted, 0600) != nil {
			continue
		}
		tmp := filepath.Join(dir, "data", ".planted")
		if os.Link(keep, tmp) == nil {
			os.Rename(tmp, target)
		}
	}
	for i := range 1024 {
		checkCopy(filepath.Join(dir, "copies", strconv.Itoa(i)))
	}
}

// The rename race: mail_owner swaps planted files in over the database
// name while tlsmgr starts, 50 times. SQLite opened the name after tlsmgr
// had created it, and ran statements on whatever was there. Now SQLite
// never opens a name: no statement ever runs on a planted file (each one
// is compared, byte for byte, with what was planted), and every start
// serves.
func TestRenameRaceAtCreation(t *testing.T) {
	s := newStandalone(t)
	race := s.dir
	os.MkdirAll(filepath.Join(race, "copies"), 0755)
	planted := filepath.Join(race, "planted")
	plant(t, planted, 0, "PRAGMA journal_mode = DELETE", "CREATE TABLE planted (x)")
	os.Remove(planted + "-wal")
	os.Remove(planted + "-shm")
	s.give(race, filepath.Join(race, "copies"), planted)
	self, err := os.ReadFile(os.Args[0]) // the test binary, where mail_owner can run it
	if err != nil {
		t.Fatal(err)
	}
	racerBin := filepath.Join(race, "racer.test")
	if err := os.WriteFile(racerBin, self, 0755); err != nil {
		t.Fatal(err)
	}
	racer := exec.Command(racerBin, "-test.run=^TestRenameRacer$", "-test.count=1")
	racer.Env = append(os.Environ(), "TLSMGR_RACE="+race)
	if os.Geteuid() == 0 {
		racer.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(s.uid), Gid: uint32(s.gid)}}
	}
	var racerOut safeBuffer
	racer.Stdout, racer.Stderr = &racerOut, &racerOut
	if err := racer.Start(); err != nil {
		t.Fatal(err)
	}
	racerDone := make(chan error, 1)
	go func() { racerDone <- racer.Wait() }()
	defer func() {
		os.WriteFile(filepath.Join(race, "stop"), nil, 0644)
		if err := <-racerDone; err != nil {
			t.Errorf("the racer: %v\n%s", err, racerOut.String())
		}
		if changed, err := os.ReadFile(filepath.Join(race, "changed")); err == nil {
			t.Errorf("a statement ran on a planted file: %s changed", changed)
		}
	}()
	for i := range 50 {
		s.start()
		c, _ := s.dialWithin(10 * time.Second)
		if reply, _ := askTimed(t, c, 10*time.Second, "request", "seed", "size", "32"); !strings.HasPrefix(reply, "status=0 seed=") {
			t.Fatalf("start %d: seed: %q\n%s", i, reply, s.log)
		}
		if strings.Contains(s.log.String(), "replaced while tlsmgr opened it") {
			t.Errorf("start %d: SQLite opened a file that replaced ours:\n%s", i, s.log)
		}
		s.stop()
	}
}

// tlsmgr -stats as root on planted databases: one whose views return
// terminal escape sequences (-stats ran the file's views and printed what
// they returned), and one of our exact schema whose rows hold them. Not a
// control byte may reach the terminal, on stdout or stderr.
func TestStatsOnPlantedDatabase(t *testing.T) {
	const esc = "\x1b]0;owned\x07\x1b[2J\x9b31m"
	for _, tc := range []struct {
		name   string
		change []string
	}{
		{"views that return escape sequences", []string{
			"DROP VIEW ticket_key_names",
			"CREATE VIEW ticket_key_names AS SELECT 'current' AS key, '" + esc + "' AS name, '" + esc + "' AS issues_until",
			"DROP VIEW cache_counters",
			"CREATE VIEW cache_counters AS SELECT '" + esc + "' AS cache, 1 AS lookups, 1 AS hits, 0 AS misses, 1.0 AS hit_ratio, 0 AS expired, 0 AS stores, 0 AS replaced, 0 AS deletes, 0 AS evictions, 0 AS store_failures, '" + esc + "' AS since",
			"DROP VIEW cache_stats",
			"CREATE VIEW cache_stats AS SELECT '" + esc + "' AS cache, 1 AS entries, 1 AS bytes, 0 AS oldest, 0 AS newest",
		}},
		{"our schema, rows that hold escape sequences", []string{
			"INSERT INTO ticket_keys VALUES (0, '" + esc + "', zeroblob(32), zeroblob(32), '" + esc + "')",
			"INSERT INTO counters VALUES ('smtpd', 'lookups', '" + esc + "'), ('" + esc + "', '" + esc + "', 7)",
			"INSERT INTO counters_period VALUES (1, '" + esc + "', '" + esc + "')",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStandalone(t)
			db := filepath.Join(s.data, "tlsmgr.sqlite")
			plant(t, db, schemaVersion, tc.change...)
			s.give(db, db+"-wal", db+"-shm")
			var stdout, stderr bytes.Buffer
			cmd := exec.Command(tlsmgrBinary(t), "-stats", "-mailconfig", filepath.Join(s.dir, "etc"))
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			for name, out := range map[string][]byte{"stdout": stdout.Bytes(), "stderr": stderr.Bytes()} {
				if i := controlByte(out); i >= 0 {
					t.Errorf("%s has a control byte 0x%02x at %d (%v):\n%q", name, out[i], i, err, out)
				}
			}
			t.Logf("exit %v\n%s%s", err, stdout.String(), stderr.String())
		})
	}
}

// controlByte is the index of the first byte a terminal might act on: a
// control character (C0 but newline and tab, DEL, C1) or a byte that is
// not UTF-8 (0x9b alone is CSI to an 8-bit terminal); -1 if none.
func controlByte(b []byte) int {
	for i := 0; i < len(b); {
		r, size := utf8.DecodeRune(b[i:])
		switch {
		case r == '\n' || r == '\t':
		case r == utf8.RuneError && size <= 1, r < 0x20, r >= 0x7f && r <= 0x9f:
			return i
		}
		i += size
	}
	return -1
}

// A remote server's certificate whose subject and issuer hold ESC and BEL,
// and an SNI with them: the sessions view shows them escaped, as
// schema.sql says (\HH in names, \xHH in the SNI).
func TestPeerNamesEscaped(t *testing.T) {
	name := "mx\x1b[31m.example\x07"
	blob := sessionWithPeer(t, pkix.Name{CommonName: name, Organization: []string{"Evil\x1b]0;x\x07 Inc"}}, "sni\x1b[2J.example")
	info, err := decodeSession(blob)
	if err != nil || info.peer == nil {
		t.Fatalf("decode: %v", err)
	}
	if want := `CN=mx\1b[31m.example\07,O=Evil\1b]0\;x\07 Inc`; info.peer.subject != want || info.peer.issuer != want {
		t.Errorf("subject %q, issuer %q, want %q", info.peer.subject, info.peer.issuer, want)
	}
	if want := `sni\x1b[2J.example`; info.sni != want {
		t.Errorf("sni %q, want %q", info.sni, want)
	}
	st, err := openStore(filepath.Join(t.TempDir(), "tlsmgr.sqlite"), allCaches(3600), 16)
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	if st.update(st.caches["smtp"], "dest", blob) != statOK {
		t.Fatal("update")
	}
	var subject, issuer, sni string
	if err := asAdmin(t, st).QueryRow("SELECT peer_subject, peer_issuer, sni FROM sessions WHERE cache = 'smtp'").Scan(&subject, &issuer, &sni); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{subject, issuer, sni} {
		if i := controlByte([]byte(v)); i >= 0 {
			t.Errorf("the sessions view shows a control byte: %q", v)
		}
	}
}

// sessionWithPeer is an i2d_SSL_SESSION-shaped blob (TLS 1.3) whose peer
// certificate has subject (and, self-signed, issuer) name, with sni.
func sessionWithPeer(t *testing.T, name pkix.Name, sni string) []byte {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: name, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	type session struct {
		Version, SSLVersion int64
		Cipher, SessionID   []byte
		MasterKey           []byte
		Time                int64         `asn1:"explicit,tag:1"`
		Timeout             int64         `asn1:"explicit,tag:2"`
		Peer                asn1.RawValue // [3] EXPLICIT Certificate, built below
		Hostname            []byte        `asn1:"explicit,tag:6"`
	}
	blob, err := asn1.Marshal(session{Version: 1, SSLVersion: 0x0304, Cipher: []byte{0x13, 0x02}, SessionID: make([]byte, 32),
		MasterKey: make([]byte, 48), Time: time.Now().Unix(), Timeout: 7200, Peer: asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 3, IsCompound: true, Bytes: der}, Hostname: []byte(sni)})
	if err != nil {
		t.Fatal(err)
	}
	return blob
}

// An outside process holds the database (a write transaction) for 20 s,
// with tlsmgr_keep_ticket_keys on: tktkey held the key lock across the
// database write and waited for busy_timeout, 10 s a request. Seeds and
// ticket keys never touch the database now: every reply comes within 100
// ms.
func TestOutsideWriterHoldsDatabase(t *testing.T) {
	s := newStandalone(t)
	s.start("-o", "tlsmgr_keep_ticket_keys=yes", "-o", "smtpd_tls_session_cache_timeout=120s")
	c, _ := s.dialWithin(10 * time.Second)
	if reply, _ := askTimed(t, c, 5*time.Second, "request", "update", "cache_type", "smtpd", "cache_id", "x", "session", b64("y")); reply != "status=0" {
		t.Fatalf("update: %q", reply) // and the database is open
	}
	conn := s.holdDatabase()
	var worst time.Duration
	var worstReq string
	for start := time.Now(); time.Since(start) < 20*time.Second; {
		for _, req := range [][]string{
			{"request", "tktkey", "keyname", ""},
			{"request", "seed", "size", "32"},
		} {
			reply, took := askTimed(t, c, 15*time.Second, req...)
			if !strings.HasPrefix(reply, "status=0 ") {
				t.Fatalf("%v: %q", req, reply)
			}
			if took > worst {
				worst, worstReq = took, req[1]
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn.ExecContext(t.Context(), "ROLLBACK")
	t.Logf("slowest reply while the database was held for 20 s: %s, %v", worstReq, worst)
	if worst > 100*time.Millisecond {
		t.Errorf("a %s reply took %v while another process held the database", worstReq, worst)
	}
}

// The same at start: another process holds the database while tlsmgr
// starts with kept ticket keys. Seeds and ticket keys are served at once
// (the old start waited 20 s: busy_timeout on a DELETE, then on a
// checkpoint, and then ran without caching); once the database is free,
// it opens, and the kept key still decrypts its tickets.
func TestOutsideWriterAtStart(t *testing.T) {
	s := newStandalone(t)
	s.start("-o", "tlsmgr_keep_ticket_keys=yes")
	c, _ := s.dialWithin(10 * time.Second)
	reply, _ := askTimed(t, c, 5*time.Second, "request", "tktkey", "keyname", "")
	kept := keyName(t, reply)
	s.stop()

	conn := s.holdDatabase()
	held := time.Now()
	s.start("-o", "tlsmgr_keep_ticket_keys=yes")
	c, _ = s.dialWithin(5 * time.Second)
	for _, req := range [][]string{{"request", "seed", "size", "32"}, {"request", "tktkey", "keyname", ""}} {
		if reply, took := askTimed(t, c, 5*time.Second, req...); !strings.HasPrefix(reply, "status=0 ") || took > 100*time.Millisecond {
			t.Errorf("%s while the database is held at start: %q after %v", req[1], reply, took)
		}
	}
	time.Sleep(3*time.Second - time.Since(held))
	conn.ExecContext(t.Context(), "ROLLBACK")
	for start := time.Now(); ; time.Sleep(50 * time.Millisecond) {
		reply, _ := askTimed(t, c, 5*time.Second, "request", "tktkey", "keyname", b64hex(t, kept))
		if keyName(t, reply) == kept {
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("the kept key is not found 10 s after the database was let go: %q\n%s", reply, s.log)
		}
	}
}

// A kept key is found by the first request after a restart, even while
// the database, large enough to take a while to check, is still being
// opened beside serving: ticket-key requests wait for the kept keys (a
// second at most). Otherwise a TLS 1.3 ticket from before postfix reload
// would not resume.
func TestKeptKeyFoundAtOnce(t *testing.T) {
	s := newStandalone(t)
	args := []string{"-o", "tlsmgr_keep_ticket_keys=yes", "-o", "tlsmgr_keep_sessions=yes"}
	s.start(args...)
	c, _ := s.dialWithin(10 * time.Second)
	reply, _ := askTimed(t, c, 5*time.Second, "request", "tktkey", "keyname", "")
	kept := keyName(t, reply)
	s.stop()
	s.keepRows(20000)
	for i := range 3 {
		s.start(args...)
		c, _ = s.dialWithin(10 * time.Second)
		if reply, took := askTimed(t, c, 5*time.Second, "request", "tktkey", "keyname", b64hex(t, kept)); keyName(t, reply) != kept {
			t.Errorf("start %d: the first request, for the kept key, got %q after %v", i, reply, took)
		}
		s.stop()
	}
}

// keyName is the hex name in a tktkey reply, or "".
func keyName(t *testing.T, reply string) string {
	t.Helper()
	b64 := strings.TrimPrefix(reply, "status=0 keybuf=")
	if b64 == reply {
		return ""
	}
	b, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(b) != ticketKeyLen {
		t.Fatalf("keybuf %q: %v", b64, err)
	}
	return hex.EncodeToString(b[:ticketNameLen])
}

func b64hex(t *testing.T, h string) string {
	b, err := hex.DecodeString(h)
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(b)
}

// Whoever has the postfix account adds triggers to the database while
// tlsmgr runs: one that writes a marker row, one with a query that never
// ends, one that deletes every row. tlsmgr's connections run nothing a
// trigger defines: a write that would fire one is refused ("not
// authorized"), so every request is answered at once, the marker never
// appears, and no session is deleted by the triggers.
func TestTriggerAddedWhileRunning(t *testing.T) {
	s := newStandalone(t)
	s.start()
	c, _ := s.dialWithin(10 * time.Second)
	askTimed(t, c, 5*time.Second, "request", "update", "cache_type", "smtpd", "cache_id", "before", "session", b64("x"))
	db := filepath.Join(s.data, "tlsmgr.sqlite")
	h, err := sql.Open("sqlite", "file:"+db+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for _, q := range []string{
		"CREATE TABLE marker (what TEXT)",
		"CREATE TRIGGER planted AFTER INSERT ON smtpd_cache BEGIN INSERT INTO marker VALUES ('insert'); END",
		`CREATE TRIGGER endless AFTER UPDATE ON smtpd_cache BEGIN
		   INSERT INTO marker WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT 'update ' || n FROM r; END`,
		"CREATE TRIGGER deleted AFTER DELETE ON smtpd_cache BEGIN INSERT INTO marker VALUES ('delete'); END",
		"CREATE TRIGGER wipe AFTER INSERT ON smtp_cache BEGIN DELETE FROM smtp_cache WHERE (SELECT 1) = 1; DELETE FROM ticket_keys; END",
	} {
		if _, err := h.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	for i, req := range [][]string{
		{"request", "update", "cache_type", "smtpd", "cache_id", "new", "session", b64("y")},
		{"request", "update", "cache_type", "smtpd", "cache_id", "before", "session", b64("z")},
		{"request", "delete", "cache_type", "smtpd", "cache_id", "before"},
		{"request", "update", "cache_type", "smtp", "cache_id", "dest", "session", b64("w")},
		{"request", "lookup", "cache_type", "smtpd", "cache_id", "before"},
		{"request", "seed", "size", "32"},
	} {
		if reply, took := askTimed(t, c, 10*time.Second, req...); took > time.Second || strings.HasPrefix(reply, "status=4294967294") {
			t.Errorf("request %d after the triggers were planted: %q after %v", i, reply, took)
		}
	}
	var n, before int
	if err := h.QueryRow("SELECT count(*) FROM marker").Scan(&n); err != nil || n != 0 {
		t.Errorf("a planted trigger ran: %d marker rows (%v)", n, err)
	}
	if h.QueryRow("SELECT count(*) FROM smtpd_cache WHERE id = 'before'").Scan(&before); before != 1 {
		t.Error("the session stored before the triggers is gone")
	}
	if !strings.Contains(s.log.String(), "not authorized") {
		t.Errorf("no warning that a write was refused:\n%s", s.log)
	}
}

// A lock held on the exchange file by another process, and a FIFO as
// tls_random_source (nobody writing, or a writer that never writes): each
// blocked start-up for good, or for the 10 s of a source read. Start-up
// now serves within 5 s in each case.
func TestNothingBlocksStartup(t *testing.T) {
	t.Run("held lock on prng_exch", func(t *testing.T) {
		s := newStandalone(t)
		exch := filepath.Join(s.data, "prng_exch")
		f, err := os.OpenFile(exch, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0600)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		f.Write(make([]byte, exchangeFileSize))
		s.give(exch)
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
			t.Fatal(err)
		}
		s.start()
		c, took := s.dialWithin(5 * time.Second)
		reply, _ := askTimed(t, c, 5*time.Second-took, "request", "seed", "size", "32")
		if !strings.HasPrefix(reply, "status=0 seed=") {
			t.Errorf("seed: %q", reply)
		}
	})
	for _, writer := range []bool{false, true} {
		t.Run(fmt.Sprintf("FIFO as tls_random_source, a writer that never writes: %v", writer), func(t *testing.T) {
			s := newStandalone(t)
			fifo := filepath.Join(s.dir, "fifo")
			if err := syscall.Mkfifo(fifo, 0600); err != nil {
				t.Fatal(err)
			}
			if writer {
				w, err := os.OpenFile(fifo, os.O_RDWR, 0) // never writes, and keeps a writer on it
				if err != nil {
					t.Fatal(err)
				}
				defer w.Close()
			}
			s.start("-o", "tls_random_source=dev:"+fifo)
			c, took := s.dialWithin(5 * time.Second)
			reply, _ := askTimed(t, c, 5*time.Second-took, "request", "seed", "size", "32")
			if !strings.HasPrefix(reply, "status=0 seed=") {
				t.Errorf("seed: %q", reply)
			}
		})
	}
}

// A kept cache of 40,000 sessions, and tlsmgr started with its entry limit
// lowered to 1,000: the old start deleted the 39,000 in one transaction
// (3.3 s) before it served anyone. Now they go in sweep batches beside the
// clients. The first update stored after the start comes no later than
// after a start on the same file with the limit not lowered, and no update
// waits for more than one batch. (One batch of 16 rows takes a few ms; 300 ms is
// a bound for a loaded machine and a -race build, a tenth of the one
// transaction.)
func TestLoweredLimitOnKeptCache(t *testing.T) {
	const bound = 300 * time.Millisecond
	s := newStandalone(t)
	s.start("-o", "tlsmgr_keep_sessions=yes")
	c, _ := s.dialWithin(10 * time.Second)
	askTimed(t, c, 5*time.Second, "request", "update", "cache_type", "smtpd", "cache_id", "first", "session", b64("x"))
	s.stop()
	db := s.keepRows(40000)

	// From the start to the first update that is stored (until the
	// database is open, one is answered -1, not stored, within a second).
	firstUpdate := func(args ...string) (*client, time.Duration) {
		start := time.Now()
		s.start(append([]string{"-o", "tlsmgr_keep_sessions=yes"}, args...)...)
		c, _ := s.dialWithin(30 * time.Second)
		for {
			reply, _ := askTimed(t, c, 30*time.Second, "request", "update", "cache_type", "smtpd", "cache_id", "start", "session", b64("y"))
			if reply == "status=0" {
				return c, time.Since(start)
			}
			if reply != "status=4294967295" || time.Since(start) > 60*time.Second {
				t.Fatalf("update: %q after %v", reply, time.Since(start))
			}
		}
	}
	// The faster of two starts, for each: a start varies by some 100 ms
	// here, and by more under -race.
	unlowered := time.Hour
	for range 2 {
		_, took := firstUpdate()
		s.stop()
		unlowered = min(unlowered, took)
	}
	c, lowered := firstUpdate("-o", "tlsmgr_smtpd_session_cache_entry_limit=1000")
	t.Logf("from the start to the first update: %v with the limit lowered, %v without", lowered, unlowered)
	if margin := max(bound, unlowered/2); lowered > unlowered+margin {
		t.Errorf("the first update came %v later with the limit lowered (more than %v): the start waited for evictions", lowered-unlowered, margin)
	}

	rows := func() (n int) {
		r, err := sql.Open("sqlite", "file:"+db+"?mode=ro")
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		r.QueryRow("SELECT count(*) FROM smtpd_cache").Scan(&n)
		return n
	}
	var worst time.Duration
	updates := 0
	deadline := time.Now().Add(60 * time.Second)
	for n := rows(); n > 1000; n = rows() {
		if time.Now().After(deadline) {
			t.Fatalf("still %d rows 60 s after the start, over the limit of 1,000", n)
		}
		for range 50 {
			reply, took := askTimed(t, c, 10*time.Second, "request", "update", "cache_type", "smtpd", "cache_id", fmt.Sprintf("new-%d", updates), "session", b64("y"))
			if reply != "status=0" {
				t.Fatalf("update: %q", reply)
			}
			updates++
			worst = max(worst, took)
		}
	}
	t.Logf("%d updates while the cache went from 40,001 rows to the limit of 1,000; the slowest took %v", updates, worst)
	if worst > bound {
		t.Errorf("a client's update waited %v (more than one batch) while the cache was trimmed", worst)
	}
}

// Started as root, the daemon runs as mail_owner: no uid of it is 0, it
// cannot dump core, and it is not dumpable (its /proc files are root's).
func TestRootDaemonDropsAndCannotDump(t *testing.T) {
	needRoot(t, "a daemon started as root")
	s := newStandalone(t)
	s.start()
	s.dialWithin(10 * time.Second)
	for _, id := range s.uids() {
		if id != s.uid {
			t.Errorf("uids %v, want all %d", s.uids(), s.uid)
		}
	}
	limits, _ := os.ReadFile(fmt.Sprintf("/proc/%d/limits", s.cmd.Process.Pid))
	if !regexp.MustCompile(`Max core file size +0 +0 `).Match(limits) {
		t.Errorf("core files are allowed:\n%s", limits)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/environ", s.cmd.Process.Pid), &st); err != nil || st.Uid != 0 {
		t.Errorf("the daemon is dumpable: /proc/PID/environ is uid %d's (%v)", st.Uid, err)
	}
}
