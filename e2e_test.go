package main

// The end-to-end test: a throwaway Postfix 3.7 instance (Debian's package)
// whose master.cf carries Debian's stock tlsmgr line with only the command
// changed to this binary, driven by openssl s_client and real deliveries.
// It needs root (master starts as root) and Postfix; outside CI it skips
// when either is missing, and in CI (CI=true) it fails instead.

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/smtp"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

type postfixInstance struct {
	t                            *testing.T
	dir, etc, spool, data, log   string
	bin                          string // the tlsmgr under test
	testPort, sinkPort, notkPort int
	addr                         string // the loopback address it listens on
	// rpkPort: a sink smtpd that sends its raw public key to a client that
	// asks (smtpd_tls_enable_rpk), reached through relay-rpk, which asks
	// (smtp_tls_enable_rpk); 0 on a Postfix before 3.10, which has neither.
	rpkPort int
}

// postfixHasRPK says whether the installed Postfix knows raw public keys
// (RFC 7250, Postfix 3.10 with OpenSSL 3.2 or later).
func postfixHasRPK(t *testing.T) bool {
	out, err := run(t, time.Minute, "postconf", "-dh", "smtp_tls_enable_rpk", "smtpd_tls_enable_rpk")
	return err == nil && !strings.Contains(out, "unknown parameter")
}

func requirePostfix(t *testing.T) {
	t.Helper()
	why := ""
	switch {
	case os.Geteuid() != 0:
		why = "needs root: master(8) starts as root and the daemons drop privileges"
	case !fileExists("/usr/sbin/postfix") || !fileExists("/usr/lib/postfix/sbin/master"):
		why = "needs Debian's postfix package (.ci/run installs it)"
	default:
		if _, err := exec.LookPath("openssl"); err != nil {
			why = "needs the openssl command"
		}
	}
	if why == "" {
		return
	}
	skipOutsideCI(t, "end-to-end test against Postfix: %s", why)
}

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func run(t *testing.T, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// newPostfix lays out an instance under a world-searchable temp dir.
func newPostfix(t *testing.T) *postfixInstance { return newPostfixOn(t, "127.0.0.1", 0) }

// newPostfixOn is newPostfix listening on addr only (inet_interfaces). With
// a port, the test smtpd's master.cf service is that port alone, so that
// instances on different addresses have one service name, as real hosts
// behind one name do: Postfix puts it into the smtpd cache ID.
func newPostfixOn(t *testing.T, addr string, port int) *postfixInstance {
	dir, err := os.MkdirTemp("", "tlsmgr-e2e.")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0755) // mail_owner must reach data_directory and the sockets
	p := &postfixInstance{t: t, addr: addr, dir: dir, etc: dir + "/etc", spool: dir + "/spool", data: dir + "/data",
		log: dir + "/log/maillog", bin: tlsmgrBinary(t)}
	t.Cleanup(func() {
		if !t.Failed() || os.Getenv("TLSMGR_E2E_KEEP") == "" {
			p.stop()
			os.RemoveAll(dir)
		} else {
			t.Logf("instance kept in %s", dir)
		}
	})
	for _, d := range []string{p.etc, p.spool, p.data, dir + "/log", dir + "/libexec"} {
		os.MkdirAll(d, 0755)
	}
	if out, err := run(t, time.Minute, "chown", "postfix:postfix", p.data); err != nil {
		t.Fatalf("chown: %v %s", err, out)
	}
	os.Chmod(p.data, 0700)
	// master.cf's command is always daemon_directory/command: a private
	// daemon_directory of links to the stock daemons, tlsmgr to ours.
	stock, _ := filepath.Glob("/usr/lib/postfix/sbin/*")
	for _, f := range stock {
		os.Symlink(f, filepath.Join(dir, "libexec", filepath.Base(f)))
	}
	os.Remove(dir + "/libexec/tlsmgr")
	binDir := dir + "/bin" // a copy the postfix user could also read
	os.MkdirAll(binDir, 0755)
	data, err := os.ReadFile(p.bin)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(binDir+"/tlsmgr", data, 0755)
	p.bin = binDir + "/tlsmgr"
	os.Symlink(p.bin, dir+"/libexec/tlsmgr")
	if out, err := run(t, time.Minute, "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
		"-subj", "/CN=e2e.localdomain", "-keyout", p.etc+"/key.pem", "-out", p.etc+"/cert.pem"); err != nil {
		t.Fatalf("openssl req: %v %s", err, out)
	}
	p.testPort, p.sinkPort, p.notkPort = freePort(t), freePort(t), freePort(t)
	testService, interfaces := fmt.Sprintf("%s:%d", addr, p.testPort), "loopback-only"
	if port != 0 {
		p.testPort, testService, interfaces = port, fmt.Sprint(port), addr
	}
	rpkTransport, rpkServices := "", ""
	if postfixHasRPK(t) {
		p.rpkPort = freePort(t)
		rpkTransport = fmt.Sprintf(", rpk.test=relay-rpk:[%s]:%d", addr, p.rpkPort)
		rpkServices = fmt.Sprintf(`%[1]s:%[2]d inet n - n - - smtpd
  -o syslog_name=e2e/rpksink -o content_filter=discard:sink -o smtpd_tls_loglevel=2 -o max_use=1 -o smtpd_tls_enable_rpk=yes
relay-rpk unix -       -       n       -       -       smtp
  -o syslog_name=e2e/relay-rpk -o smtp_tls_loglevel=2 -o max_use=1 -o smtp_tls_enable_rpk=yes
`, addr, p.rpkPort)
	}
	dbType := "btree"
	if out, _ := run(t, time.Minute, "postconf", "-m"); !strings.Contains(out, "btree") {
		dbType = "lmdb"
	}
	writeFile(t, p.etc, "main.cf", fmt.Sprintf(`compatibility_level = 3.6
queue_directory = %[1]s/spool
data_directory = %[1]s/data
daemon_directory = %[1]s/libexec
command_directory = /usr/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = e2e.localdomain
mydestination = $myhostname, localhost
inet_interfaces = %[5]s
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = e2e.test, rpk.test
transport_maps = inline:{ e2e.test=relay-test:[%[4]s]:%[2]d%[6]s }
default_transport = error:5.7.1 no outbound mail
relay_transport = error:5.7.1 no outbound mail
local_transport = discard:local
alias_maps =
alias_database =
biff = no
smtputf8_enable = no
smtp_connection_cache_on_demand = no
syslog_name = e2e
maillog_file = %[1]s/log/maillog
maillog_file_prefixes = %[1]s
smtpd_tls_security_level = may
smtpd_tls_cert_file = %[1]s/etc/cert.pem
smtpd_tls_key_file = %[1]s/etc/key.pem
smtpd_tls_session_cache_database = %[3]s:${data_directory}/smtpd_scache
smtp_tls_security_level = may
smtp_tls_session_cache_database = %[3]s:${data_directory}/smtp_scache
`, dir, p.sinkPort, dbType, addr, interfaces, rpkTransport))
	// Every smtpd and smtp process serves one connection (max_use=1), so a
	// resumed session can only have come back through tlsmgr.
	writeFile(t, p.etc, "master.cf", fmt.Sprintf(`%[5]s inet n - n - - smtpd
  -o syslog_name=e2e/test -o smtpd_tls_loglevel=2 -o max_use=1
%[6]s:%[3]d inet n - n - - smtpd
  -o syslog_name=e2e/notkt -o smtpd_tls_loglevel=2 -o max_use=1 -o tls_ssl_options=NO_TICKET
%[6]s:%[2]d inet n - n - - smtpd
  -o syslog_name=e2e/sink -o content_filter=discard:sink -o smtpd_tls_loglevel=2 -o max_use=1
  -o tls_server_sni_maps=hash:%[4]s/sni
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
# Debian's stock line, unchanged:
tlsmgr    unix  -       -       y       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
relay-test unix -       -       n       -       -       smtp
  -o syslog_name=e2e/relay-test -o smtp_tls_loglevel=2 -o max_use=1 -o smtp_tls_servername=e2e-sink.test
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
%[7]s`, p.testPort, p.sinkPort, p.notkPort, p.etc, testService, addr, rpkServices))
	// The sink acknowledges SNI e2e-sink.test (tls_server_sni_maps), so
	// that the smtp client's session records the name.
	key, _ := os.ReadFile(p.etc + "/key.pem")
	cert, _ := os.ReadFile(p.etc + "/cert.pem")
	writeFile(t, p.etc, "sni.pem", string(key)+string(cert))
	writeFile(t, p.etc, "sni", "e2e-sink.test "+p.etc+"/sni.pem\n")
	if out, err := run(t, time.Minute, "postmap", "-c", p.etc, "-F", "hash:"+p.etc+"/sni"); err != nil {
		t.Fatalf("postmap -F: %v %s", err, out)
	}
	return p
}

func (p *postfixInstance) postfix(args ...string) {
	p.t.Helper()
	if out, err := run(p.t, time.Minute, "postfix", append([]string{"-c", p.etc}, args...)...); err != nil {
		p.t.Fatalf("postfix %v: %v\n%s\n%s", args, err, out, p.logText())
	}
}

func (p *postfixInstance) stop() {
	if fileExists(p.spool + "/pid/master.pid") {
		run(p.t, time.Minute, "postfix", "-c", p.etc, "stop")
	}
}

func (p *postfixInstance) logText() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

func (p *postfixInstance) logSize() int { return len(p.logText()) }

// waitLog waits for a log line after offset that matches re.
func (p *postfixInstance) waitLog(offset int, re string, timeout time.Duration) string {
	p.t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.Now().Add(timeout)
	for {
		text := p.logText()
		if offset <= len(text) {
			if m := rx.FindString(text[offset:]); m != "" {
				return m
			}
		}
		if time.Now().After(deadline) {
			return ""
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// tlsmgrPIDs lists the live processes running our binary.
func (p *postfixInstance) tlsmgrPIDs() []string {
	var pids []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		exe, err := os.Readlink("/proc/" + e.Name() + "/exe")
		if err != nil || exe != p.bin {
			continue
		}
		if stat, err := os.ReadFile("/proc/" + e.Name() + "/stat"); err == nil && !bytes.Contains(stat, []byte(") Z ")) {
			pids = append(pids, e.Name())
		}
	}
	return pids
}

// resume runs two s_client sessions, the second offering the first's
// session, and returns what the client and smtpd said about the second.
func (p *postfixInstance) resume(port int, args ...string) (client, server string) {
	p.t.Helper()
	sess := filepath.Join(p.dir, fmt.Sprintf("sess-%d", time.Now().UnixNano()))
	session := func(extra ...string) string { return p.handshake(port, slices.Concat(args, extra)...) }
	off := p.logSize()
	if first := session("-sess_out", sess); !strings.HasPrefix(first, "New, ") {
		p.t.Fatalf("first handshake: %q\n%s", first, p.logText()[off:])
	}
	p.waitLog(off, `disconnect from`, 5*time.Second)
	off = p.logSize()
	client = session("-sess_in", sess)
	server = p.waitLog(off, `smtpd\[\d+\]: .*Reusing old session.*`, 5*time.Second)
	return client, server
}

// handshake runs one openssl s_client STARTTLS session and returns its
// "New, TLSv1.3, Cipher is ..." or "Reused, ..." line.
func (p *postfixInstance) handshake(port int, args ...string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "openssl", append([]string{"s_client", "-connect", fmt.Sprintf("%s:%d", p.addr, port),
		"-starttls", "smtp", "-name", "e2e-client.localdomain", "-ign_eof"}, args...)...)
	cmd.Stdin = strings.NewReader("EHLO e2e-client.localdomain\r\nQUIT\r\n")
	out, _ := cmd.CombinedOutput()
	return regexp.MustCompile(`(?m)^(New|Reused), TLSv1\.[23].*$`).FindString(string(out))
}

func TestEndToEndWithPostfix(t *testing.T) {
	requirePostfix(t)
	p := newPostfix(t)
	planted := p.plantLinks() // whoever controls the postfix account did this
	p.postfix("start")
	if p.waitLog(0, `daemon started`, 10*time.Second) == "" {
		t.Fatalf("postfix did not start:\n%s", p.logText())
	}

	t.Run("smtpd offers STARTTLS: its seed request succeeded", func(t *testing.T) {
		c, err := smtpDial(fmt.Sprintf("127.0.0.1:%d", p.testPort))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Hello("e2e-client.localdomain")
		if ok, _ := c.Extension("STARTTLS"); !ok {
			t.Errorf("no STARTTLS; log:\n%s", p.logText())
		}
		c.Quit()
	})
	pids := p.tlsmgrPIDs()
	if len(pids) != 1 {
		t.Fatalf("tlsmgr processes: %v", pids)
	}
	firstPID := pids[0]
	t.Run("tlsmgr is chrooted and runs as postfix, with postfix's groups only", func(t *testing.T) {
		root, _ := os.Readlink("/proc/" + firstPID + "/root")
		status, _ := os.ReadFile("/proc/" + firstPID + "/status")
		field := func(name string) string {
			m := regexp.MustCompile(`(?m)^` + name + `:\s*(.*)$`).FindStringSubmatch(string(status))
			if m == nil {
				return ""
			}
			return strings.Join(strings.Fields(m[1]), " ")
		}
		id := func(flag string) string {
			out, _ := run(t, time.Minute, "id", flag, "postfix")
			return strings.TrimSpace(out)
		}
		uid, gid := id("-u"), id("-g")
		if root != p.spool {
			t.Errorf("root %s, want %s", root, p.spool)
		}
		if got, want := field("Uid"), strings.Repeat(uid+" ", 4); got != strings.TrimSpace(want) {
			t.Errorf("Uid: %s, want real, effective, saved and fs uid %s", got, uid)
		}
		if got, want := field("Gid"), strings.Repeat(gid+" ", 4); got != strings.TrimSpace(want) {
			t.Errorf("Gid: %s, want real, effective, saved and fs gid %s", got, gid)
		}
		// initgroups(mail_owner): exactly postfix's groups, none of root's.
		groups := strings.Fields(field("Groups"))
		wantGroups := strings.Fields(id("-G"))
		slices.Sort(groups)
		slices.Sort(wantGroups)
		if !slices.Equal(groups, wantGroups) {
			t.Errorf("supplementary groups %v, want postfix's %v", groups, wantGroups)
		}
	})
	t.Run("links planted in data_directory changed nothing outside it", func(t *testing.T) {
		planted.check(t, p)
	})

	resumption := []struct {
		name, proto string
		port        func() int
		args        []string
		ticket      bool
	}{
		{"TLS 1.2 by session ID through the smtpd cache", "TLSv1.2", func() int { return p.testPort }, []string{"-tls1_2", "-no_ticket"}, false},
		{"TLS 1.2 by ticket", "TLSv1.2", func() int { return p.testPort }, []string{"-tls1_2"}, true},
		{"TLS 1.3 by ticket", "TLSv1.3", func() int { return p.testPort }, []string{"-tls1_3"}, true},
		{"TLS 1.3 by session ID through the smtpd cache", "TLSv1.3", func() int { return p.notkPort }, []string{"-tls1_3"}, false},
	}
	var byID []string // what openssl s_client reported for sessions that smtpd cached
	checkResumption := func(t *testing.T, proto string, port int, args []string, ticket bool) {
		client, server := p.resume(port, args...)
		if !ticket {
			byID = append(byID, client)
		}
		if !strings.HasPrefix(client, "Reused, "+proto) {
			t.Errorf("client: %q, want Reused, %s", client, proto)
		}
		if server == "" || strings.Contains(server, "RFC 5077 session ticket") != ticket {
			t.Errorf("smtpd: %q (ticket expected: %v)", server, ticket)
		}
	}
	for _, r := range resumption {
		t.Run(r.name, func(t *testing.T) { checkResumption(t, r.proto, r.port(), r.args, r.ticket) })
	}

	t.Run("smtp client reuses its cached session on a second delivery", func(t *testing.T) {
		var smtpPIDs []string
		var offs []int
		for i := 1; i <= 2; i++ {
			off := p.logSize()
			offs = append(offs, off)
			rcpt := fmt.Sprintf("sink%d@e2e.test", i)
			if err := submit(fmt.Sprintf("127.0.0.1:%d", p.testPort), rcpt); err != nil {
				t.Fatalf("submit %d: %v", i, err)
			}
			line := p.waitLog(off, `e2e/relay-test/smtp\[\d+\]: \w+: to=<`+rcpt+`>.*status=sent.*`, 20*time.Second)
			if line == "" {
				t.Fatalf("message %d not delivered:\n%s", i, p.logText()[off:])
			}
			smtpPIDs = append(smtpPIDs, regexp.MustCompile(`smtp\[(\d+)\]`).FindStringSubmatch(line)[1])
		}
		if smtpPIDs[0] == smtpPIDs[1] {
			t.Fatalf("both deliveries by smtp pid %s", smtpPIDs[0])
		}
		second := p.logText()[offs[1]:]
		pid := regexp.QuoteMeta(smtpPIDs[1])
		if !regexp.MustCompile(`smtp\[`+pid+`\]: .*reloaded session .* from smtp cache`).MatchString(second) ||
			!regexp.MustCompile(`smtp\[`+pid+`\]: .*Reusing old session`).MatchString(second) {
			t.Errorf("second delivery (smtp pid %s) did not reuse the cached session:\n%s", smtpPIDs[1], second)
		}
	})

	t.Run("SQL shows the sessions and counters of what Postfix did", func(t *testing.T) {
		p.checkReadableCaches(t, byID)
	})

	t.Run("a raw public key (Postfix 3.10's smtp_tls_enable_rpk) shows as the key's fingerprint", func(t *testing.T) {
		p.checkRawPublicKey(t)
	})

	t.Run("postfix reload: a new tlsmgr serves and resumption works", func(t *testing.T) {
		p.postfix("reload")
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) && contains(p.tlsmgrPIDs(), firstPID) {
			time.Sleep(100 * time.Millisecond)
		}
		if contains(p.tlsmgrPIDs(), firstPID) {
			t.Fatalf("old tlsmgr %s still runs after reload", firstPID)
		}
		for _, r := range resumption[:3] {
			checkResumption(t, r.proto, r.port(), r.args, r.ticket)
		}
		if now := p.tlsmgrPIDs(); len(now) != 1 || now[0] == firstPID {
			t.Errorf("tlsmgr processes after reload: %v (before: %s)", now, firstPID)
		}
	})

	t.Run("postfix reload forgets ticket keys by default, as Postfix does", func(t *testing.T) {
		if p.ticketAcrossReload(t, false) {
			t.Error("a TLS 1.3 ticket from before the reload resumed with tlsmgr_keep_ticket_keys = no")
		}
	})
	t.Run("with tlsmgr_keep_ticket_keys a TLS 1.3 ticket resumes after postfix reload", func(t *testing.T) {
		if !p.ticketAcrossReload(t, true) {
			t.Error("a TLS 1.3 ticket from before the reload did not resume with tlsmgr_keep_ticket_keys = yes")
		}
	})

	t.Run("a second tlsmgr on the same database refuses and touches nothing", func(t *testing.T) {
		p.secondDaemonRefuses(t)
	})

	t.Run("no fatal errors and no abnormal exits", func(t *testing.T) {
		text := p.logText()
		if m := regexp.MustCompile(`(?m)^.*tlsmgr\[\d+\]: (fatal|panic): .*$`).FindString(text); m != "" {
			t.Errorf("tlsmgr: %s", m)
		}
		if m := regexp.MustCompile(`(?m)^.*master\[\d+\]: warning: .*tlsmgr.*(exit status|killed by signal|throttl|trigger).*$`).FindString(text); m != "" {
			t.Errorf("master: %s", m)
		}
	})

	t.Run("kill -9 of a tlsmgr busy since it started: restarted at once, not throttled", func(t *testing.T) {
		p.killBusySinceStart(t)
	})
	t.Run("20 x kill -9 under update-heavy load: service returns, database and exchange file intact", func(t *testing.T) {
		p.killLoop(t, 20)
	})
	t.Run("postfix stop: no tlsmgr process is left", func(t *testing.T) {
		before := p.tlsmgrPIDs()
		p.postfix("stop")
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) && len(p.tlsmgrPIDs()) > 0 {
			time.Sleep(100 * time.Millisecond)
		}
		if left := p.tlsmgrPIDs(); len(left) > 0 {
			t.Errorf("tlsmgr still running after postfix stop: %v (before: %v)", left, before)
		}
		// Checkpointed and truncated at exit: in the chroot SQLite cannot
		// remove the -wal by name, but nothing is left in it.
		if n := fileSize(p.data + "/tlsmgr.sqlite-wal"); n != 0 {
			t.Errorf("tlsmgr.sqlite-wal is %d bytes after postfix stop", n)
		}
	})

	t.Run("a bad tlsmgr.toml is a fatal line in the maillog_file log", func(t *testing.T) {
		p.badTOMLIsLogged(t)
	})
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// smtpDial is smtp.Dial with a deadline on the whole conversation: a
// tlsmgr that never answers holds smtpd (which waits for its seed) and
// must fail the test, not hang it.
func smtpDial(addr string) (*smtp.Client, error) {
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	host, _, _ := net.SplitHostPort(addr)
	c, err := smtp.NewClient(conn, host)
	if err != nil {
		conn.Close()
	}
	return c, err
}

// submit hands smtpd one message in plain text (smtp.SendMail would insist
// on STARTTLS and a certificate it can verify).
func submit(addr, rcpt string) error {
	c, err := smtpDial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Hello("e2e-client.localdomain"); err != nil {
		return err
	}
	if err := c.Mail("e2e@e2e.localdomain"); err != nil {
		return err
	}
	if err := c.Rcpt(rcpt); err != nil {
		return err
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "Subject: e2e\r\n\r\nhello\r\n")
	if err := w.Close(); err != nil {
		return err
	}
	return c.Quit()
}
