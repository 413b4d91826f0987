package main

// Faults that a mail admin meets, driven through a real Postfix master(8)
// (see e2e_test.go): links planted in data_directory, a second tlsmgr by
// hand, kill -9 at any moment and under load, a bad tlsmgr.toml.

import (
	"bufio"
	"context"
	"database/sql"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// plantedLinks are symbolic links put in data_directory before Postfix
// starts, where tlsmgr's files go: to root's files, and one dangling.
type plantedLinks struct {
	targets map[string]string    // name in data_directory -> target
	before  map[string]fileState // each target, before
}

func (p *postfixInstance) plantLinks() *plantedLinks {
	outside := filepath.Join(p.dir, "outside") // root's, 0755
	os.Mkdir(outside, 0755)
	pl := &plantedLinks{targets: map[string]string{}, before: map[string]fileState{}}
	for _, name := range []string{"prng_exch", "tlsmgr.sqlite-wal", "tlsmgr.sqlite-shm", "tlsmgr.sqlite.lock"} {
		target := filepath.Join(outside, "root-"+name)
		os.WriteFile(target, []byte("root's "+name), 0644)
		pl.targets[name] = target
	}
	pl.targets["tlsmgr.sqlite"] = filepath.Join(outside, "dangling")
	for name, target := range pl.targets {
		if err := os.Symlink(target, filepath.Join(p.data, name)); err != nil {
			p.t.Fatal(err)
		}
		pl.before[name] = stateOf(p.t, target)
	}
	return pl
}

func (pl *plantedLinks) check(t *testing.T, p *postfixInstance) {
	for name, target := range pl.targets {
		if after := stateOf(t, target); after != pl.before[name] {
			t.Errorf("%s -> %s changed: %+v, was %+v", name, target, after, pl.before[name])
		}
	}
	out, _ := run(t, time.Minute, "id", "-u", "postfix")
	uid, _ := strconv.Atoi(strings.TrimSpace(out))
	for _, name := range []string{"prng_exch", "tlsmgr.sqlite", "tlsmgr.sqlite.lock"} {
		fi, err := os.Lstat(filepath.Join(p.data, name))
		if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0600 || fi.Sys().(*syscall.Stat_t).Uid != uint32(uid) {
			t.Errorf("%s: %v %v; want a regular 0600 file of postfix", name, fi.Mode(), err)
		}
	}
	for _, want := range []string{`tlsmgr\[\d+\]: warning: refusing PRNG exchange file .*/prng_exch: it is a symbolic link; replacing it`,
		`tlsmgr\[\d+\]: warning: refusing lock file .*/tlsmgr.sqlite.lock: it is a symbolic link; replacing it`} {
		if !regexp.MustCompile(want).MatchString(p.logText()) {
			t.Errorf("log lacks %s", want)
		}
	}
}

// tlsmgrSocket is private/tlsmgr of the instance.
func (p *postfixInstance) tlsmgrSocket() string { return p.spool + "/private/tlsmgr" }

// dialTlsmgr connects like a Postfix client and reads the announcement;
// it returns errors rather than failing the test, for clients that expect
// tlsmgr to be killed under them.
func dialTlsmgr(sock string) (net.Conn, *attrReader, error) {
	conn, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return nil, nil, err
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := &attrReader{br: bufio.NewReader(conn), streamName: sock}
	if _, err := readList(r); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("announcement: %v", err)
	}
	return conn, r, nil
}

// ask sends one request on a new connection and returns the reply as
// name=value words, or an error; it never fails the test itself.
func ask(sock string, pairs ...string) (string, error) {
	conn, r, err := dialTlsmgr(sock)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	var w attrWriter
	for i := 0; i+1 < len(pairs); i += 2 {
		w.str(pairs[i], pairs[i+1])
	}
	w.end()
	if _, err := conn.Write(w.buf); err != nil {
		return "", err
	}
	list, err := readList(r)
	if err != nil {
		return "", err
	}
	var out []string
	for _, kv := range list {
		out = append(out, kv[0]+"="+kv[1])
	}
	return strings.Join(out, " "), nil
}

func (p *postfixInstance) secondDaemonRefuses(t *testing.T) {
	sock := p.tlsmgrSocket()
	if got, err := ask(sock, "request", "update", "cache_type", "smtp", "cache_id", "kept", "session", b64("by the first")); got != "status=0" {
		t.Fatalf("update through master's tlsmgr: %q %v", got, err)
	}
	db := filepath.Join(p.data, "tlsmgr.sqlite")
	before := stateOf(t, db)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second) // a tlsmgr that starts would serve forever
	defer cancel()
	cmd := exec.CommandContext(ctx, p.bin, "-listen", filepath.Join(p.dir, "second.sock"), "-mailconfig", p.etc, "-data", p.data)
	out, err := cmd.CombinedOutput()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	re := regexp.MustCompile(`fatal: session cache database ` + regexp.QuoteMeta(db) + ` is in use by another tlsmgr \(pid \d+\); not starting$`)
	if err == nil || len(lines) != 1 || !re.MatchString(lines[0]) {
		t.Errorf("second tlsmgr by hand: %v\n%s", err, out)
	}
	if after := stateOf(t, db); after != before {
		t.Error("the second tlsmgr changed the database")
	}
	if got, err := ask(sock, "request", "lookup", "cache_type", "smtp", "cache_id", "kept"); got != "status=0 session="+b64("by the first") {
		t.Errorf("the running tlsmgr lost its entry: %q %v", got, err)
	}
}

// updateLoad is update-heavy traffic on several connections, as smtpd and
// smtp make it, that reconnects when tlsmgr dies. pause stops it between
// requests.
type updateLoad struct {
	pause   sync.RWMutex
	stop    atomic.Bool
	ok, bad atomic.Int64
	wg      sync.WaitGroup
}

func (p *postfixInstance) startLoad(conns int) *updateLoad {
	l := &updateLoad{}
	session := []byte(strings.Repeat("s", 2000))
	for n := range conns {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			var conn net.Conn
			var r *attrReader
			for i := 0; !l.stop.Load(); i++ {
				if conn == nil {
					c, cr, err := dialTlsmgr(p.tlsmgrSocket())
					if err != nil {
						time.Sleep(20 * time.Millisecond)
						continue
					}
					conn, r = c, cr
				}
				id := fmt.Sprintf("load%d-%d", n, rand.IntN(200))
				var w attrWriter
				if i%10 == 9 {
					w.str("request", "lookup")
					w.str("cache_type", "smtpd")
					w.str("cache_id", id)
				} else {
					w.str("request", "update")
					w.str("cache_type", "smtpd")
					w.str("cache_id", id)
					w.data("session", session)
				}
				w.end()
				l.pause.RLock()
				conn.SetDeadline(time.Now().Add(10 * time.Second))
				_, err := conn.Write(w.buf)
				if err == nil {
					_, err = readList(r)
				}
				l.pause.RUnlock()
				if err != nil {
					l.bad.Add(1)
					conn.Close()
					conn = nil
					continue
				}
				l.ok.Add(1)
			}
			if conn != nil {
				conn.Close()
			}
		}()
	}
	return l
}

func (l *updateLoad) finish() {
	l.stop.Store(true)
	l.wg.Wait()
}

// waitNewTlsmgr waits for a tlsmgr other than old to run and answer.
func (p *postfixInstance) waitNewTlsmgr(t *testing.T, old string, limit time.Duration) (string, time.Duration) {
	t.Helper()
	start := time.Now()
	for time.Since(start) < limit {
		if pids := p.tlsmgrPIDs(); len(pids) == 1 && pids[0] != old {
			if got, err := ask(p.tlsmgrSocket(), "request", "seed", "size", "32"); err == nil && strings.HasPrefix(got, "status=0 ") {
				return pids[0], time.Since(start)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no new tlsmgr answered within %v (old pid %s, now %v)\n%s", limit, old, p.tlsmgrPIDs(), p.tail(30))
	return "", 0
}

func (p *postfixInstance) tail(n int) string {
	lines := strings.Split(strings.TrimSpace(p.logText()), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func (p *postfixInstance) onlyTlsmgr(t *testing.T) string {
	t.Helper()
	pids := p.tlsmgrPIDs()
	if len(pids) != 1 {
		t.Fatalf("tlsmgr processes: %v", pids)
	}
	return pids[0]
}

func kill9(t *testing.T, pid string) {
	t.Helper()
	n, _ := strconv.Atoi(pid)
	if err := syscall.Kill(n, syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 %s: %v", pid, err)
	}
}

// master throttles a service for a minute when a process that never told
// it "available" dies; a tlsmgr under load from its first moment must
// still be restarted at once.
func (p *postfixInstance) killBusySinceStart(t *testing.T) {
	l := p.startLoad(4)
	defer l.finish()
	time.Sleep(300 * time.Millisecond)
	first := p.onlyTlsmgr(t)
	kill9(t, first)
	busy, _ := p.waitNewTlsmgr(t, first, 10*time.Second) // started under load
	time.Sleep(time.Second)
	off := p.logSize()
	kill9(t, busy)
	_, took := p.waitNewTlsmgr(t, busy, 20*time.Second)
	if took > 5*time.Second {
		t.Errorf("the next tlsmgr took %v to answer", took)
	}
	if m := regexp.MustCompile(`(?m)^.*master\[\d+\]: warning: .*tlsmgr: bad command startup -- throttling$`).FindString(p.logText()[off:]); m != "" {
		t.Errorf("master throttled tlsmgr: %s", m)
	}
	if l.ok.Load() == 0 {
		t.Error("the load made no request")
	}
}

// killLoop kills tlsmgr n times under update-heavy load. Each time, while
// the load and master(8) are paused (master may start the next tlsmgr at
// any moment, for a wake-up trigger, and that one removes the database at
// its start), the killed process's database as the kill left it must pass
// integrity_check and the exchange file must be whole; then the service
// must come back.
func (p *postfixInstance) killLoop(t *testing.T, n int) {
	l := p.startLoad(4)
	defer l.finish()
	out, _ := run(t, time.Minute, "id", "-u", "postfix")
	postfixUID, _ := strconv.Atoi(strings.TrimSpace(out))
	var worst time.Duration
	for i := range n {
		time.Sleep(time.Duration(200+rand.IntN(600)) * time.Millisecond) // a moment in the middle of the load
		before := l.ok.Load()
		l.pause.Lock()
		pid := p.onlyTlsmgr(t)
		master := p.masterPID(t)
		syscall.Kill(master, syscall.SIGSTOP)
		kill9(t, pid)
		for j := 0; j < 100 && contains(p.tlsmgrPIDs(), pid); j++ {
			time.Sleep(10 * time.Millisecond)
		}
		if check := integrityOfCopy(t, filepath.Join(p.data, "tlsmgr.sqlite")); check != "ok" {
			t.Errorf("kill %d: integrity_check of the killed tlsmgr's database: %s", i+1, check)
		}
		exch := filepath.Join(p.data, "prng_exch")
		if fi, err := os.Lstat(exch); err != nil || fi.Size() != 1024 || fi.Mode().Perm() != 0600 || !fi.Mode().IsRegular() ||
			fi.Sys().(*syscall.Stat_t).Uid != uint32(postfixUID) {
			t.Errorf("kill %d: exchange file %v: want 1024 bytes, 0600, regular, postfix's (%v)", i+1, fi, err)
		}
		syscall.Kill(master, syscall.SIGCONT)
		l.pause.Unlock()
		_, took := p.waitNewTlsmgr(t, pid, 20*time.Second)
		worst = max(worst, took)
		if l.ok.Load() == before {
			t.Errorf("kill %d: the load made no progress before it", i+1)
		}
	}
	t.Logf("%d kills: service back within %v at worst; %d requests answered, %d cut by the kills", n, worst, l.ok.Load(), l.bad.Load())
	if m := regexp.MustCompile(`(?m)^.*master\[\d+\]: warning: .*tlsmgr: bad command startup -- throttling$`).FindString(p.logText()); m != "" {
		t.Errorf("master throttled tlsmgr: %s", m)
	}
}

func (p *postfixInstance) masterPID(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile(p.spool + "/pid/master.pid")
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		t.Fatalf("master.pid: %q %v", b, err)
	}
	return pid
}

// integrityOfCopy runs PRAGMA integrity_check on a copy of a database and
// its -wal, as a crash left them.
func integrityOfCopy(t *testing.T, db string) string {
	t.Helper()
	dir := t.TempDir()
	for _, suffix := range []string{"", "-wal"} {
		src, err := os.Open(db + suffix)
		if err != nil {
			if suffix == "" {
				return err.Error()
			}
			continue
		}
		dst, _ := os.Create(filepath.Join(dir, "copy.sqlite"+suffix))
		io.Copy(dst, src)
		src.Close()
		dst.Close()
	}
	conn, err := sql.Open("sqlite", filepath.Join(dir, "copy.sqlite"))
	if err != nil {
		return err.Error()
	}
	defer conn.Close()
	var check string
	if err := conn.QueryRow("PRAGMA integrity_check").Scan(&check); err != nil {
		return err.Error()
	}
	return check
}

// badTOMLIsLogged starts the instance with a broken tlsmgr.toml: the
// fatal error must reach the maillog_file log with tlsmgr's tag, not
// vanish with stderr.
func (p *postfixInstance) badTOMLIsLogged(t *testing.T) {
	toml := filepath.Join(p.etc, "tlsmgr.toml")
	os.WriteFile(toml, []byte("tls_random_bytes = \"many\"\nthis is not TOML\n"), 0644)
	defer os.Remove(toml)
	off := p.logSize()
	p.postfix("start")
	defer p.postfix("stop")
	go ask(p.tlsmgrSocket(), "request", "seed", "size", "32") // master starts tlsmgr for it
	re := `e2e/tlsmgr\[\d+\]: fatal: TOML file ` + regexp.QuoteMeta(toml) + `, line 2: .*`
	if line := p.waitLog(off, re, 10*time.Second); line == "" {
		t.Errorf("no %s in the mail log:\n%s", re, p.logText()[off:])
	}
}
