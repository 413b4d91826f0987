package main

// The shared store end to end: a private PostgreSQL and Postfix instances
// on 127.0.0.2, .3, ... (added to lo for the test, as Postfix wants its
// inet_interfaces to be an interface's, and removed after), one port and
// so one service name,
// each with Debian's chrooted tlsmgr line. A session from one host resumes
// on another of the same realm, and not on one of another realm; with
// PostgreSQL stopped every host still offers STARTTLS and resumes its own
// tickets; once it is back, hosts resume each other's again, also one that
// started while it was down.

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// addLoopback gives lo the address for the test, unless it has it already.
func addLoopback(t *testing.T, addr string) {
	t.Helper()
	if out, _ := run(t, time.Minute, "ip", "-4", "addr", "show", "dev", "lo"); strings.Contains(out, " "+addr+"/") {
		return
	}
	if out, err := run(t, time.Minute, "ip", "addr", "add", addr+"/32", "dev", "lo"); err != nil {
		t.Fatalf("ip addr add %s: %v %s", addr, err, out)
	}
	t.Cleanup(func() { run(t, time.Minute, "ip", "addr", "del", addr+"/32", "dev", "lo") })
}

func TestEndToEndSharedStore(t *testing.T) {
	requirePostfix(t)
	pg := startPG(t)
	port := freePort(t)
	keyDir := t.TempDir()
	secret := filepath.Join(keyDir, "tlsmgr_shared.key")
	if err := os.WriteFile(secret, []byte(strings.Repeat("k", sharedSecretLen)), 0o600); err != nil {
		t.Fatal(err)
	}
	var first *postfixInstance
	start := func(addr, realm string) *postfixInstance {
		t.Helper()
		addLoopback(t, addr)
		p := newPostfixOn(t, addr, port)
		if first != nil { // one certificate for the name, as real hosts behind it have
			for _, f := range []string{"cert.pem", "key.pem"} {
				data, _ := os.ReadFile(filepath.Join(first.etc, f))
				os.WriteFile(filepath.Join(p.etc, f), data, 0o600)
			}
		} else {
			first = p
		}
		writeFile(t, p.etc, "tlsmgr.toml", fmt.Sprintf("tlsmgr_shared_database = %q\ntlsmgr_shared_realm = %q\ntlsmgr_shared_secret_file = %q\n",
			pg.dsn(), realm, secret))
		p.postfix("start")
		if p.waitLog(0, `daemon started`, 10*time.Second) == "" {
			t.Fatalf("postfix on %s did not start:\n%s", addr, p.logText())
		}
		return p
	}
	a := start("127.0.0.2", "mx")
	b := start("127.0.0.3", "mx")
	c := start("127.0.0.4", "elsewhere")

	// across runs s_client -sess_out on one host, then -sess_in on another.
	across := func(from, to *postfixInstance, args ...string) string {
		t.Helper()
		sess := filepath.Join(from.dir, fmt.Sprintf("sess-%d", time.Now().UnixNano()))
		off := from.logSize()
		if got := from.handshake(port, append(args, "-sess_out", sess)...); !strings.HasPrefix(got, "New, ") {
			t.Fatalf("first handshake on %s: %q\n%s", from.addr, got, from.logText()[off:])
		}
		from.waitLog(off, `disconnect from`, 5*time.Second)
		return to.handshake(port, append(args, "-sess_in", sess)...)
	}
	kinds := []struct {
		name string
		args []string
	}{
		{"TLS 1.3 ticket", []string{"-tls1_3"}},
		{"TLS 1.2 ticket", []string{"-tls1_2"}},
		{"TLS 1.2 session ID (the shared smtpd cache)", []string{"-tls1_2", "-no_ticket"}},
	}
	for _, k := range kinds {
		t.Run("a session from host A resumes on host B: "+k.name, func(t *testing.T) {
			if got := across(a, b, k.args...); !strings.HasPrefix(got, "Reused, ") {
				t.Errorf("on B: %q\nA:\n%s\nB:\n%s", got, a.tail(30), b.tail(30))
			}
			if got := across(b, a, k.args...); !strings.HasPrefix(got, "Reused, ") {
				t.Errorf("back on A: %q", got)
			}
		})
	}
	t.Run("a host of another realm does not resume them", func(t *testing.T) {
		for _, k := range kinds {
			if got := across(a, c, k.args...); !strings.HasPrefix(got, "New, ") {
				t.Errorf("%s on the host of another realm: %q", k.name, got)
			}
		}
	})
	t.Run("psql shows the shared sessions, sealed", func(t *testing.T) {
		rows := pg.sql("SELECT realm, cache, protocol, cipher FROM sessions WHERE realm = 'mx'")
		if len(rows) == 0 {
			t.Fatal("no shared session in the sessions view")
		}
		for _, q := range []string{
			"SELECT realm, cache, left(id, 24) AS id, size, stored, protocol, cipher, ticket FROM sessions ORDER BY stored, id LIMIT 4",
			"SELECT * FROM cache_stats", "SELECT realm, period, slot, issues_from, issues_until FROM ticket_key_names ORDER BY realm, slot",
		} {
			t.Logf("psql: %s", q)
			for _, r := range pg.sql(q) {
				t.Logf("  %v", r)
			}
		}
		keys := pg.sql("SELECT realm, slot FROM ticket_key_names")
		realms := map[string]bool{}
		for _, r := range keys {
			realms[r[0].(string)] = true
		}
		if !realms["mx"] || !realms["elsewhere"] {
			t.Errorf("ticket keys by realm: %v", keys)
		}
	})

	// PostgreSQL goes away.
	offA, offB := a.logSize(), b.logSize()
	pg.stop()
	var d *postfixInstance
	t.Run("with PostgreSQL stopped, hosts offer STARTTLS and resume on the same host", func(t *testing.T) {
		for _, p := range []*postfixInstance{a, b} {
			for i := range 3 {
				conn, err := smtpDial(fmt.Sprintf("%s:%d", p.addr, port))
				if err != nil {
					t.Fatal(err)
				}
				conn.Hello("e2e-client.localdomain")
				if ok, _ := conn.Extension("STARTTLS"); !ok {
					t.Errorf("%s: no STARTTLS (try %d)", p.addr, i)
				}
				conn.Quit()
			}
			for _, v := range []string{"-tls1_3", "-tls1_2"} {
				if got := across(p, p, v); !strings.HasPrefix(got, "Reused, ") {
					t.Errorf("%s %s on the same host: %q\n%s", p.addr, v, got, p.tail(30))
				}
			}
		}
		// A host that starts while the database is down.
		d = start("127.0.0.5", "mx")
		if got := across(d, d, "-tls1_3"); !strings.HasPrefix(got, "Reused, ") {
			t.Errorf("the host started while PostgreSQL was down: %q\n%s", got, d.tail(30))
		}
		for _, p := range []*postfixInstance{a, b} {
			off := map[*postfixInstance]int{a: offA, b: offB}[p]
			warnings := regexp.MustCompile(`(?m)tlsmgr\[\d+\]: warning: .*$`).FindAllString(p.logText()[off:], -1)
			if len(warnings) == 0 || len(warnings) > 6 {
				t.Errorf("%s: %d tlsmgr warnings while PostgreSQL is down, want 1 to 6:\n%s", p.addr, len(warnings), strings.Join(warnings, "\n"))
			}
			t.Logf("%s: %d warnings while down: %s", p.addr, len(warnings), strings.Join(warnings, "\n"))
		}
	})

	pg.start()
	t.Run("after PostgreSQL returns, hosts resume each other's sessions within a minute, also the one started meanwhile", func(t *testing.T) {
		began := time.Now()
		pairs := [][2]*postfixInstance{{a, b}, {d, a}, {a, d}, {b, d}}
		for time.Since(began) < 75*time.Second {
			ok := 0
			for _, pr := range pairs {
				if got := across(pr[0], pr[1], "-tls1_3"); strings.HasPrefix(got, "Reused, ") {
					ok++
				}
			}
			if got := across(d, b, "-tls1_2", "-no_ticket"); strings.HasPrefix(got, "Reused, ") {
				ok++
			}
			if ok == len(pairs)+1 {
				t.Logf("every pair resumes %v after PostgreSQL's start", time.Since(began).Round(time.Second))
				if time.Since(began) > time.Minute {
					t.Errorf("it took %v, more than a minute", time.Since(began))
				}
				return
			}
			time.Sleep(2 * time.Second)
		}
		t.Errorf("hosts do not resume each other's sessions %v after PostgreSQL's start\nA:\n%s\nD:\n%s", time.Since(began), a.tail(20), d.tail(20))
	})
}
