package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// testServer is an in-process tlsmgr on a UNIX socket in a temp dir, with
// smtpd and smtp caches on (3600 s) and lmtp off, unless the test says.
type testServer struct {
	srv  *server
	sock string
	db   string
}

func allCaches(timeout int64) []cacheConfig {
	return []cacheConfig{
		{label: "smtpd", database: "btree:/x/smtpd_scache", timeout: timeout},
		{label: "smtp", database: "btree:/x/smtp_scache", timeout: timeout},
		{label: "lmtp", database: "", timeout: timeout},
	}
}

func startServer(t testing.TB, caches []cacheConfig) *testServer {
	t.Helper()
	return startServerWith(t, caches, nil)
}

// startServerWith lets a test change the server before it serves.
func startServerWith(t testing.TB, caches []cacheConfig, configure func(*server)) *testServer {
	t.Helper()
	dir := t.TempDir()
	db := filepath.Join(dir, "tlsmgr.sqlite")
	st, err := openStore(db, caches, 500)
	if err != nil {
		t.Fatal(err)
	}
	p, _ := newPool()
	srv := &server{store: st, pool: p, keys: newTicketKeys(st.caches["smtpd"].timeout, p),
		ipcTimeout: 5 * time.Second, streamName: "tlsmgr socket", maxConns: 64}
	if configure != nil {
		configure(srv)
	}
	sock := filepath.Join(dir, "tlsmgr.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.serveListener(ln)
	t.Cleanup(func() { ln.Close(); st.close() })
	return &testServer{srv: srv, sock: sock, db: db}
}

type client struct {
	t    testing.TB
	conn net.Conn
	r    *attrReader
}

// dial connects and checks the 26-byte announcement, byte for byte.
func dial(t testing.TB, sock string) *client {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, len(handshake))
	if _, err := io.ReadFull(conn, got); err != nil || !bytes.Equal(got, []byte("protocol\x00tlsmgr_protocol\x00\x00")) {
		t.Fatalf("announcement %q, %v", got, err)
	}
	return &client{t: t, conn: conn, r: &attrReader{br: bufio.NewReader(conn), streamName: "test"}}
}

// raw sends bytes and returns the reply list as "name=value" lines.
func (c *client) raw(req string) string {
	c.t.Helper()
	c.conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.conn.Write([]byte(req)); err != nil {
		c.t.Fatal(err)
	}
	list, err := readList(c.r)
	if err != nil {
		c.t.Fatalf("request %q: %v", req, err)
	}
	var out []string
	for _, kv := range list {
		out = append(out, kv[0]+"="+kv[1])
	}
	return strings.Join(out, " ")
}

// req builds a request from name, value pairs; values are sent as given.
func (c *client) req(pairs ...string) string {
	var b strings.Builder
	for _, p := range pairs {
		b.WriteString(p)
		b.WriteByte(0)
	}
	b.WriteByte(0)
	return c.raw(b.String())
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// closed reports whether the server closed the connection without sending more.
func (c *client) closed() bool {
	c.conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	var b [1]byte
	n, err := c.r.br.Read(b[:])
	return n == 0 && err != nil && !isTimeout(err)
}

// §10.1-2: the announcement, also for master's trigger, which is then closed.
func TestHandshakeAndTrigger(t *testing.T) {
	s := startServer(t, allCaches(3600))
	c := dial(t, s.sock)
	c.conn.Write([]byte("W\x00"))
	if !c.closed() {
		t.Error("server did not close after the W trigger")
	}
	c = dial(t, s.sock)
	c.conn.Write([]byte("\x00"))       // a lone NUL: no reply, connection kept
	time.Sleep(300 * time.Millisecond) // it must arrive alone, as master's triggers do
	if got := c.req("request", "policy", "cache_type", "smtpd"); got != "status=0 cachable=1 timeout=3600" {
		t.Errorf("after a lone NUL: %s", got)
	}
}

// §10.3-5: seed sizes.
func TestSeed(t *testing.T) {
	s := startServer(t, allCaches(3600))
	c := dial(t, s.sock)
	seen := map[string]bool{}
	for _, n := range []int{1, 32, 255, 32} {
		w := &attrWriter{}
		w.str("request", "seed")
		w.int("size", n)
		w.end()
		got := c.raw(string(w.buf))
		var data string
		if _, err := fmt.Sscanf(got, "status=0 seed=%s", &data); err != nil {
			t.Fatalf("seed %d: %s", n, got)
		}
		b, _ := base64.StdEncoding.DecodeString(data)
		if len(b) != n {
			t.Errorf("seed %d gave %d bytes", n, len(b))
		}
		if seen[data] {
			t.Errorf("seed %d repeated earlier output", n)
		}
		seen[data] = true
	}
	logged := captureLog(t)
	for _, tc := range []struct{ size, logged string }{
		{"0", `bogus seed length "0"`}, {"256", `bogus seed length "256"`}, {"-1", `bogus seed length "-1"`},
		{"4294967295", `bogus seed length "-1"`},
	} {
		if got := c.req("request", "seed", "size", tc.size); got != "status=4294967294 seed=" {
			t.Errorf("seed %s: %s", tc.size, got)
		}
		if !strings.Contains(logged(), "warning: "+tc.logged+` in "seed" request`) {
			t.Errorf("seed %s: log %q", tc.size, logged())
		}
	}
	for _, size := range []string{"+32", " 32", "0032", "4294967328", "-4294967264"} {
		got := c.req("request", "seed", "size", size)
		data := strings.TrimPrefix(got, "status=0 seed=")
		if b, _ := base64.StdEncoding.DecodeString(data); len(b) != 32 {
			t.Errorf("seed %q: %s", size, got)
		}
	}
	for _, size := range []string{"32 ", "", "x"} {
		if got := c.req("request", "seed", "size", size); got != "status=4294967294 seed=" {
			t.Errorf("seed %q: %s", size, got)
		}
		if !strings.Contains(logged(), fmt.Sprintf("malformed numerical data from tlsmgr socket while reading input attribute value: %s\n", size)) {
			t.Errorf("seed %q: log %q", size, logged())
		}
	}
}

// §10.6: policy reflects the database, the clamped timeout, and bad types.
func TestPolicy(t *testing.T) {
	s := startServer(t, []cacheConfig{
		{label: "smtpd", database: "", timeout: 3600},
		{label: "smtp", database: "btree:smtp", timeout: 1},
		{label: "lmtp", database: "btree:lmtp", timeout: 0},
	})
	c := dial(t, s.sock)
	logged := captureLog(t)
	for cache, want := range map[string]string{
		"smtpd": "status=0 cachable=0 timeout=3600", // Debian's default: no database
		"smtp":  "status=0 cachable=1 timeout=120",  // 1 s is raised to 120
		"lmtp":  "status=0 cachable=0 timeout=0",    // 0 turns it off
		"SMTPD": "status=4294967294 cachable=0 timeout=0",
	} {
		if got := c.req("request", "policy", "cache_type", cache); got != want {
			t.Errorf("policy %s: %s, want %s", cache, got, want)
		}
	}
	if !strings.Contains(logged(), `warning: bogus cache type "SMTPD" in "policy" request`) {
		t.Errorf("log %q", logged())
	}
}

// §10.7-9: update, lookup and delete.
func TestCacheRequests(t *testing.T) {
	s := startServer(t, allCaches(3600))
	c := dial(t, s.sock)
	for _, session := range []string{"", "hello", "bin\x00ary\x00\xff", strings.Repeat("x", 5000), strings.Repeat("\x01\x02", 40000)} {
		if got := c.req("request", "update", "cache_type", "smtp", "cache_id", "dest", "session", b64(session)); got != "status=0" {
			t.Fatalf("update: %s", got)
		}
		if got, want := c.req("request", "lookup", "cache_type", "smtp", "cache_id", "dest"), "status=0 session="+b64(session); got != want {
			t.Errorf("lookup of a %d-byte session: %.80s", len(session), got)
		}
	}
	if got := c.req("request", "update", "cache_type", "smtpd", "cache_id", "", "session", b64("s")); got != "status=0" {
		t.Errorf("update with an empty id: %s", got)
	}
	if got := c.req("request", "lookup", "cache_type", "smtpd", "cache_id", "absent"); got != "status=4294967295 session=" {
		t.Errorf("lookup miss: %s", got)
	}
	if got := c.req("request", "delete", "cache_type", "smtp", "cache_id", "dest"); got != "status=0" {
		t.Errorf("delete: %s", got)
	}
	if got := c.req("request", "lookup", "cache_type", "smtp", "cache_id", "dest"); got != "status=4294967295 session=" {
		t.Errorf("lookup after delete: %s", got)
	}
	if got := c.req("request", "delete", "cache_type", "smtp", "cache_id", "dest"); got != "status=4294967295" {
		t.Errorf("delete of an absent id: %s", got)
	}
	logged := captureLog(t)
	for _, req := range [][]string{
		{"request", "lookup", "cache_type", "lmtp", "cache_id", "x"},
		{"request", "update", "cache_type", "lmtp", "cache_id", "x", "session", b64("s")},
		{"request", "delete", "cache_type", "lmtp", "cache_id", "x"},
	} {
		if got := c.req(req...); !strings.HasPrefix(got, "status=4294967294") {
			t.Errorf("%s on the disabled cache: %s", req[1], got)
		}
	}
	if logged() != "" {
		t.Errorf("a disabled cache logged: %q", logged())
	}
	for _, req := range [][]string{
		{"request", "lookup", "cache_type", "imap", "cache_id", "x"},
		{"request", "update", "cache_type", "imap", "cache_id", "x", "session", b64("s")},
		{"request", "delete", "cache_type", "imap", "cache_id", "x"},
	} {
		if got := c.req(req...); !strings.HasPrefix(got, "status=4294967294") {
			t.Errorf("%s on an unknown cache: %s", req[1], got)
		}
		if !strings.Contains(logged(), fmt.Sprintf(`warning: bogus cache type "imap" in "%s" request`, req[1])) {
			t.Errorf("no warning for %s: %q", req[1], logged())
		}
	}
}

// §10.10: expiry on lookup and by the sweep.
func TestExpiry(t *testing.T) {
	s := startServer(t, allCaches(120))
	c := dial(t, s.sock)
	now := time.Unix(1_800_000_000, 0)
	var mu sync.Mutex
	s.srv.store.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	for _, id := range []string{"a", "b", "c"} {
		if got := c.req("request", "update", "cache_type", "smtpd", "cache_id", id, "session", b64("s-"+id)); got != "status=0" {
			t.Fatalf("update %s: %s", id, got)
		}
	}
	advance(120 * time.Second) // stored + timeout == now: still fresh
	if got := c.req("request", "lookup", "cache_type", "smtpd", "cache_id", "a"); got != "status=0 session="+b64("s-a") {
		t.Errorf("entry at exactly its timeout: %s", got)
	}
	// The sweep follows the lookup rule: at that same second it removes nothing.
	if removed, err := s.srv.store.sweepExpired(s.srv.store.caches["smtpd"], nil); removed != 0 || err != nil {
		t.Errorf("sweep at exactly the timeout removed %d (%v)", removed, err)
	}
	advance(time.Second)
	if got := c.req("request", "lookup", "cache_type", "smtpd", "cache_id", "a"); got != "status=4294967295 session=" {
		t.Errorf("expired entry: %s", got)
	}
	count := func() (n int) {
		s.srv.store.reader.QueryRow("SELECT count(*) FROM smtpd_cache").Scan(&n)
		return n
	}
	if n := count(); n != 2 {
		t.Errorf("expired entry not deleted by the lookup: %d rows", n)
	}
	s.srv.store.sweepBatch = 1 // batches of one: the loop must still finish
	removed, err := s.srv.store.sweepExpired(s.srv.store.caches["smtpd"], nil)
	if err != nil || removed != 2 || count() != 0 {
		t.Errorf("sweep removed %d (%v), %d left", removed, err, count())
	}
}

// §10.11: caches are empty after a restart; one database for two caches is fatal.
func TestStoreRestartAndDuplicates(t *testing.T) {
	dir := t.TempDir()
	db := filepath.Join(dir, "t.sqlite")
	st, err := openStore(db, allCaches(3600), 500)
	if err != nil {
		t.Fatal(err)
	}
	if status := st.update(st.caches["smtp"], "x", []byte("y")); status != statOK {
		t.Fatalf("update before the restart: %d", status)
	}
	if _, status := st.lookup(st.caches["smtp"], "x"); status != statOK {
		t.Fatalf("lookup before the restart: %d", status)
	}
	for _, f := range []string{db, db + "-wal", db + "-shm"} {
		if fi, err := os.Stat(f); err != nil || fi.Mode().Perm() != 0600 {
			t.Errorf("%s: %v, want mode 0600", f, err)
		}
	}
	st.close()
	st, err = openStore(db, allCaches(3600), 500)
	if err != nil {
		t.Fatal(err)
	}
	if _, status := st.lookup(st.caches["smtp"], "x"); status != statErr {
		t.Error("entry survived a restart")
	}
	st.close()
	dup := allCaches(3600)
	dup[1].database = dup[0].database
	_, err = openStore(filepath.Join(dir, "d.sqlite"), dup, 500)
	if err == nil || err.Error() != "do not use the same TLS cache file btree:/x/smtpd_scache for smtpd and smtp" {
		t.Errorf("duplicate databases: %v", err)
	}
	dup[1].timeout = 0 // a disabled cache may share the name
	if st, err := openStore(filepath.Join(dir, "e.sqlite"), dup, 500); err != nil {
		t.Errorf("disabled duplicate: %v", err)
	} else {
		st.close()
	}
}

// The views show sessions without key material.
func TestViews(t *testing.T) {
	s := startServer(t, allCaches(3600))
	c := dial(t, s.sock)
	if got := c.req("request", "update", "cache_type", "smtpd", "cache_id", "abc&s=x", "session", b64("secret-session")); got != "status=0" {
		t.Fatalf("update: %s", got)
	}
	var cache, id, stored, expires string
	var size, age int
	err := asAdmin(t, s.srv.store).QueryRow("SELECT cache, id, size, stored, expires, age FROM sessions").Scan(&cache, &id, &size, &stored, &expires, &age)
	if err != nil || cache != "smtpd" || id != "abc&s=x" || size != 14 || !strings.HasSuffix(stored, "Z") || age < 0 || age > 5 {
		t.Errorf("sessions view: %v %s %s %d %s %s %d", err, cache, id, size, stored, expires, age)
	}
	rows, _ := asAdmin(t, s.srv.store).Query("SELECT * FROM sessions")
	cols, _ := rows.Columns()
	rows.Close()
	if strings.Contains(strings.Join(cols, ","), "session") {
		t.Errorf("the sessions view shows key material: %v", cols)
	}
	var entries, bytes int
	asAdmin(t, s.srv.store).QueryRow("SELECT entries, bytes FROM cache_stats WHERE cache = 'smtpd'").Scan(&entries, &bytes)
	if entries != 1 || bytes != 14 {
		t.Errorf("cache_stats: %d entries, %d bytes", entries, bytes)
	}
}

// §10.12-14: ticket keys.
func TestTicketKeys(t *testing.T) {
	s := startServer(t, allCaches(120)) // H = 60
	c := dial(t, s.sock)
	t0 := time.Unix(1_800_000_000, 0)
	now := t0
	var mu sync.Mutex
	s.srv.keys.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	at := func(d int) { mu.Lock(); now = t0.Add(time.Duration(d) * time.Second); mu.Unlock() }
	current := func() []byte {
		got := c.req("request", "tktkey", "keyname", "")
		data, ok := strings.CutPrefix(got, "status=0 keybuf=")
		b, _ := base64.StdEncoding.DecodeString(data)
		if !ok || len(b) != 88 {
			t.Fatalf("current key: %s", got)
		}
		return b
	}
	byName := func(name []byte) string {
		return c.req("request", "tktkey", "keyname", base64.StdEncoding.EncodeToString(name))
	}
	a := current()
	if tout := int64(binary.LittleEndian.Uint64(a[80:])); tout != t0.Unix()+59 {
		t.Errorf("tout = now%+d, want now+59", tout-t0.Unix())
	}
	at(58) // one second before tout: still issuing
	if b := current(); !bytes.Equal(a, b) {
		t.Error("key changed within its issuing window")
	}
	at(59) // at tout itself Postfix makes a new key (timecmp(tout, now) <= 0)
	b := current()
	if bytes.Equal(a[:16], b[:16]) {
		t.Fatal("no new key at tout")
	}
	if tout := int64(binary.LittleEndian.Uint64(b[80:])); tout != t0.Unix()+59+59 {
		t.Errorf("second key's tout = t0%+d, want t0+118", tout-t0.Unix())
	}
	if got := byName(a[:16]); got != "status=0 keybuf="+base64.StdEncoding.EncodeToString(a) {
		t.Errorf("previous key by name at t0+59: %s", got)
	}
	at(118) // A decrypts while tout + H > now: t0+59+60 > t0+118
	if got := byName(a[:16]); !strings.HasPrefix(got, "status=0 ") {
		t.Errorf("A one second before its decrypt limit: %s", got)
	}
	cKey := current() // B's tout: second rotation, A is gone
	if bytes.Equal(cKey[:16], b[:16]) {
		t.Fatal("no new key at B's tout")
	}
	if got := byName(a[:16]); got != "status=4294967295 keybuf="+base64.StdEncoding.EncodeToString(a[:16]) {
		t.Errorf("oldest key after two rotations: %s (want -1 with the name echoed)", got)
	}
	if got := byName(cKey[:16]); !strings.HasPrefix(got, "status=0 ") {
		t.Errorf("current key C: %s", got)
	}
	at(177) // B: tout t0+118, + H = t0+178
	if got := byName(b[:16]); !strings.HasPrefix(got, "status=0 ") {
		t.Errorf("B one second before its decrypt limit: %s", got)
	}
	at(178)
	if got := byName(b[:16]); got != "status=4294967295 keybuf="+base64.StdEncoding.EncodeToString(b[:16]) {
		t.Errorf("B at exactly its decrypt limit: %s", got)
	}
	logged := captureLog(t)
	if got := c.req("request", "tktkey", "keyname", b64("abc")); got != "status=4294967294 keybuf=" {
		t.Errorf("3-byte name: %s", got)
	}
	if !strings.Contains(logged(), "warning: invalid session ticket key name length: 3") {
		t.Errorf("log %q", logged())
	}

	off := startServer(t, []cacheConfig{{label: "smtpd", timeout: 0}, {label: "smtp"}, {label: "lmtp"}})
	if got := dial(t, off.sock).req("request", "tktkey", "keyname", ""); got != "status=4294967295 keybuf=" {
		t.Errorf("tktkey with smtpd timeout 0: %s", got)
	}
}

// §10.15-16 and more: malformed requests and the answer each must get.
// "closed" means the server closes without a reply.
func TestMalformedRequests(t *testing.T) {
	const fail = "status=4294967294"
	big := strings.Repeat("A", maxAttrLen+8192) // past the cap by more than one read buffer
	for _, tc := range []struct {
		name, input, reply, logged string
	}{
		{"extra attribute after all wanted ones still executes", "request\x00policy\x00cache_type\x00smtpd\x00extra\x00x\x00\x00",
			"status=0 cachable=1 timeout=3600", "unexpected attribute extra from tlsmgr socket (expecting: (list terminator))"},
		{"attributes out of order", "request\x00lookup\x00cache_id\x00x\x00cache_type\x00smtp\x00\x00",
			fail + " session=", "unexpected attribute cache_id from tlsmgr socket (expecting: cache_type)"},
		{"missing attribute", "request\x00lookup\x00cache_type\x00smtp\x00\x00",
			fail + " session=", "missing attribute cache_id in input from tlsmgr socket"},
		{"bad first attribute", "frob\x00seed\x00size\x0032\x00\x00",
			fail, "unexpected attribute frob from tlsmgr socket (expecting: request)"},
		{"empty list with more after it", "\x00request\x00",
			fail, "missing attribute request in input from tlsmgr socket"},
		{"unknown request gets FAIL, not silence", "request\x00frob\x00\x00",
			fail, `unknown request "frob" from tlsmgr socket`},
		{"request names are case-sensitive", "request\x00SEED\x00size\x0032\x00\x00",
			fail, `unknown request "SEED"`},
		{"base64 length not a multiple of 4", "request\x00update\x00cache_type\x00smtp\x00cache_id\x00x\x00session\x00abc\x00\x00",
			fail, "malformed base64 data from tlsmgr socket while reading input attribute value: session, 3 bytes"},
		{"base64 with a bad character", "request\x00tktkey\x00keyname\x00ab*d\x00\x00",
			fail + " keybuf=", "malformed base64 data"},
		{"base64 with newline", "request\x00tktkey\x00keyname\x00ab\ncd==\x00\x00",
			fail + " keybuf=", "malformed base64 data"},
		{"oversized attribute value", "request\x00update\x00cache_type\x00smtp\x00cache_id\x00" + big + "\x00",
			"closed", "string length > 1048576 from tlsmgr socket while reading input attribute value"},
		{"oversized attribute name", big,
			"closed", "string length > 1048576 from tlsmgr socket while reading input attribute name"},
		{"end of input in the middle of a request", "request\x00seed\x00si",
			"closed", "premature end-of-input on tlsmgr socket while reading input attribute name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, allCaches(3600))
			c := dial(t, s.sock)
			logged := captureLog(t)
			if tc.reply == "closed" {
				go func() {
					c.conn.Write([]byte(tc.input))
					if strings.HasSuffix(tc.input, "si") {
						c.conn.(*net.UnixConn).CloseWrite()
					}
				}()
				if !c.closed() {
					t.Error("connection not closed")
				}
			} else if got := c.raw(tc.input); got != tc.reply {
				t.Errorf("reply %q, want %q", got, tc.reply)
			}
			waitFor(t, func() bool { return strings.Contains(logged(), tc.logged) }, "log line %q in %q", tc.logged, logged)
			if strings.Contains(tc.name, "base64") && (strings.Contains(logged(), "abc") || strings.Contains(logged(), "ab*d")) {
				t.Errorf("the bytes of a session or key name were logged: %s", logged())
			}
			if tc.reply != "closed" { // the connection still works afterwards
				if got := c.req("request", "policy", "cache_type", "smtp"); got != "status=0 cachable=1 timeout=3600" {
					t.Errorf("next request: %s", got)
				}
			}
		})
	}
}

// A malformed lookup, tktkey or seed gets status -2 and empty data, never
// bytes left from an earlier reply on the same connection: what Postfix
// 3.12 fixed in its own tlsmgr (20260710, "do not reply with stale data
// after an error receiving a tlsmgr(8) request"). Each malformed request
// follows a request of the same kind that was answered with data.
func TestMalformedRequestsGetEmptyData(t *testing.T) {
	s := startServer(t, allCaches(3600))
	c := dial(t, s.sock)
	if got := c.req("request", "update", "cache_type", "smtp", "cache_id", "id", "session", b64("secret session")); got != "status=0" {
		t.Fatalf("update: %s", got)
	}
	for _, tc := range []struct{ name, good, bad, want string }{
		{"seed, a size that is not a number",
			"request\x00seed\x00size\x0032\x00\x00", "request\x00seed\x00size\x0032x\x00\x00", "status=4294967294 seed="},
		{"seed, its attribute missing",
			"request\x00seed\x00size\x0032\x00\x00", "request\x00seed\x00\x00", "status=4294967294 seed="},
		{"lookup, cache_id missing",
			"request\x00lookup\x00cache_type\x00smtp\x00cache_id\x00id\x00\x00", "request\x00lookup\x00cache_type\x00smtp\x00\x00", "status=4294967294 session="},
		{"lookup, attributes out of order",
			"request\x00lookup\x00cache_type\x00smtp\x00cache_id\x00id\x00\x00", "request\x00lookup\x00cache_id\x00id\x00cache_type\x00smtp\x00\x00", "status=4294967294 session="},
		{"tktkey, bad base64",
			"request\x00tktkey\x00keyname\x00\x00\x00", "request\x00tktkey\x00keyname\x00a*==\x00\x00", "status=4294967294 keybuf="},
		{"tktkey, keyname missing",
			"request\x00tktkey\x00keyname\x00\x00\x00", "request\x00tktkey\x00\x00", "status=4294967294 keybuf="},
	} {
		if got := c.raw(tc.good); !strings.HasPrefix(got, "status=0 ") || strings.HasSuffix(got, " seed=") || strings.HasSuffix(got, " session=") || strings.HasSuffix(got, " keybuf=") {
			t.Fatalf("%s: the good request got %q, no data", tc.name, got)
		}
		if got := c.raw(tc.bad); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

// recordingStream feeds requests to serveConn and keeps every buffer the
// server wrote, as it was passed, not a copy.
type recordingStream struct {
	in      *bytes.Reader
	written [][]byte
}

func (r *recordingStream) Read(p []byte) (int, error) { return r.in.Read(p) }
func (r *recordingStream) Write(p []byte) (int, error) {
	r.written = append(r.written, p)
	return len(p), nil
}
func (r *recordingStream) SetDeadline(time.Time) error { return nil }

// A reply that carried a seed, a ticket key or a session is wiped once it
// is sent: no copy of the secret stays in the connection's buffer.
func TestRepliesWipedAfterSending(t *testing.T) {
	s := startServer(t, allCaches(3600))
	var in bytes.Buffer
	for _, pairs := range [][]string{
		{"request", "seed", "size", "255"},
		{"request", "tktkey", "keyname", ""},
		{"request", "update", "cache_type", "smtp", "cache_id", "id", "session", b64("a secret session")},
		{"request", "lookup", "cache_type", "smtp", "cache_id", "id"},
	} {
		for _, p := range pairs {
			in.WriteString(p)
			in.WriteByte(0)
		}
		in.WriteByte(0)
	}
	rs := &recordingStream{in: bytes.NewReader(in.Bytes())}
	s.srv.serveConn(rs, nil, false)
	if len(rs.written) != 4 {
		t.Fatalf("%d replies, want 4", len(rs.written))
	}
	for i, b := range rs.written {
		if !bytes.Equal(b, make([]byte, len(b))) {
			t.Errorf("reply %d is still in the buffer after it was sent: %q", i, b)
		}
	}
}

func waitFor(t *testing.T, cond func() bool, format string, args ...any) {
	t.Helper()
	for i := 0; i < 100 && !cond(); i++ {
		time.Sleep(20 * time.Millisecond)
	}
	if !cond() {
		for i, a := range args {
			if f, ok := a.(func() string); ok {
				args[i] = f()
			}
		}
		t.Errorf("timed out waiting for "+format, args...)
	}
}

// A client that stalls half-way through a request delays nobody else.
func TestStalledClientDelaysNoOne(t *testing.T) {
	s := startServer(t, allCaches(3600))
	stalled := dial(t, s.sock)
	stalled.conn.Write([]byte("request\x00lookup\x00cache_type\x00sm"))
	other := dial(t, s.sock)
	start := time.Now()
	if got := other.req("request", "policy", "cache_type", "smtpd"); got != "status=0 cachable=1 timeout=3600" {
		t.Errorf("reply %s", got)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("the second client waited %v", d)
	}
}

// Requests that arrive together are all answered, in order.
func TestPipelinedRequests(t *testing.T) {
	s := startServer(t, allCaches(3600))
	c := dial(t, s.sock)
	c.conn.Write([]byte("request\x00policy\x00cache_type\x00smtp\x00\x00request\x00delete\x00cache_type\x00smtp\x00cache_id\x00x\x00\x00"))
	for _, want := range []string{"status=0 cachable=1 timeout=3600", "status=4294967295"} {
		if got := c.raw(""); got != want {
			t.Errorf("got %s, want %s", got, want)
		}
	}
}

func TestParseUintLikeSscanf(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint32
		ok   bool
	}{
		{"32", 32, true}, {"+32", 32, true}, {" 32", 32, true}, {"\t32", 32, true}, {"0032", 32, true},
		{"4294967328", 32, true}, {"-4294967264", 32, true}, {"-1", 0xFFFFFFFF, true},
		{"99999999999999999999999", 0xFFFFFFFF, true}, {"32 ", 0, false}, {"", 0, false}, {"+", 0, false}, {"0x20", 0, false},
	} {
		got, ok := parseUint([]byte(tc.in))
		if ok != tc.ok || got != tc.want {
			t.Errorf("parseUint(%q) = %d, %v; want %d, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestBase64LikePostfix(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"", "", true}, {"aGVsbG8=", "hello", true}, {"aGVsbA==", "hell", true},
		{"aGVsbA==garbage", "", false},     // length not a multiple of 4
		{"aGVsbA==garbage!", "hell", true}, // decoding stops at the padding
		{"aG=s", "h", true},                // '=' in the third place ends it too
		{"aGVsbB==", "hell", true},         // non-zero padding bits are tolerated
		{"aGV", "", false}, {"a===", "", false}, {"aGV*", "", false},
		{"aGV\nbG8=", "", false}, {"aGVs\r\nbG8=", "", false}, // line breaks are not base64 to Postfix
		{"aGVsbG8hIQ==", "hello!!", true}, {"AAEC", "\x00\x01\x02", true},
	} {
		got, ok := decodeBase64([]byte(tc.in))
		if ok != tc.ok || (ok && string(got) != tc.want) {
			t.Errorf("decodeBase64(%q) = %q, %v; want %q, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

// At the connection limit the longest-idle client is closed to make room,
// never the new one, and the warning is not repeated for every client.
func TestConnectionLimitClosesLongestIdle(t *testing.T) {
	s := startServerWith(t, allCaches(3600), func(srv *server) { srv.maxConns = 3 })
	logged := captureLog(t)
	var idle []*client
	for range 3 {
		c := dial(t, s.sock)
		c.req("request", "policy", "cache_type", "smtp") // registered and answered
		idle = append(idle, c)
		time.Sleep(20 * time.Millisecond) // distinct idle times: idle[0] is the oldest
	}
	for i := range 10 {
		c := dial(t, s.sock)
		if got := c.req("request", "policy", "cache_type", "smtpd"); got != "status=0 cachable=1 timeout=3600" {
			t.Fatalf("new client %d at the limit: %s", i, got)
		}
		c.conn.Close()
		time.Sleep(10 * time.Millisecond)
	}
	if !idle[0].closed() {
		t.Error("the longest-idle client was not closed")
	}
	if n := strings.Count(logged(), "tlsmgr_max_connections"); n != 1 {
		t.Errorf("%d warnings about the limit, want 1:\n%s", n, logged())
	}
	if want := "warning: tlsmgr socket: 3 connections, the tlsmgr_max_connections limit: closed the one idle for"; !strings.Contains(logged(), want) {
		t.Errorf("log %q, want %q", logged(), want)
	}
}

// An orderly exit stops accepting, answers the request in flight, and
// only then returns (the caller then saves the exchange file and wipes).
func TestDrainAnswersRequestsInFlight(t *testing.T) {
	s := startServer(t, allCaches(3600))
	c := dial(t, s.sock)
	inHandler, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	s.srv.store.now = func() time.Time { // called inside the update handler
		once.Do(func() { close(inHandler); <-release })
		return time.Now()
	}
	reply := make(chan string, 1)
	go func() {
		reply <- c.req("request", "update", "cache_type", "smtp", "cache_id", "x", "session", b64("y"))
	}()
	<-inHandler
	drained := make(chan struct{})
	go func() { s.srv.drain(5 * time.Second); close(drained) }()
	time.Sleep(200 * time.Millisecond)
	select {
	case <-drained:
		t.Fatal("drain returned while a request was in flight")
	default:
	}
	if conn, err := net.Dial("unix", s.sock); err == nil {
		conn.SetReadDeadline(time.Now().Add(time.Second))
		if n, _ := conn.Read(make([]byte, 64)); n > 0 {
			t.Error("a new connection was served during the exit")
		}
		conn.Close()
	}
	close(release)
	if got := <-reply; got != "status=0" {
		t.Errorf("the request in flight got %q", got)
	}
	select {
	case <-drained:
	case <-time.After(5 * time.Second):
		t.Fatal("drain did not return after the request was answered")
	}
}

// Rotation and lookups at once: every key handed out is a consistent copy
// (run with -race; .ci/run does).
func TestTicketKeysConcurrentRotation(t *testing.T) {
	p, _ := newPool()
	keys := newTicketKeys(120, p) // H = 60
	var clock atomic.Int64
	clock.Store(1_800_000_000)
	keys.now = func() time.Time { return time.Unix(clock.Load(), 0) }
	var wg sync.WaitGroup
	stop := make(chan struct{})
	names := make(chan []byte, 64)
	wg.Add(1)
	go func() { // the clock runs fast: a rotation every few calls
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
				clock.Add(7)
				time.Sleep(50 * time.Microsecond)
			}
		}
	}()
	for range 4 {
		wg.Add(2)
		go func() {
			defer wg.Done()
			for range 2000 {
				k, _, err := keys.issue()
				if err != nil {
					t.Error(err)
					return
				}
				buf := k.marshal()
				if k.tout == 0 || bytes.Equal(buf[:16], make([]byte, 16)) {
					t.Errorf("issued a wiped key: %x", buf)
					return
				}
				select {
				case names <- append([]byte(nil), k.name[:]...):
				default:
				}
			}
		}()
		go func() {
			defer wg.Done()
			for range 2000 {
				select {
				case name := <-names:
					if k, found := keys.find(name); found {
						if buf := k.marshal(); !bytes.Equal(buf[:16], name) {
							t.Errorf("find %x returned key %x", name, buf[:16])
							return
						}
					}
				default:
				}
			}
		}()
	}
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
}

// Buffers grown by a large request are let go once it is answered: many
// connections that each once sent a big session hold no big buffers.
func TestLargeRequestBuffersReleased(t *testing.T) {
	s := startServer(t, allCaches(3600))
	big := b64(strings.Repeat("b", 700_000)) // 0.93 MB of base64 in, and out again
	var clients []*client
	for i := range 40 {
		c := dial(t, s.sock)
		id := fmt.Sprintf("big%d", i)
		if got := c.req("request", "update", "cache_type", "smtp", "cache_id", id, "session", big); got != "status=0" {
			t.Fatalf("update: %.40s", got)
		}
		if got := c.req("request", "lookup", "cache_type", "smtp", "cache_id", id); len(got) < len(big) {
			t.Fatalf("lookup: %.40s", got)
		}
		c.r.tok = nil                // the test client's own buffer is not the server's
		clients = append(clients, c) // kept open and idle
	}
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	// Kept, they would be 40 x (0.93 MB read + 0.93 MB reply + 0.7 MB session) = 100 MB.
	if m.HeapInuse > 40<<20 {
		t.Errorf("%d MB of heap in use with 40 idle connections", m.HeapInuse>>20)
	}
	for _, c := range clients {
		c.conn.Close()
	}
}
