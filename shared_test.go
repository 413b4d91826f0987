package main

// The shared store against a real, private PostgreSQL (Debian's package):
// initdb and pg_ctl run as an unprivileged user, on a loopback port and a
// socket directory of the test's own. Outside CI the tests skip when
// PostgreSQL is not installed; in CI they fail instead.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

type pgServer struct {
	t                 *testing.T
	dir, data, bindir string
	user              string
	port              int
}

// startPG initializes and starts a private PostgreSQL server.
func startPG(t *testing.T) *pgServer {
	t.Helper()
	initdb, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(initdb) == 0 {
		skipOutsideCI(t, "the shared store: needs Debian's postgresql package (.ci/run installs it)")
	}
	p := &pgServer{t: t, bindir: filepath.Dir(initdb[len(initdb)-1]), port: freePort(t)}
	dir, err := os.MkdirTemp("", "tlsmgr-pg.")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	p.dir, p.data = dir, dir+"/data"
	if os.Geteuid() == 0 {
		p.user = "postgres" // initdb refuses root
		if _, err := exec.LookPath("runuser"); err != nil {
			t.Fatal("needs runuser")
		}
		if out, err := exec.Command("chown", "postgres:", dir).CombinedOutput(); err != nil {
			t.Fatalf("chown: %v %s", err, out)
		}
	}
	t.Cleanup(func() {
		p.pgctl("stop", "-m", "immediate")
		os.RemoveAll(dir)
	})
	if out, err := p.as(p.bindir+"/initdb", "-D", p.data, "-A", "trust", "-U", "tlsmgr", "-E", "UTF8", "--no-sync"); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	p.start()
	return p
}

func (p *pgServer) as(args ...string) (string, error) {
	if p.user != "" {
		args = append([]string{"runuser", "-u", p.user, "--"}, args...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	return string(out), err
}

func (p *pgServer) pgctl(args ...string) (string, error) {
	return p.as(append([]string{p.bindir + "/pg_ctl", "-D", p.data, "-w", "-t", "30"}, args...)...)
}

func (p *pgServer) start() {
	p.t.Helper()
	opts := fmt.Sprintf("-c listen_addresses=127.0.0.1 -c port=%d -c unix_socket_directories=%s -c max_connections=300 -c fsync=off -c full_page_writes=off", p.port, p.dir)
	if out, err := p.pgctl("-l", p.dir+"/log", "-o", opts, "start"); err != nil {
		log, _ := os.ReadFile(p.dir + "/log")
		p.t.Fatalf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
}

func (p *pgServer) stop() {
	p.t.Helper()
	if out, err := p.pgctl("stop", "-m", "fast"); err != nil {
		p.t.Fatalf("pg_ctl stop: %v\n%s", err, out)
	}
}

func (p *pgServer) dsn() string {
	return fmt.Sprintf("host=127.0.0.1 port=%d user=tlsmgr dbname=postgres sslmode=disable", p.port)
}

// sql runs statements as the database's superuser, for the tests' checks.
func (p *pgServer) sql(query string, args ...any) [][]any {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, p.dsn())
	if err != nil {
		p.t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, query, args...)
	if err != nil {
		p.t.Fatalf("%s: %v", query, err)
	}
	var out [][]any
	for rows.Next() {
		v, err := rows.Values()
		if err != nil {
			p.t.Fatal(err)
		}
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		p.t.Fatalf("%s: %v", query, err)
	}
	return out
}

// fakeClock is a host's wall clock, off by skew, and its monotonic clock.
type fakeClock struct {
	mu   sync.Mutex
	base time.Time
	at   time.Duration
	skew time.Duration
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.base.Add(c.at + c.skew)
}

func (c *fakeClock) mono() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.at
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.at += d
	c.mu.Unlock()
}

var testSecret = bytes.Repeat([]byte{0x5a}, sharedSecretLen)

// newTestShared is one host's shared store on p, with its own ticket keys
// (smtpd timeout `timeout`) and smtpd cache; clock nil means the real one.
func newTestShared(t *testing.T, p *pgServer, realm string, timeout int64, clock *fakeClock) (*sharedStore, *cache) {
	t.Helper()
	pc, err := sharedPoolConfig(p.dsn(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	pc.MaxConns = 2
	sc := &sharedConfig{pool: pc, realm: realm, caches: []string{"smtpd"}, timeout: 2 * time.Second}
	copy(sc.secret[:], testSecret)
	keys := newTicketKeys(timeout, rand.Reader)
	keys.slotted = true
	if clock != nil {
		keys.now, keys.mono = clock.now, clock.mono
	}
	sh, err := newSharedStore(sc, keys)
	if err != nil {
		t.Fatal(err)
	}
	if clock != nil {
		sh.now = clock.now
	}
	keys.setSource(sh)
	sh.readyOnce.Do(func() { close(sh.ready) }) // the tests refresh by hand
	t.Cleanup(sh.close)
	c := &cache{label: "smtpd", database: "btree:x", timeout: effectiveTimeout(timeout), shared: sh}
	return sh, c
}

func mustRefresh(t *testing.T, sh *sharedStore) {
	t.Helper()
	if err := sh.refreshKeys(); err != nil {
		t.Fatalf("refresh: %v", err)
	}
}

// Fifty hosts start at once and race for one slot: every one of them
// issues with the same key, and the database holds one row per slot.
func TestSharedKeysFiftyRacers(t *testing.T) {
	p := startPG(t)
	clock := &fakeClock{base: time.Unix(1_800_000_000, 0)}
	var hosts []*sharedStore
	for range 50 {
		sh, _ := newTestShared(t, p, "race", 3600, clock)
		hosts = append(hosts, sh)
	}
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, len(hosts))
	for _, sh := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs <- sh.refreshKeys()
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("refresh: %v", err)
		}
	}
	names := map[[16]byte]int{}
	for _, sh := range hosts {
		k, _, err := sh.keys.issue()
		if err != nil {
			t.Fatal(err)
		}
		names[k.name]++
	}
	if len(names) != 1 {
		t.Fatalf("50 racers issue with %d different keys, want 1", len(names))
	}
	rows := p.sql("SELECT slot, count(*) FROM ticket_keys WHERE realm = 'race' GROUP BY slot ORDER BY slot")
	if len(rows) != 2 { // this slot and the next, published ahead
		t.Fatalf("rows by slot: %v, want slots k and k+1 with one key each", rows)
	}
	for _, r := range rows {
		if r[1].(int64) != 1 {
			t.Errorf("slot %v has %v keys", r[0], r[1])
		}
	}
}

// Two hosts whose clocks are 60 s ahead and 60 s behind walk through
// several slots, refreshing as the refresher does: every ticket one
// issues, the other decrypts for as long as the rules (tout + H > now, on
// its own clock) allow, and they issue with the same key but at slot
// edges.
func TestSharedKeysClockSkew(t *testing.T) {
	p := startPG(t)
	for _, timeout := range []int64{3600, 240} {
		t.Run(fmt.Sprint("timeout ", timeout), func(t *testing.T) {
			base := time.Unix(1_800_000_000, 0)
			ca := &fakeClock{base: base, skew: 60 * time.Second}
			cb := &fakeClock{base: base, skew: -60 * time.Second}
			realm := fmt.Sprint("skew", timeout)
			a, _ := newTestShared(t, p, realm, timeout, ca)
			b, _ := newTestShared(t, p, realm, timeout, cb)
			half := timeout / 2
			type ticket struct {
				name [16]byte
				tout int64
				from *sharedStore
			}
			var issued []ticket
			step := a.refreshEvery()
			checked, differing := 0, 0
			// The hosts have run for one H when the checks begin: at a
			// start, a slot the other host published a moment ago is
			// read at the next refresh.
			warmUp := time.Duration(half) * time.Second
			ca.advance(-warmUp)
			cb.advance(-warmUp)
			for elapsed := -warmUp; elapsed < time.Duration(5*half)*time.Second; elapsed += step {
				mustRefresh(t, a)
				mustRefresh(t, b)
				if elapsed < 0 {
					ca.advance(step)
					cb.advance(step)
					continue
				}
				ka, _, _ := a.keys.issue()
				kb, _, _ := b.keys.issue()
				if ka.name != kb.name {
					differing++
				}
				issued = append(issued, ticket{ka.name, ka.tout, a}, ticket{kb.name, kb.tout, b})
				for _, tk := range issued {
					other := map[*sharedStore]*sharedStore{a: b, b: a}[tk.from]
					if tk.tout+half <= other.now().Unix() {
						continue // past the rules on the other host's clock
					}
					checked++
					if _, ok := other.keys.find(tk.name[:]); !ok {
						t.Fatalf("at +%v a ticket key %x (tout %d) is not found on the other host (now %d)", elapsed, tk.name[:4], tk.tout, other.now().Unix())
					}
				}
				ca.advance(step)
				cb.advance(step)
			}
			if checked == 0 {
				t.Fatal("nothing checked")
			}
			// 120 s apart, the hosts use different slots for 120 s of each H.
			if max := int(2*time.Duration(120)*time.Second/step) + 2; differing > max*5/2 {
				t.Errorf("the hosts issued with different keys %d times", differing)
			}
			t.Logf("%d checks, different current keys %d times", checked, differing)
		})
	}
}

// A restored, empty database (tables dropped, or emptied): the hosts make
// the tables again, publish the keys they issue with, so that a host that
// starts now gets the same key, and the cache works again without a
// fault.
func TestSharedRestoredEmptyDatabase(t *testing.T) {
	p := startPG(t)
	a, ca := newTestShared(t, p, "restore", 3600, nil)
	mustRefresh(t, a)
	before, _, _ := a.keys.issue()
	if st := a.update(ca, "id1", []byte("session one")); st != statOK {
		t.Fatalf("update: %d", st)
	}
	for _, wipe := range []string{"TRUNCATE ticket_keys, smtpd_cache", "DROP TABLE ticket_keys, smtpd_cache, smtp_cache, lmtp_cache CASCADE"} {
		p.sql(wipe)
		if _, st := a.find(ca, "id1"); st != statErr {
			t.Fatalf("after %s: lookup %d, want a miss", wipe, st)
		}
		mustRefresh(t, a)
		if a.down.Load() {
			t.Fatalf("after %s: the store counts the database as down", wipe)
		}
		b, _ := newTestShared(t, p, "restore", 3600, nil)
		mustRefresh(t, b)
		kb, _, _ := b.keys.issue()
		if kb.name != before.name {
			t.Fatalf("after %s: a new host issues with %x, the old one with %x", wipe, kb.name[:4], before.name[:4])
		}
		if st := a.update(ca, "id2", []byte("session two")); st != statOK {
			t.Fatalf("after %s: update %d", wipe, st)
		}
		if s, st := a.find(ca, "id2"); st != statOK || string(s) != "session two" {
			t.Fatalf("after %s: lookup %d %q", wipe, st, s)
		}
	}
}

// Nothing in the database is in the clear: not a key, not a session, not
// any 8 bytes of either; and a sealed value moved to another row, realm or
// expiry does not open.
func TestSharedRowsSealed(t *testing.T) {
	p := startPG(t)
	a, ca := newTestShared(t, p, "sealed", 3600, nil)
	mustRefresh(t, a)
	var secrets [][]byte
	a.keys.mu.Lock()
	for _, k := range a.keys.held {
		secrets = append(secrets, append(append(append([]byte{}, k.name[:]...), k.bits[:]...), k.hmac[:]...))
	}
	a.keys.mu.Unlock()
	session := make([]byte, 2000)
	rand.Read(session)
	secrets = append(secrets, session)
	if st := a.update(ca, "sealed-id", session); st != statOK {
		t.Fatalf("update: %d", st)
	}
	var dump bytes.Buffer
	for _, q := range []string{"SELECT t::text FROM ticket_keys t", "SELECT t::text FROM smtpd_cache t", "SELECT t::text FROM sessions t", "SELECT t::text FROM ticket_key_names t"} {
		for _, r := range p.sql(q) {
			dump.WriteString(r[0].(string))
		}
	}
	text := strings.ToLower(dump.String())
	if !strings.Contains(text, "sealed-id") {
		t.Fatal("the dump does not hold the row")
	}
	for _, s := range secrets {
		for i := 0; i+8 <= len(s); i += 4 {
			if strings.Contains(text, hex.EncodeToString(s[i:i+8])) || bytes.Contains(dump.Bytes(), s[i:i+8]) {
				t.Fatalf("8 secret bytes at offset %d are in the database in the clear", i)
			}
		}
	}
	// Moved rows do not open.
	p.sql("UPDATE smtpd_cache SET expires = expires + 3600 WHERE id = 'sealed-id'")
	if _, st := a.find(ca, "sealed-id"); st != statErr {
		t.Fatal("a session whose expiry was changed by hand still opens")
	}
	b, cb := newTestShared(t, p, "other", 3600, nil)
	p.sql("INSERT INTO smtpd_cache SELECT 'other', hash, id, session, stored, expires FROM smtpd_cache WHERE id = 'sealed-id'")
	p.sql("UPDATE smtpd_cache SET expires = expires - 3600 WHERE id = 'sealed-id'")
	if _, st := b.find(cb, "sealed-id"); st != statErr {
		t.Fatal("a session copied to another realm opens there")
	}
	if s, st := a.find(ca, "sealed-id"); st != statOK || !bytes.Equal(s, session) {
		t.Fatal("the session does not open in its own row")
	}
}

// The database goes away: seeds and keys never wait for it, lookups miss
// and updates are "not cached" within the timeout, and once it has failed
// a few times, at once; warnings are few. When it returns, the key this
// host made meanwhile is published, and a second host converges on it.
func TestSharedDatabaseDown(t *testing.T) {
	p := startPG(t)
	logged := captureLog(t)
	a, ca := newTestShared(t, p, "down", 3600, nil)
	mustRefresh(t, a)
	before, _, _ := a.keys.issue()
	p.stop()
	// A slot without a key: the database's keys are gone from memory.
	a.keys.wipe()
	startAt := time.Now()
	k, made, err := a.keys.issue()
	if err != nil || !made || time.Since(startAt) > 50*time.Millisecond {
		t.Fatalf("tktkey with the database down: made %v, err %v, took %v", made, err, time.Since(startAt))
	}
	var slowest time.Duration
	for i := range 200 {
		t0 := time.Now()
		if _, st := a.find(ca, fmt.Sprint("id", i)); st != statErr {
			t.Fatal("a lookup hit with the database down")
		}
		if st := a.update(ca, fmt.Sprint("id", i), []byte("x")); st != statErr {
			t.Fatal("an update was stored with the database down")
		}
		slowest = max(slowest, time.Since(t0))
		if i >= sharedTripAfter && time.Since(t0) > 10*time.Millisecond {
			t.Fatalf("request %d waited %v after %d failures", i, time.Since(t0), sharedTripAfter)
		}
	}
	if slowest > 2*a.timeout+time.Second {
		t.Errorf("a request waited %v, the timeout is %v", slowest, a.timeout)
	}
	if n := strings.Count(logged(), "warning: shared database"); n < 1 || n > 3 {
		t.Errorf("%d warnings for 400 failed requests:\n%s", n, logged())
	}
	// A second host starts while the database is down: it makes its own
	// key. So does a host of a realm whose slot has no key in the database.
	b, _ := newTestShared(t, p, "down", 3600, nil)
	c, _ := newTestShared(t, p, "down-new", 3600, nil)
	for _, sh := range []*sharedStore{b, c} {
		if err := sh.refreshKeys(); err == nil {
			t.Fatal("refresh succeeded with the database down")
		}
		sh.tripped()
	}
	kb, _, _ := b.keys.issue()
	kc, _, _ := c.keys.issue()
	if kb.name == k.name {
		t.Fatal("two hosts made the same key alone")
	}
	p.start()
	deadline := time.Now().Add(3 * sharedRetryEvery)
	for (a.down.Load() || b.down.Load() || c.down.Load()) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if a.down.Load() || b.down.Load() || c.down.Load() {
		t.Fatal("the stores did not notice the database's return")
	}
	// One refresh period later (the refresher's run), every host of realm
	// "down" issues with the key the database held for the slot before it
	// went away, and the keys made alone still decrypt on their hosts.
	mustRefresh(t, a)
	mustRefresh(t, b)
	k2, _, _ := a.keys.issue()
	kb2, _, _ := b.keys.issue()
	if k2.name != kb2.name || k2.name != before.name {
		t.Fatalf("after the return: hosts issue with %x and %x, the database's key is %x", k2.name[:4], kb2.name[:4], before.name[:4])
	}
	if _, ok := a.keys.find(k.name[:]); !ok {
		t.Error("host A forgot the key it made while the database was down")
	}
	if _, ok := b.keys.find(kb.name[:]); !ok {
		t.Error("host B forgot the key it made while the database was down")
	}
	// The slot that had no key gets the one host C made alone, and a host
	// that starts now issues with it.
	mustRefresh(t, c)
	d, _ := newTestShared(t, p, "down-new", 3600, nil)
	mustRefresh(t, d)
	if kd, _, _ := d.keys.issue(); kd.name != kc.name {
		t.Fatalf("a new host issues with %x, not with %x, which host C made while the database was down", kd.name[:4], kc.name[:4])
	}
	if st := a.update(ca, "back", []byte("again")); st != statOK {
		t.Fatal("no update after the return")
	}
}

// A host whose clock is 60 s off the database's is warned about once; one
// 2 s off is not. Hosts with different cache timeouts do not share a series.
func TestSharedClockWarningAndSeries(t *testing.T) {
	p := startPG(t)
	logged := captureLog(t)
	near, _ := newTestShared(t, p, "clock", 3600, &fakeClock{base: time.Now(), skew: 2 * time.Second})
	mustRefresh(t, near)
	if strings.Contains(logged(), "clock differs") {
		t.Fatalf("a warning for 2 s:\n%s", logged())
	}
	off, _ := newTestShared(t, p, "clock", 3600, &fakeClock{base: time.Now(), skew: 60 * time.Second})
	mustRefresh(t, off)
	mustRefresh(t, off)
	if n := strings.Count(logged(), "clock differs from the shared database's by 1m0s"); n != 1 {
		t.Fatalf("%d warnings for a clock 60 s ahead, want 1:\n%s", n, logged())
	}
	other, _ := newTestShared(t, p, "clock", 7200, nil)
	mustRefresh(t, other)
	kn, _, _ := near.keys.issue()
	ko, _, _ := other.keys.issue()
	if kn.name == ko.name {
		t.Fatal("hosts with timeouts of 1 h and 2 h issue with one key")
	}
	if _, ok := other.keys.find(kn.name[:]); ok {
		t.Fatal("a host with another timeout decrypts the series' tickets")
	}
}

// A slow database (a table locked by another session): no request waits
// longer than the timeout, and ticket keys do not wait at all.
func TestSharedSlowDatabase(t *testing.T) {
	p := startPG(t)
	a, ca := newTestShared(t, p, "slow", 3600, nil)
	mustRefresh(t, a)
	a.update(ca, "x", []byte("session"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, p.dsn())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "LOCK TABLE smtpd_cache, ticket_keys IN ACCESS EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { // the refresher meets the lock too
		defer close(done)
		a.refreshKeys()
	}()
	for i := range 6 {
		t0 := time.Now()
		if _, st := a.find(ca, "x"); st != statErr {
			t.Fatal("a lookup through a locked table hit")
		}
		if took := time.Since(t0); took > a.timeout+500*time.Millisecond {
			t.Fatalf("lookup %d waited %v, the timeout is %v", i, took, a.timeout)
		}
		t0 = time.Now()
		if _, _, err := a.keys.issue(); err != nil || time.Since(t0) > 50*time.Millisecond {
			t.Fatalf("tktkey: %v after %v", err, time.Since(t0))
		}
	}
	if !a.down.Load() {
		t.Error("repeated timeouts did not stop requests from waiting")
	}
	// The retry's probe reads the tables too: while they are locked, the
	// store stays down rather than letting requests wait again.
	time.Sleep(sharedRetryEvery + a.timeout + 500*time.Millisecond)
	if !a.down.Load() {
		t.Error("the retry took the database for back while its tables were locked")
	}
	// At exit nothing waits for the database: close cancels what is under way.
	blocked := make(chan struct{})
	go func() {
		defer close(blocked)
		a.down.Store(false)
		a.find(ca, "x")
	}()
	time.Sleep(100 * time.Millisecond)
	t0 := time.Now()
	a.close()
	<-blocked
	if took := time.Since(t0); took > 500*time.Millisecond {
		t.Errorf("close took %v with a statement waiting on a lock", took)
	}
	tx.Rollback(ctx)
	<-done
}

// Keys the database names for slots far ahead cannot push out the keys in
// use, nor make issue hand out a wiped (all-zero) key.
func TestSharedFarSlotsIgnored(t *testing.T) {
	clock := &fakeClock{base: time.Unix(1_800_000_000, 0)}
	keys := newTicketKeys(3600, rand.Reader)
	keys.slotted = true
	keys.now, keys.mono = clock.now, clock.mono
	cur := keys.slotOf(clock.now().Unix())
	var in []ticketKey
	for i := int64(2); i < 2+maxSlottedKeys; i++ {
		var k ticketKey
		rand.Read(k.name[:])
		rand.Read(k.bits[:])
		rand.Read(k.hmac[:])
		k.slot = cur + i
		in = append(in, k)
	}
	keys.adopt(in)
	k, made, err := keys.issue()
	if err != nil || !made || k.name == ([16]byte{}) || k.bits == ([32]byte{}) || k.tout != (cur+1)*1800 {
		t.Fatalf("issue: made %v, err %v, name %x, tout %d", made, err, k.name, k.tout)
	}
	if n := len(keys.held); n != 1 {
		t.Errorf("%d keys held, want only the one issuing", n)
	}
}

// The largest session a client may store is read back, and does not count
// as the database failing.
func TestSharedLargestRow(t *testing.T) {
	p := startPG(t)
	a, ca := newTestShared(t, p, "big", 3600, nil)
	mustRefresh(t, a)
	id := strings.Repeat("a", 4096)
	session := make([]byte, maxAttrLen)
	rand.Read(session)
	if st := a.update(ca, id, session); st != statOK {
		t.Fatalf("update %d", st)
	}
	for range sharedTripAfter + 1 {
		if got, st := a.find(ca, id); st != statOK || !bytes.Equal(got, session) {
			t.Fatalf("lookup of the largest session: %d", st)
		}
	}
	if a.down.Load() || a.failures.Load() != 0 {
		t.Fatalf("down %v, failures %d", a.down.Load(), a.failures.Load())
	}
}

// Missing views and a schema lock held elsewhere: requests never wait for
// the tables to be made, and the store works without the views.
func TestSharedSchemaNeverInRequests(t *testing.T) {
	p := startPG(t)
	a, ca := newTestShared(t, p, "schema", 3600, nil)
	mustRefresh(t, a)
	a.update(ca, "x", []byte("session"))
	p.sql("DROP VIEW cache_stats")
	a.schemaOK.Store(false) // as after a missing table, or at start
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, p.dsn())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock(7375696770)"); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var worst time.Duration
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			a.find(ca, "x")
			mu.Lock()
			worst = max(worst, time.Since(t0))
			mu.Unlock()
		}()
	}
	wg.Wait()
	if worst > 100*time.Millisecond {
		t.Errorf("a lookup waited %v while the tables were being looked at", worst)
	}
	conn.Exec(ctx, "SELECT pg_advisory_unlock(7375696770)")
	b := limitedHost(t, p, "schema")
	if !b.ensureSchema() {
		t.Fatal("a role that may not create the views cannot use the tables")
	}
	if s, st := b.find(ca, "x"); st != statOK || string(s) != "session" {
		t.Fatalf("lookup as the limited role: %d %q", st, s)
	}
}

// limitedHost is a host whose role, limited, may only read and write
// tlsmgr's tables (which must exist), as README's set-up by hand grants,
// and may create nothing.
func limitedHost(t *testing.T, p *pgServer, realm string) *sharedStore {
	t.Helper()
	p.sql("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
	p.sql("CREATE ROLE limited LOGIN")
	p.sql("GRANT SELECT, INSERT, UPDATE, DELETE ON ticket_keys, smtpd_cache, smtp_cache, lmtp_cache TO limited")
	pc, _ := sharedPoolConfig(strings.Replace(p.dsn(), "user=tlsmgr", "user=limited", 1), 2*time.Second)
	sc := &sharedConfig{pool: pc, realm: realm, caches: []string{"smtpd"}, timeout: 2 * time.Second}
	copy(sc.secret[:], testSecret)
	sh, err := newSharedStore(sc, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sh.close)
	return sh
}

// Failures while a retry is ending never leave the store down for good:
// once they stop, it is back within a few retries.
func TestSharedNeverStuckDown(t *testing.T) {
	p := startPG(t)
	a, _ := newTestShared(t, p, "stuck", 3600, nil)
	mustRefresh(t, a)
	boom := errors.New("boom")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				a.do("hammer", true, func(context.Context) error { return boom })
			}
		}()
	}
	time.Sleep(4 * sharedRetryEvery)
	close(stop)
	wg.Wait()
	deadline := time.Now().Add(3 * sharedRetryEvery)
	for a.down.Load() && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if a.down.Load() {
		t.Fatal("the store stayed down with the database up")
	}
}

// The files a connection string names are found, before pgx reads them;
// a string where they could hide from the scan is refused; and one that
// someone else could have written turns sharing off.
func TestSharedConnFiles(t *testing.T) {
	for conn, want := range map[string]string{
		"host=db port=5432 passfile=/etc/postfix/pgpass sslrootcert='/etc/my ca.pem' sslmode=verify-full": "/etc/postfix/pgpass|/etc/my ca.pem",
		`sslkey = '/k\'ey' dbname=x`:                      "/k'ey",
		"host=db\vsslcert=/etc/c.pem\fdbname=x":           "/etc/c.pem",
		"host=db dbname=x":                                "",
		"postgresql://u@db/tlsmgr?sslmode=verify-full":    "",
		"postgresql://u@db/tlsmgr?a=b#c&sslkey=/home/u/k": "ERROR",
		"postgres://h1:5432,h2/db?sslrootcert=/tmp/x":     "ERROR",
		"host=db service=mx":                              "ERROR",
		"host=db servicefile=/tmp/s":                      "ERROR",
		"host=db options='-c x=1 sslkey=/tmp/k'":          "ERROR",
	} {
		got, err := connFiles(conn)
		if want == "ERROR" {
			if err == nil {
				t.Errorf("%q: accepted, files %q", conn, got)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", conn, err)
			continue
		}
		sort.Strings(got)
		w := strings.Split(want, "|")
		if want == "" {
			w = nil
		}
		sort.Strings(w)
		if strings.Join(got, "|") != strings.Join(w, "|") {
			t.Errorf("%s: %q, want %q", conn, got, w)
		}
	}
	if err := checkRootPath("/etc/passwd"); err != nil && os.Geteuid() == 0 {
		t.Errorf("/etc/passwd: %v", err)
	}
	dir := t.TempDir()
	os.Chmod(dir, 0o777)
	f := filepath.Join(dir, "pgpass")
	os.WriteFile(f, []byte("*:*:*:*:x\n"), 0o600)
	if err := checkRootPath(f); err == nil || !strings.Contains(err.Error(), "others may write") {
		t.Errorf("a file in a world-writable directory: %v", err)
	}
	if err := checkRootPath("relative/pgpass"); err == nil {
		t.Error("a relative path was accepted")
	}
}

// Without its secret, sharing stays off with one warning that says how to
// make one; a secret others may read is refused the same way.
func TestSharedNeedsSecret(t *testing.T) {
	dir := t.TempDir()
	logged := captureLog(t)
	for _, setup := range []func(string){
		func(string) {},
		func(f string) { os.WriteFile(f, bytes.Repeat([]byte{1}, sharedSecretLen), 0o644) },
		func(f string) { os.WriteFile(f, bytes.Repeat([]byte{1}, 16), 0o600) },
	} {
		secret := filepath.Join(dir, "key")
		os.Remove(secret)
		setup(secret)
		cfg := newConfig()
		for _, o := range []string{"tlsmgr_shared_database=host=127.0.0.1 port=1 user=x dbname=y", "tlsmgr_shared_secret_file=" + secret} {
			if err := cfg.setOverride(o); err != nil {
				t.Fatal(err)
			}
		}
		if sc := prepareShared(cfg); sc != nil {
			t.Errorf("sharing is on with %s", secret)
		}
	}
	if n := strings.Count(logged(), "sharing stays off. Make one as root with: umask 077; head -c 32 /dev/urandom > "); n != 3 {
		t.Errorf("%d warnings for 3 unfit secrets:\n%s", n, logged())
	}
	for _, want := range []string{"no such file", "others may read it", "holds 16 bytes, not 32"} {
		if !strings.Contains(logged(), want) {
			t.Errorf("no %q in:\n%s", want, logged())
		}
	}
}

// Tables that an earlier tlsmgr made (testdata/schema_shared-earlier.sql,
// its schema_shared.sql) lack peer_rpk. A role that may only read and
// write them gets one warning and stores sessions without the column,
// which still come back; the tables' owner brings them up to date (the
// column, and the sessions view with it at its end), after which a raw
// public key's session shows peer_rpk 1 and the key's fingerprint.
func TestSharedSchemaOfAnEarlierVersion(t *testing.T) {
	p := startPG(t)
	earlier, err := os.ReadFile("testdata/schema_shared-earlier.sql")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(earlier), "peer_rpk") {
		t.Fatal("testdata/schema_shared-earlier.sql already has peer_rpk")
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, p.dsn())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, string(earlier)); err != nil {
		t.Fatal(err)
	}
	blob := testSession(t, "tls13-rpk")
	fingerprint := oraclePeer(t, "tls13-rpk", "rpk").fingerprint

	logged := captureLog(t)
	limited := limitedHost(t, p, "earlier")
	c := &cache{label: "smtpd", database: "btree:x", timeout: 3600, shared: limited}
	if !limited.ensureSchema() {
		t.Fatal("a role that may not alter the tables cannot use them")
	}
	if st := limited.update(c, "limited", blob); st != statOK {
		t.Fatalf("update as the limited role: %d\n%s", st, logged())
	}
	if s, st := limited.find(c, "limited"); st != statOK || !bytes.Equal(s, blob) {
		t.Fatalf("lookup as the limited role: %d", st)
	}
	if n := strings.Count(logged(), "warning:"); n != 1 || !strings.Contains(logged(), "the peer_rpk column of its cache tables (made by an earlier tlsmgr) is missing") {
		t.Errorf("want one warning that peer_rpk is missing:\n%s", logged())
	}

	owner, oc := newTestShared(t, p, "earlier", 3600, nil)
	if !owner.ensureSchema() || !strings.Contains(logged(), "brought tlsmgr's tables and views up to date") {
		t.Fatalf("the owner did not bring the tables up to date:\n%s", logged())
	}
	if st := owner.update(oc, "owner", blob); st != statOK {
		t.Fatalf("update as the owner: %d", st)
	}
	rows := p.sql("SELECT id, coalesce(peer_rpk, -1), peer_fingerprint FROM sessions ORDER BY id")
	got := fmt.Sprint(rows)
	if want := fmt.Sprint([][]any{{"limited", int32(-1), fingerprint}, {"owner", int32(1), fingerprint}}); got != want {
		t.Errorf("sessions view: %s, want %s", got, want)
	}
	for _, table := range sharedCacheTables {
		if n := p.sql("SELECT count(*) FROM pg_attribute WHERE attrelid = $1::regclass AND attname = 'peer_rpk' AND NOT attisdropped", table); n[0][0] != int64(1) {
			t.Errorf("%s has no peer_rpk", table)
		}
	}
}
