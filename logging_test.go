package main

import (
	"net"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// §10.20: the postlog datagram is "Mon DD HH:MM:SS host tag[pid]: text".
func TestPostlogRecord(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "postlog")
	pc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	l := &logger{out: &lockedBuffer{}}
	if err := l.setup(logSetup{tag: "postfix/tlsmgr", maillogFile: "/var/log/postfix.log", prefixes: "/var, /dev/stdout",
		postlogPath: sock, host: "mail"}); err != nil {
		t.Fatal(err)
	}
	l.warn("bogus seed length \"%d\" in \"seed\" request", 0)
	l.info("client sent %s", "a\x01b\nc") // control bytes become '?'
	want := []*regexp.Regexp{
		regexp.MustCompile(`^[A-Z][a-z]{2} [0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} mail postfix/tlsmgr\[[0-9]+\]: warning: bogus seed length "0" in "seed" request$`),
		regexp.MustCompile(`^[A-Z][a-z]{2} [0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} mail postfix/tlsmgr\[[0-9]+\]: client sent a\?b\?c$`),
	}
	buf := make([]byte, 4096)
	for _, re := range want {
		pc.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := pc.Read(buf)
		if err != nil || !re.Match(buf[:n]) {
			t.Errorf("datagram %q (%v), want %s", buf[:n], err, re)
		}
	}
	bad := &logger{out: &lockedBuffer{}}
	err = bad.setup(logSetup{tag: "postfix/tlsmgr", maillogFile: "/tmp/x.log", prefixes: "/var, /dev/stdout", postlogPath: sock})
	if err == nil || !strings.Contains(err.Error(), `parameter maillog_file: value "/tmp/x.log" does not match any prefix`) {
		t.Errorf("maillog_file outside the prefixes: %v", err)
	}
}

// The stderr form is "tag[pid]: severity: text"; like Postfix, the text is
// cut at 2000 bytes before the severity is put in front.
func TestStderrLineFormat(t *testing.T) {
	out := &lockedBuffer{}
	l := &logger{tag: "postfix/tlsmgr", stderr: true, out: out}
	l.warn("%s", strings.Repeat("x", 3000))
	line := strings.TrimSuffix(out.String(), "\n")
	if !regexp.MustCompile(`^postfix/tlsmgr\[[0-9]+\]: warning: x+$`).MatchString(line) || strings.Count(line[strings.Index(line, "warning: "):], "x") != 2000 {
		t.Errorf("line of %d bytes: %.60q", len(line), line)
	}
}

// With the cache log bit, each cache operation logs Postfix's lines.
func TestCacheLogLines(t *testing.T) {
	caches := allCaches(3600)
	caches[0].loglevel = "2"
	logged := captureLog(t)
	s := startServer(t, caches)
	c := dial(t, s.sock)
	stop, sweepers := make(chan struct{}), &sync.WaitGroup{}
	sweepers.Add(1)
	go s.srv.store.runSweeper(s.srv.store.caches["smtpd"], stop, sweepers)
	defer func() { close(stop); sweepers.Wait() }()
	c.req("request", "update", "cache_type", "smtpd", "cache_id", "id1", "session", b64("hello"))
	c.req("request", "lookup", "cache_type", "smtpd", "cache_id", "id1")
	c.req("request", "delete", "cache_type", "smtpd", "cache_id", "id1")
	c.req("request", "lookup", "cache_type", "smtp", "cache_id", "quiet") // loglevel 0: nothing
	for _, re := range []string{
		`open smtpd TLS cache btree:/x/smtpd_scache`,
		`put smtpd session id=id1 \[data 5 bytes\]`,
		`write smtpd TLS cache entry id1: time=[0-9]+ \[data 5 bytes\]`,
		`lookup smtpd session id=id1`,
		`read smtpd TLS cache entry id1: time=[0-9]+ \[data 5 bytes\]`,
		`delete smtpd session id=id1`,
		`tlsmgr_cache_run_event: start TLS smtpd session cache cleanup`,
	} {
		if !regexp.MustCompile(re).MatchString(logged()) {
			// the sweeper runs in its own goroutine at start: give it a moment
			waitFor(t, func() bool { return regexp.MustCompile(re).MatchString(logged()) }, "%s in %s", re, logged)
		}
	}
	if strings.Contains(logged(), "quiet") {
		t.Errorf("a cache at loglevel 0 logged: %q", logged())
	}
	for level, want := range map[string]bool{"0": false, "1": false, "routine": false, "2": true, "debug": true,
		"summary, cache": true, "4": true, "ssl-expert": true} {
		mask, err := tlsLogMask(level)
		if err != nil || (mask&logMaskCache != 0) != want {
			t.Errorf("tlsLogMask(%q) = %d, %v; cache bit want %v", level, mask, err, want)
		}
	}
	if _, err := tlsLogMask("loud"); err == nil {
		t.Error("unknown keyword accepted")
	}
}

// The postlog record carries the short host name, as Postfix's does, also
// when master(8) passes the full one in $POSTLOG_HOSTNAME; MAIL_LOGTAG
// replaces syslog_name in the tag.
func TestLogSetupFromConfig(t *testing.T) {
	cfg := newConfig()
	cfg.mainCF["myhostname"] = "mx1.example.org"
	cfg.mainCF["syslog_name"] = "postfix-out"
	if got := logSetupFor(cfg, "tlsmgr", false, false); got.host != "mx1" || got.tag != "postfix-out/tlsmgr" {
		t.Errorf("from main.cf: host %q, tag %q", got.host, got.tag)
	}
	t.Setenv("POSTLOG_HOSTNAME", "interop.localdomain")
	t.Setenv("MAIL_LOGTAG", "postfix-interop")
	if got := logSetupFor(cfg, "tlsmgr", false, false); got.host != "interop" || got.tag != "postfix-interop/tlsmgr" {
		t.Errorf("from master's environment: host %q, tag %q", got.host, got.tag)
	}
}
