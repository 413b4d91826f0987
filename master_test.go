package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	builtPath string
	buildErr  error
)

// tlsmgrBinary builds tlsmgr once per test run, or uses $TLSMGR_BINARY,
// which .ci/run sets to the static binary it has just built from this tree.
func tlsmgrBinary(t *testing.T) string {
	t.Helper()
	if prebuilt := os.Getenv("TLSMGR_BINARY"); prebuilt != "" {
		return prebuilt
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "tlsmgr-bin")
		if err != nil {
			buildErr = err
			return
		}
		builtPath = filepath.Join(dir, "tlsmgr")
		out, err := exec.Command("go", "build", "-o", builtPath, ".").CombinedOutput()
		if err != nil {
			buildErr = err
			t.Logf("go build: %s", out)
		}
	})
	if buildErr != nil {
		t.Fatalf("build tlsmgr: %v", buildErr)
	}
	return builtPath
}

// fakeMaster runs the binary the way master(8) does: fds 3 and 4 a pipe,
// fd 5 the status socket, fd 6 the listening socket, GENERATION in octal.
type fakeMaster struct {
	t        *testing.T
	dir      string
	cmd      *exec.Cmd
	status   *os.File // our end of fd 5
	sock     string
	stderr   *lockedBuffer
	exited   chan struct{}
	exitCode int
}

func mainCFFor(dir string) string {
	owner := "nobody"
	if u, err := user.Current(); err == nil && u.Uid != "0" {
		owner = u.Username
	}
	return strings.Join([]string{
		"queue_directory = " + dir + "/queue",
		"data_directory = " + dir + "/data",
		"mail_owner = " + owner,
		"smtpd_tls_session_cache_database = btree:${data_directory}/smtpd_scache",
		"smtp_tls_session_cache_database = btree:${data_directory}/smtp_scache",
		"smtpd_tls_session_cache_timeout = 3600s",
		"",
	}, "\n")
}

// makeInstanceDirs makes queue and data directories under dir. As root
// they belong to the test's mail_owner, nobody, who must be able to reach
// them: tlsmgr opens its files as mail_owner.
func makeInstanceDirs(t *testing.T, dir string) {
	t.Helper()
	if os.Geteuid() == 0 {
		os.Chmod(dir, 0755)
		os.Chmod(filepath.Dir(dir), 0755) // t.TempDir's parent
	}
	for _, d := range []string{"queue", "data"} {
		os.MkdirAll(filepath.Join(dir, d), 0755)
		if os.Geteuid() == 0 {
			uid, gid := nobody(t)
			os.Chown(filepath.Join(dir, d), uid, gid)
		}
	}
}

// asNobody, for a test run as root, gives dir to nobody (and lets nobody
// reach it) and returns the option that makes a standalone tlsmgr run as
// nobody: started as root, tlsmgr never runs as root.
func asNobody(t testing.TB, dir string) []string {
	if os.Geteuid() != 0 {
		return nil
	}
	uid, gid := nobody(t)
	os.Chmod(filepath.Dir(dir), 0755) // t.TempDir's parent
	filepath.Walk(dir, func(path string, _ os.FileInfo, _ error) error {
		os.Chown(path, uid, gid)
		return nil
	})
	return []string{"-user", "nobody"}
}

// nobody is the mail_owner of the fake-master tests run as root.
func nobody(t testing.TB) (uid, gid int) {
	u, err := user.Lookup("nobody")
	if err != nil {
		t.Fatalf("tests as root need the user nobody: %v", err)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid
}

func startMaster(t *testing.T, dir, mainCF string, args ...string) *fakeMaster {
	t.Helper()
	makeInstanceDirs(t, dir)
	writeFile(t, dir, "main.cf", mainCF)
	sock := filepath.Join(dir, "queue", "tlsmgr")
	os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	lnFile, _ := ln.(*net.UnixListener).File()
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	pr, pw, _ := os.Pipe()
	pair, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	syscall.SetNonblock(pair[0], true) // pollable, so that read deadlines work
	ours, theirs := os.NewFile(uintptr(pair[0]), "status"), os.NewFile(uintptr(pair[1]), "child status")
	m := &fakeMaster{t: t, dir: dir, status: ours, sock: sock, stderr: &lockedBuffer{}, exited: make(chan struct{})}
	if os.Geteuid() == 0 && !slices.Contains(args, "-u") {
		args = append(args, "-u") // as master(8) runs an unprivileged service, Debian's tlsmgr among them
	}
	m.cmd = exec.Command(tlsmgrBinary(t), args...)
	m.cmd.Args[0] = "tlsmgr"
	generation := "21"
	if g := os.Getenv("TLSMGR_TEST_GENERATION"); g != "" {
		generation = g
	}
	m.cmd.Env = []string{"MAIL_CONFIG=" + dir, "GENERATION=" + generation, "PATH=/usr/bin:/bin"}
	m.cmd.ExtraFiles = []*os.File{pr, pw, theirs, lnFile} // fds 3, 4, 5, 6
	m.cmd.Stderr = &syncWriter{b: m.stderr}
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pr.Close()
	pw.Close()
	theirs.Close()
	lnFile.Close()
	go func() {
		m.cmd.Wait()
		m.exitCode = m.cmd.ProcessState.ExitCode()
		close(m.exited)
	}()
	t.Cleanup(func() {
		m.cmd.Process.Kill()
		<-m.exited
		ours.Close()
		// A daemon built with -race (as .ci/run does) reports here.
		if strings.Contains(m.log(), "WARNING: DATA RACE") {
			t.Errorf("the race detector found a data race in tlsmgr:\n%s", m.log())
		}
	})
	return m
}

type syncWriter struct {
	mu sync.Mutex
	b  *lockedBuffer
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (m *fakeMaster) log() string {
	m.cmd.Stderr.(*syncWriter).mu.Lock()
	defer m.cmd.Stderr.(*syncWriter).mu.Unlock()
	return m.stderr.String()
}

// wait returns the exit code, or fails the test after the timeout.
func (m *fakeMaster) wait(timeout time.Duration) int {
	m.t.Helper()
	select {
	case <-m.exited:
		return m.exitCode
	case <-time.After(timeout):
		m.t.Fatalf("tlsmgr still running after %v; log:\n%s", timeout, m.log())
		return -1
	}
}

// waitSocket waits until the daemon answers on the socket.
func (m *fakeMaster) dial() *client {
	m.t.Helper()
	for i := 0; i < 100; i++ {
		select {
		case <-m.exited:
			m.t.Fatalf("tlsmgr exited with %d; log:\n%s", m.exitCode, m.log())
		default:
		}
		if c, err := net.Dial("unix", m.sock); err == nil {
			c.Close()
			return dial(m.t, m.sock)
		}
		time.Sleep(50 * time.Millisecond)
	}
	m.t.Fatalf("no answer on %s; log:\n%s", m.sock, m.log())
	return nil
}

// The status records, the trigger, and master's disconnect (§10.2, 10.17, 10.19).
func TestUnderFakeMaster(t *testing.T) {
	dir := t.TempDir()
	m := startMaster(t, dir, mainCFFor(dir), "-l", "-t", "unix", "-d", "-V")
	c := m.dial()
	if got := c.req("request", "policy", "cache_type", "smtpd"); got != "status=0 cachable=1 timeout=3600" {
		t.Errorf("policy: %s", got)
	}
	var rec [24]byte
	m.status.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(m.status, rec[:]); err != nil {
		t.Fatalf("status records: %v", err)
	}
	pid := uint32(m.cmd.Process.Pid)
	for i, avail := range []uint32{0, 1} {
		r := rec[i*12:]
		if binary.LittleEndian.Uint32(r) != pid || binary.LittleEndian.Uint32(r[4:]) != 021 || binary.LittleEndian.Uint32(r[8:]) != avail {
			t.Errorf("status record %d = % x, want pid %d, generation 17, avail %d", i, r[:12], pid, avail)
		}
	}
	trig := m.dial()
	trig.conn.Write([]byte("W\x00"))
	if !trig.closed() {
		t.Error("trigger connection not closed")
	}
	exch := filepath.Join(dir, "data", "prng_exch")
	before, _ := os.ReadFile(exch)
	if st, err := os.Stat(exch); err != nil || st.Mode().Perm() != 0600 || len(before) != 1024 {
		t.Fatalf("exchange file: %v, %d bytes", err, len(before))
	}
	m.status.Close() // master goes away, or "postfix reload"
	if code := m.wait(5 * time.Second); code != 0 {
		t.Errorf("exit code %d after master disconnect, want 0", code)
	}
	after, _ := os.ReadFile(exch)
	if bytes.Equal(before, after) || len(after) != 1024 {
		t.Error("exchange file not rewritten on exit")
	}

	// A second start reads the saved file into its pool and writes a fresh
	// one, and finds the caches empty.
	m2 := startMaster(t, dir, mainCFFor(dir), "-l", "-t", "unix", "-d")
	c2 := m2.dial()
	if restarted, _ := os.ReadFile(exch); bytes.Equal(restarted, after) || len(restarted) != 1024 {
		t.Error("exchange file not read back and rewritten at start")
	}
	if got := c2.req("request", "update", "cache_type", "smtp", "cache_id", "k", "session", b64("v")); got != "status=0" {
		t.Fatalf("update before the restart: %s", got)
	}
	if got := c2.req("request", "lookup", "cache_type", "smtp", "cache_id", "k"); got != "status=0 session="+b64("v") {
		t.Fatalf("lookup before the restart: %s", got)
	}
	m2.status.Close()
	m2.wait(5 * time.Second)
	m3 := startMaster(t, dir, mainCFFor(dir), "-l", "-t", "unix", "-d")
	if got := m3.dial().req("request", "lookup", "cache_type", "smtp", "cache_id", "k"); got != "status=4294967295 session=" {
		t.Errorf("cache survived a restart: %s", got)
	}
}

// Start-up failures: one fatal line and exit 1 (§10.11, §10.19).
func TestStartupFatals(t *testing.T) {
	for _, tc := range []struct {
		name, extraCF string
		args          []string
		want          string
	}{
		{"no process limit", "", []string{"-t", "unix", "-d"}, "fatal: service tlsmgr requires a process limit of 1"},
		{"bad time unit", "smtp_tls_session_cache_timeout = 10x\n", []string{"-l", "-t", "unix", "-d"},
			"fatal: parameter smtp_tls_session_cache_timeout: bad time value or unit: 10x"},
		{"timeout out of range", "smtpd_tls_session_cache_timeout = 9000000\n", []string{"-l", "-t", "unix", "-d"},
			"fatal: invalid smtpd_tls_session_cache_timeout: 9000000 (max 8640000)"},
		{"same database twice", "lmtp_tls_session_cache_database = btree:${data_directory}/smtp_scache\n", []string{"-l", "-t", "unix", "-d"},
			"fatal: do not use the same TLS cache file btree:" + "DIR/data/smtp_scache for smtp and lmtp"},
		{"-o override is checked too", "", []string{"-l", "-t", "unix", "-d", "-o", "tls_random_bytes=0"},
			"fatal: invalid tls_random_bytes parameter value 0 < 1"},
		{"unknown syslog facility", "syslog_facility = mial\n", []string{"-l", "-t", "unix", "-d"},
			"fatal: parameter syslog_facility: unknown syslog facility: mial"},
		{"unknown option", "", []string{"-l", "-t", "unix", "-d", "-q"}, "fatal: invalid option: q"},
		{"bad transport", "", []string{"-l", "-t", "fifo", "-d"}, "fatal: unsupported transport type: fifo"},
		{"bad generation", "GENERATION=9z", []string{"-l", "-t", "unix", "-d"}, "fatal: bad generation: 9z"},
		{"bad -o syntax", "", []string{"-l", "-t", "unix", "-d", "-o", "novalue"},
			`fatal: invalid "-o novalue" option value: missing '=' after attribute name`},
		{"bad tlsmgr.toml", "TOML=this is not TOML\n", []string{"-l", "-t", "unix", "-d"},
			"fatal: TOML file DIR/tlsmgr.toml, line 1: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cf := mainCFFor(dir)
			if toml, ok := strings.CutPrefix(tc.extraCF, "TOML="); ok {
				writeFile(t, dir, "tlsmgr.toml", toml)
			} else if !strings.HasPrefix(tc.extraCF, "GENERATION=") {
				cf += tc.extraCF
			}
			m := startMasterEnv(t, dir, cf, tc.extraCF, tc.args...)
			if code := m.wait(10 * time.Second); code != 1 {
				t.Errorf("exit code %d, want 1", code)
			}
			want := strings.ReplaceAll(tc.want, "DIR", dir)
			lines := strings.Split(strings.TrimSpace(m.log()), "\n")
			if last := lines[len(lines)-1]; !strings.Contains(last, want) {
				t.Errorf("last log line %q, want %q", last, want)
			}
		})
	}
}

func startMasterEnv(t *testing.T, dir, cf, env string, args ...string) *fakeMaster {
	if strings.HasPrefix(env, "GENERATION=") {
		t.Setenv("TLSMGR_TEST_GENERATION", strings.TrimPrefix(env, "GENERATION="))
	}
	m := startMaster(t, dir, cf, args...)
	return m
}

// A stray argument is fatal when the first request arrives, as in Postfix.
func TestStrayArgumentAtFirstRequest(t *testing.T) {
	dir := t.TempDir()
	m := startMaster(t, dir, mainCFFor(dir), "-l", "-t", "unix", "-d", "surprise")
	c := m.dial()
	c.conn.Write([]byte("request\x00seed\x00size\x0032\x00\x00"))
	if code := m.wait(5 * time.Second); code != 1 || !strings.Contains(m.log(), "fatal: unexpected command-line argument: surprise") {
		t.Errorf("exit %d, log %q", code, m.log())
	}
}

// A missing entropy source and a removed exchange file (§10.17-18). Postfix
// exits on both; we keep serving where we can.
func TestEntropyAndExchangeFaults(t *testing.T) {
	t.Run("dev: source missing: one warning, seeds keep flowing", func(t *testing.T) {
		dir := t.TempDir()
		m := startMaster(t, dir, mainCFFor(dir)+"tls_random_source = dev:"+dir+"/nodev\ntls_random_reseed_period = 1s\n",
			"-l", "-t", "unix", "-d", "-V")
		c := m.dial()
		for range 20 { // several reseeds, each of which fails again
			if got := c.req("request", "seed", "size", "32"); !strings.HasPrefix(got, "status=0 seed=") {
				t.Fatalf("seed: %s", got)
			}
			time.Sleep(150 * time.Millisecond)
		}
		want := "warning: cannot open entropy device " + dir + "/nodev: no such file or directory; reseeding from the kernel alone until it works again"
		if n := strings.Count(m.log(), "entropy device"); n != 1 || !strings.Contains(m.log(), want) {
			t.Errorf("%d warnings about the source, want 1 (%q):\n%s", n, want, m.log())
		}
		select {
		case <-m.exited:
			t.Errorf("tlsmgr exited with %d", m.exitCode)
		default:
		}
	})
	t.Run("exchange file removed: created again", func(t *testing.T) {
		dir := t.TempDir()
		m := startMaster(t, dir, mainCFFor(dir)+"tls_random_prng_update_period = 1s\n", "-l", "-t", "unix", "-d", "-V")
		c := m.dial()
		exch := filepath.Join(dir, "data", "prng_exch")
		os.Remove(exch)
		waitFor(t, func() bool { st, err := os.Stat(exch); return err == nil && st.Size() == 1024 }, "a new %s", exch)
		if want := "warning: PRNG exchange file " + exch + " was removed; creating a new one"; !strings.Contains(m.log(), want) {
			t.Errorf("log lacks %q:\n%s", want, m.log())
		}
		if got := c.req("request", "seed", "size", "32"); !strings.HasPrefix(got, "status=0 ") {
			t.Errorf("seed: %s", got)
		}
	})
	t.Run("exchange file removed in a chroot: exit 0 to reopen, as Postfix", func(t *testing.T) {
		needRoot(t, "chroot")
		dir := t.TempDir()
		m := startMaster(t, dir, mainCFFor(dir)+"tls_random_prng_update_period = 1s\n", "-l", "-t", "unix", "-d", "-V", "-c", "-u")
		m.dial()
		os.Remove(filepath.Join(dir, "data", "prng_exch"))
		if code := m.wait(10 * time.Second); code != 0 {
			t.Errorf("exit %d, want 0", code)
		}
		if !strings.Contains(m.log(), "warning: PRNG exchange file was removed -- exiting to reopen") {
			t.Errorf("log:\n%s", m.log())
		}
	})
}

// -S serves one stream on stdin and stdout, without the announcement.
func TestStdinStream(t *testing.T) {
	dir := t.TempDir()
	makeInstanceDirs(t, dir)
	writeFile(t, dir, "main.cf", mainCFFor(dir))
	cmd := exec.Command(tlsmgrBinary(t), "-S")
	cmd.Env = []string{"MAIL_CONFIG=" + dir}
	cmd.Stdin = strings.NewReader("request\x00policy\x00cache_type\x00smtp\x00\x00")
	out, err := cmd.Output()
	if err != nil || string(out) != "status\x000\x00cachable\x001\x00timeout\x003600\x00\x00" {
		t.Errorf("-S output %q, %v", out, err)
	}
}

// The standalone mode and the query client, as the README shows them.
func TestStandaloneAndQuery(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "tlsmgr.sock")
	user := asNobody(t, dir) // as root, the daemon and -query run as nobody
	cmd := exec.Command(tlsmgrBinary(t), append(user, "-listen", sock, "-data", filepath.Join(dir, "data"))...)
	var stderr lockedBuffer
	cmd.Stderr = &syncWriter{b: &stderr}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	query := func(args ...string) string {
		for i := 0; i < 100; i++ {
			out, err := exec.Command(tlsmgrBinary(t), append(append([]string{"-query", "-socket", sock}, user...), args...)...).CombinedOutput()
			if err == nil {
				return string(out)
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("query %v never succeeded; server log:\n%s", args, stderr.String())
		return ""
	}
	if out := query("seed", "16"); !strings.HasPrefix(out, "status=0 (ok)\nseed=") || !strings.Contains(out, "(16 bytes)") {
		t.Errorf("seed: %q", out)
	}
	for _, cache := range []string{"smtpd", "smtp", "lmtp"} {
		if out := query("policy", cache); out != "status=0 (ok)\ncachable=1\ntimeout=3600\n" {
			t.Errorf("policy %s: %q", cache, out)
		}
	}
	query("update", "lmtp", "id1", "hello")
	if out := query("lookup", "lmtp", "id1"); out != "status=0 (found)\nsession=68656c6c6f (5 bytes)\n" {
		t.Errorf("lookup: %q", out)
	}
	if out := query("tktkey"); !strings.HasPrefix(out, "status=0 (ok)\nkeybuf: name=") {
		t.Errorf("tktkey: %q", out)
	}
	// A miss and a FAIL say what they mean, not only a number.
	if out := query("lookup", "lmtp", "absent"); out != "status=-1 (not found: no such entry, or it expired)\nsession= (0 bytes)\n" {
		t.Errorf("lookup miss: %q", out)
	}
	if out := query("seed", "300"); !strings.HasPrefix(out, "status=-2 (FAIL: the size must be 1-255)\n") {
		t.Errorf("seed 300: %q", out)
	}
	raw, err := exec.Command(tlsmgrBinary(t), append(append([]string{"-query", "-socket", sock}, user...), "-raw", "-repeat", "100", "seed", "255")...).Output()
	if err != nil || len(raw) != 25500 {
		t.Errorf("-raw -repeat 100 seed 255: %d bytes, %v", len(raw), err)
	}
	for _, f := range []string{"tlsmgr.sqlite", "prng_exch"} {
		if _, err := os.Stat(filepath.Join(dir, "data", f)); err != nil {
			t.Errorf("standalone data: %v", err)
		}
	}
	cmd.Process.Signal(syscall.SIGTERM)
	cmd.Wait()
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind after SIGTERM: %v", err)
	}
}

// stop is master going away (or "postfix reload"): tlsmgr must exit 0.
func (m *fakeMaster) stop() {
	m.t.Helper()
	m.status.Close()
	if code := m.wait(10 * time.Second); code != 0 {
		m.t.Errorf("exit %d after master went away; log:\n%s", code, m.log())
	}
}

// statusRecords reads the status records that arrive within d.
func (m *fakeMaster) statusRecords(d time.Duration) []uint32 {
	var avail []uint32
	deadline := time.Now().Add(d)
	var rec [12]byte
	for {
		m.status.SetReadDeadline(deadline)
		if _, err := io.ReadFull(m.status, rec[:]); err != nil {
			return avail
		}
		avail = append(avail, binary.LittleEndian.Uint32(rec[8:]))
	}
}

// expectReply is one request and the start of the reply it must get.
type expectReply struct {
	req    []string
	prefix string
}

// expectReplies sends each request and checks its reply.
func expectReplies(t *testing.T, c *client, when string, cases []expectReply) {
	t.Helper()
	for _, tc := range cases {
		if got := c.req(tc.req...); !strings.HasPrefix(got, tc.prefix) {
			t.Errorf("%s %s: %.80s, want %s", strings.Join(tc.req[1:], " "), when, got, tc.prefix)
		}
	}
}

// everyRequestWorks checks each request type once, updates first.
func everyRequestWorks(t *testing.T, c *client) {
	t.Helper()
	expectReplies(t, c, "", []expectReply{
		{[]string{"request", "seed", "size", "32"}, "status=0 seed="},
		{[]string{"request", "policy", "cache_type", "smtp"}, "status=0 cachable=1 timeout=3600"},
		{[]string{"request", "update", "cache_type", "smtp", "cache_id", "every", "session", b64("request")}, "status=0"},
		{[]string{"request", "lookup", "cache_type", "smtp", "cache_id", "every"}, "status=0 session=" + b64("request")},
		{[]string{"request", "delete", "cache_type", "smtp", "cache_id", "every"}, "status=0"},
		{[]string{"request", "lookup", "cache_type", "smtp", "cache_id", "every"}, "status=4294967295 session="},
		{[]string{"request", "tktkey", "keyname", ""}, "status=0 keybuf="},
	})
}

// A client that sends requests and never reads the replies loses its
// connection after ipc_timeout, the others are served meanwhile, and
// master sees the process available again.
func TestClientThatNeverReadsIsDropped(t *testing.T) {
	dir := t.TempDir()
	m := startMaster(t, dir, mainCFFor(dir)+"ipc_timeout = 2s\n", "-l", "-t", "unix", "-d", "-V")
	c := m.dial()
	big := b64(strings.Repeat("s", 500000))
	if got := c.req("request", "update", "cache_type", "smtp", "cache_id", "big", "session", big); got != "status=0" {
		t.Fatalf("update: %.40s", got)
	}
	slow := m.dial()
	lookup := []byte("request\x00lookup\x00cache_type\x00smtp\x00cache_id\x00big\x00\x00")
	go func() {
		for range 100 {
			slow.conn.SetWriteDeadline(time.Now().Add(20 * time.Second))
			if _, err := slow.conn.Write(lookup); err != nil {
				return
			}
		}
	}()
	time.Sleep(500 * time.Millisecond) // the server is now blocked writing to slow
	start := time.Now()
	if got := c.req("request", "policy", "cache_type", "smtpd"); got != "status=0 cachable=1 timeout=3600" {
		t.Errorf("another client while one does not read: %s", got)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("another client waited %v", d)
	}
	records := m.statusRecords(5 * time.Second) // the drop comes after 2 s
	if len(records) == 0 || records[len(records)-1] != 1 {
		t.Errorf("status records %v: master does not see the process available again", records)
	}
	// The server closed it: what it had sent, then end of file, or a reset
	// because our unread requests were still in its buffer.
	slow.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, slow.conn); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the connection that never read was not closed: %v", err)
	}
	if want := "warning: timeout on tlsmgr socket while writing a reply"; !strings.Contains(m.log(), want) {
		t.Errorf("log lacks %q:\n%s", want, m.log())
	}
}

// master counts a process as having served only when it goes from taken
// to available: one busy since it started must still say "available"
// once, or a crash costs a minute of throttling.
func TestBusySinceStartTellsMasterItServed(t *testing.T) {
	dir := t.TempDir()
	m := startMaster(t, dir, mainCFFor(dir), "-l", "-t", "unix", "-d")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := m.dial()
			for {
				select {
				case <-stop:
					return
				default:
					c.req("request", "seed", "size", "32")
				}
			}
		}()
	}
	records := m.statusRecords(2 * time.Second)
	close(stop)
	wg.Wait()
	if len(records) < 2 || records[0] != 0 || records[1] != 1 {
		t.Errorf("status records under constant load: %v; want taken, available, ...", records)
	}
	if len(records) > 10 {
		t.Errorf("%d status records in 2 s of load: master is woken too often", len(records))
	}
}

// Links planted in data_directory, to a root-owned file and dangling,
// change nothing outside it; tlsmgr replaces them with its own files.
func TestPlantedLinksUnderMaster(t *testing.T) {
	needRoot(t, "planting links for a daemon that drops privileges")
	dir := t.TempDir()
	makeInstanceDirs(t, dir)
	outside := filepath.Join(dir, "outside") // root's, 0755: mail_owner may not create here
	os.Mkdir(outside, 0755)
	data := filepath.Join(dir, "data")
	targets := map[string]string{}
	for _, name := range []string{"prng_exch", "tlsmgr.sqlite-wal", "tlsmgr.sqlite-shm", "tlsmgr.sqlite.lock"} {
		target := filepath.Join(outside, name)
		os.WriteFile(target, []byte("root's file "+name), 0644)
		targets[name] = target
	}
	targets["tlsmgr.sqlite"] = filepath.Join(outside, "created-by-tlsmgr") // dangling
	before := map[string]fileState{}
	for name, target := range targets {
		if err := os.Symlink(target, filepath.Join(data, name)); err != nil {
			t.Fatal(err)
		}
		before[name] = stateOf(t, target)
	}
	m := startMaster(t, dir, mainCFFor(dir), "-l", "-t", "unix", "-d", "-V", "-u")
	everyRequestWorks(t, m.dial())
	m.stop()
	for name, target := range targets {
		if after := stateOf(t, target); after != before[name] {
			t.Errorf("%s -> %s changed: %+v, was %+v", name, target, after, before[name])
		}
	}
	uid, _ := nobody(t)
	for _, name := range []string{"prng_exch", "tlsmgr.sqlite", "tlsmgr.sqlite.lock"} {
		fi, err := os.Lstat(filepath.Join(data, name))
		if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0600 || fi.Sys().(*syscall.Stat_t).Uid != uint32(uid) {
			t.Errorf("%s: %v, %v; want a regular 0600 file of mail_owner", name, fi.Mode(), err)
		}
	}
	for _, want := range []string{"warning: refusing PRNG exchange file " + data + "/prng_exch: it is a symbolic link; replacing it",
		"warning: refusing lock file " + data + "/tlsmgr.sqlite.lock: it is a symbolic link; replacing it"} {
		if !strings.Contains(m.log(), want) {
			t.Errorf("log lacks %q:\n%s", want, m.log())
		}
	}
}

// A database damaged while tlsmgr was down never stops the next start.
func TestDamagedDatabaseRestart(t *testing.T) {
	for _, tc := range damageKinds {
		if tc.name == "a directory" {
			continue // cannot be removed: TestDamagedDatabaseAtStart covers it
		}
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			m := startMaster(t, dir, mainCFFor(dir), "-l", "-t", "unix", "-d", "-V")
			everyRequestWorks(t, m.dial())
			m.stop()
			tc.damage(t, filepath.Join(dir, "data", "tlsmgr.sqlite"))
			m = startMaster(t, dir, mainCFFor(dir), "-l", "-t", "unix", "-d", "-V")
			everyRequestWorks(t, m.dial())
			if strings.Contains(m.log(), "warning") {
				t.Errorf("warnings after a restart on a damaged database:\n%s", m.log())
			}
		})
	}
}

// A second tlsmgr on the same database refuses it and touches nothing:
// standalone it exits non-zero with one line; under master it runs
// without caching, because seeds and ticket keys must keep flowing.
func TestSecondDaemonOnOneDatabase(t *testing.T) {
	dir := t.TempDir()
	first := startMaster(t, dir, mainCFFor(dir), "-l", "-t", "unix", "-d", "-V")
	c := first.dial()
	if got := c.req("request", "update", "cache_type", "smtp", "cache_id", "kept", "session", b64("by the first")); got != "status=0" {
		t.Fatalf("update: %s", got)
	}
	db := filepath.Join(dir, "data", "tlsmgr.sqlite")
	before := identityOf(t, db) // its content changes: the first daemon checkpoints and writes counters

	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second) // one that starts would serve forever
	defer cancel()
	cmd := exec.CommandContext(ctx, tlsmgrBinary(t), "-listen", filepath.Join(dir, "second.sock"), "-mailconfig", dir, "-data", filepath.Join(dir, "data"))
	out, err := cmd.CombinedOutput()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	want := "fatal: session cache database " + db + " is in use by another tlsmgr (pid " + strconv.Itoa(first.cmd.Process.Pid) + "); not starting"
	if err == nil || cmd.ProcessState.ExitCode() != 1 || len(lines) != 1 || !strings.HasSuffix(lines[0], want) {
		t.Errorf("standalone second daemon: %v\n%s\nwant one line ending %q", err, out, want)
	}

	dir2 := t.TempDir()
	cf2 := strings.Replace(mainCFFor(dir2), "data_directory = "+dir2+"/data", "data_directory = "+dir+"/data", 1)
	second := startMaster(t, dir2, cf2, "-l", "-t", "unix", "-d", "-V")
	c2 := second.dial() // after its wait for the lock
	if got := c2.req("request", "policy", "cache_type", "smtp"); got != "status=0 cachable=0 timeout=3600" {
		t.Errorf("policy of the second daemon under master: %s", got)
	}
	if got := c2.req("request", "seed", "size", "32"); !strings.HasPrefix(got, "status=0 seed=") {
		t.Errorf("seed from the second daemon: %s", got)
	}
	if !strings.Contains(second.log(), "is in use by another tlsmgr (pid "+strconv.Itoa(first.cmd.Process.Pid)+"); session caching is off in this process") {
		t.Errorf("second daemon's log:\n%s", second.log())
	}
	if after := identityOf(t, db); after != before {
		t.Errorf("a second daemon replaced the first one's database: %+v, was %+v", after, before)
	}
	if got := c.req("request", "lookup", "cache_type", "smtp", "cache_id", "kept"); got != "status=0 session="+b64("by the first") {
		t.Errorf("the first daemon lost its entry: %s", got)
	}
}

// On a full file system seeds, ticket keys and lookups keep working, the
// log gets a bounded number of lines, and a restart on it succeeds.
func TestFullDiskUnderMaster(t *testing.T) {
	dir := t.TempDir()
	makeInstanceDirs(t, dir)
	data := mountTmpfs(t, "4m")
	uid, gid := nobody(t)
	os.Chown(data, uid, gid)
	cf := strings.Replace(mainCFFor(dir), "data_directory = "+dir+"/data", "data_directory = "+data, 1) +
		"tls_random_prng_update_period = 1s\n"
	m := startMaster(t, dir, cf, "-l", "-t", "unix", "-d", "-V", "-u")
	c := m.dial()
	if got := c.req("request", "update", "cache_type", "smtp", "cache_id", "before", "session", b64("stored")); got != "status=0" {
		t.Fatalf("update before the disk filled: %s", got)
	}
	fillDisk(t, filepath.Join(data, "filler"))
	session := b64(strings.Repeat("x", 2000))
	for i := range 2000 {
		c.req("request", "update", "cache_type", "smtp", "cache_id", fmt.Sprintf("id%d", i), "session", session)
	}
	for range 3 { // seconds: exchange file updates on the full disk too
		everyRequestKeepsWorkingOnAFullDisk(t, c)
		time.Sleep(time.Second)
	}
	if n := strings.Count(m.log(), "\n"); n > 3 {
		t.Errorf("%d log lines on a full disk:\n%s", n, m.log())
	}
	m.stop()

	m = startMaster(t, dir, cf, "-l", "-t", "unix", "-d", "-V", "-u") // still full
	c = m.dial()
	for _, req := range [][]string{{"request", "seed", "size", "32"}, {"request", "tktkey", "keyname", ""}} {
		if got := c.req(req...); !strings.HasPrefix(got, "status=0 ") {
			t.Errorf("%s after a restart on a full disk: %s", req[1], got)
		}
	}
	if st, err := os.Stat(filepath.Join(data, "prng_exch")); err != nil || st.Size() != 1024 {
		t.Errorf("exchange file after a restart on a full disk: %v", err)
	}
}

func everyRequestKeepsWorkingOnAFullDisk(t *testing.T, c *client) {
	t.Helper()
	expectReplies(t, c, "on a full disk", []expectReply{
		{[]string{"request", "seed", "size", "32"}, "status=0 seed="},
		{[]string{"request", "tktkey", "keyname", ""}, "status=0 keybuf="},
		{[]string{"request", "lookup", "cache_type", "smtp", "cache_id", "before"}, "status=0 session=" + b64("stored")},
		{[]string{"request", "update", "cache_type", "smtp", "cache_id", "full", "session", b64("x")}, "status=4294967295"},
	})
}

// Logging comes first: with maillog_file set, even a fatal error in
// tlsmgr.toml or an option reaches postlogd, with the postfix/tlsmgr[PID]
// tag and the short host name.
func TestFatalsReachMailLog(t *testing.T) {
	for _, tc := range []struct{ name, toml, option, want string }{
		{"toml value", "tlsmgr_max_connections = \"many\"\n", "", "fatal: bad numerical configuration: tlsmgr_max_connections = many"},
		{"toml syntax", "this is not TOML\n", "", "fatal: TOML file " + "DIR/tlsmgr.toml, line 1: "},
		{"unknown option", "", "-q", "fatal: invalid option: q"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			makeInstanceDirs(t, dir)
			os.MkdirAll(filepath.Join(dir, "queue", "public"), 0755)
			postlog, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(dir, "queue", "public", "postlog"), Net: "unixgram"})
			if err != nil {
				t.Fatal(err)
			}
			defer postlog.Close()
			if tc.toml != "" {
				writeFile(t, dir, "tlsmgr.toml", tc.toml)
			}
			cf := mainCFFor(dir) + "maillog_file = " + dir + "/maillog\nmaillog_file_prefixes = " + dir + "\nmyhostname = mx1.example.org\n"
			args := []string{"-l", "-t", "unix", "-d"}
			if tc.option != "" {
				args = append(args, tc.option)
			}
			m := startMaster(t, dir, cf, args...)
			if code := m.wait(10 * time.Second); code != 1 {
				t.Errorf("exit %d, want 1", code)
			}
			postlog.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 4096)
			n, err := postlog.Read(buf)
			want := strings.ReplaceAll(tc.want, "DIR", dir)
			re := regexp.MustCompile(`^[A-Z][a-z]{2} [0-9]{2} [0-9:]{8} mx1 postfix/tlsmgr\[` + strconv.Itoa(m.cmd.Process.Pid) + `\]: ` + regexp.QuoteMeta(want))
			if err != nil || !re.Match(buf[:n]) {
				t.Errorf("postlog record %q (%v), want %s", buf[:n], err, re)
			}
		})
	}
}
