package main

// The end-to-end checks of what stock tlsmgr lacks, against real Postfix:
// readable sessions and counters that match what Postfix did, the README's
// SQL recipes, tlsmgr -stats, and ticket keys kept across postfix reload.

import (
	"bytes"
	"database/sql"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// ianaCipher asks openssl for the IANA name of one of its cipher names.
func ianaCipher(t *testing.T, name string) string {
	t.Helper()
	out, err := run(t, time.Minute, "openssl", "ciphers", "-stdname", "ALL:@SECLEVEL=0") // TLS 1.3 suites included
	if err != nil {
		t.Fatalf("openssl ciphers -stdname: %v %s", err, out)
	}
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[2] == name {
			return f[0]
		}
	}
	t.Fatalf("openssl ciphers -stdname does not know %s:\n%s", name, out)
	return ""
}

// reportedPair turns "Reused, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384"
// into "TLSv1.3 TLS_AES_256_GCM_SHA384" with the IANA name.
func reportedPair(t *testing.T, line string) string {
	m := regexp.MustCompile(`(TLSv1\.[0-3]), Cipher is (\S+)`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("no protocol and cipher in %q", line)
	}
	return m[1] + " " + ianaCipher(t, m[2])
}

// sessionsDB opens the live database read-only, as root may.
func (p *postfixInstance) sessionsDB(t *testing.T) *sql.DB {
	db, err := sql.Open("sqlite", "file:"+p.data+"/tlsmgr.sqlite?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// waitCounters waits until tlsmgr has written its counters after since.
func waitCounters(t *testing.T, db *sql.DB, since time.Time) {
	t.Helper()
	deadline := time.Now().Add(3 * statsWritePeriod)
	for {
		var updated int64
		if err := db.QueryRow("SELECT updated FROM counters_period").Scan(&updated); err == nil && updated > since.Unix() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no counters written within %v", 3*statsWritePeriod)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func queryStrings(t *testing.T, db *sql.DB, query string) []string {
	t.Helper()
	rows, err := db.Query(query)
	if err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s sql.NullString
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		out = append(out, s.String)
	}
	return out
}

// checkReadableCaches runs after the resumptions and the two deliveries:
// byID are the s_client lines of the sessions that smtpd cached by ID.
func (p *postfixInstance) checkReadableCaches(t *testing.T, byID []string) {
	db := p.sessionsDB(t)
	waitCounters(t, db, time.Now())

	t.Run("smtpd rows carry the protocol and cipher openssl s_client reported", func(t *testing.T) {
		rows := queryStrings(t, db, "SELECT protocol || ' ' || cipher FROM sessions WHERE cache = 'smtpd'")
		for _, line := range byID {
			if want := reportedPair(t, line); !slices.Contains(rows, want) {
				t.Errorf("s_client reported %q (%s); the smtpd rows say %q", line, want, rows)
			}
		}
		if len(rows) < len(byID) {
			t.Errorf("%d smtpd rows for %d sessions cached by ID", len(rows), len(byID))
		}
	})

	t.Run("the smtp row has the SNI and the peer certificate the sink presented", func(t *testing.T) {
		line := regexp.MustCompile(`e2e/relay-test/smtp\[\d+\]: .*TLS connection established to \S+: (TLSv1\.[23]) with cipher (\S+)`).
			FindStringSubmatch(p.logText())
		if line == nil {
			t.Fatalf("no TLS connection logged by the smtp client:\n%s", p.logText())
		}
		want := fmt.Sprintf("%s %s e2e-sink.test CN=e2e.localdomain", line[1], ianaCipher(t, line[2]))
		rows := queryStrings(t, db, "SELECT protocol || ' ' || cipher || ' ' || sni || ' ' || peer_subject FROM sessions WHERE cache = 'smtp'")
		if len(rows) == 0 || !slices.Contains(rows, want) {
			t.Errorf("smtp rows %q, want %q", rows, want)
		}
		fp, _ := run(t, time.Minute, "openssl", "x509", "-in", p.etc+"/cert.pem", "-noout", "-fingerprint", "-sha256")
		got := queryStrings(t, db, "SELECT peer_fingerprint FROM sessions WHERE cache = 'smtp'")
		if len(got) == 0 || !strings.Contains(fp, "="+got[0]) {
			t.Errorf("peer_fingerprint %q, openssl x509 says %s", got, fp)
		}
	})

	t.Run("hits and misses are the resumptions the test made", func(t *testing.T) {
		// smtpd: each session-ID resumption is one lookup and one hit;
		// tickets never reach the cache. smtp: the first delivery
		// misses, the second hits.
		got := queryStrings(t, db, "SELECT cache || ' ' || lookups || ' ' || hits || ' ' || misses FROM cache_counters ORDER BY cache")
		want := []string{"lmtp 0 0 0", fmt.Sprintf("smtp 2 1 1"), fmt.Sprintf("smtpd %d %d 0", len(byID), len(byID))}
		if !slices.Equal(got, want) {
			t.Errorf("cache_counters (cache lookups hits misses): %q, want %q", got, want)
		}
	})

	t.Run("tlsmgr -stats prints them without sqlite3", func(t *testing.T) {
		out, err := run(t, time.Minute, p.bin, "-stats", "-mailconfig", p.etc)
		t.Logf("tlsmgr -stats -mailconfig %s:\n%s", p.etc, out)
		if err != nil || !regexp.MustCompile(`(?m)^ +smtp +\d+ +\d+ +2 +1 +1 +50\.0% `).MatchString(out) {
			t.Errorf("tlsmgr -stats: %v\n%s", err, out)
		}
	})

	t.Run("node_exporter's textfile collector serves tlsmgr -stats -format openmetrics", func(t *testing.T) {
		exporter := "/usr/bin/prometheus-node-exporter"
		if !fileExists(exporter) {
			skipOutsideCI(t, "needs Debian's prometheus-node-exporter (.ci/run installs it)")
			return
		}
		out, err := run(t, time.Minute, p.bin, "-stats", "-format", "openmetrics", "-mailconfig", p.etc)
		if err != nil {
			t.Fatalf("-stats -format openmetrics: %v\n%s", err, out)
		}
		dir := t.TempDir()
		os.Chmod(dir, 0o755)
		if err := os.WriteFile(dir+"/tlsmgr.prom", []byte(out), 0o644); err != nil {
			t.Fatal(err)
		}
		addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		cmd := exec.Command(exporter, "--web.listen-address="+addr, "--collector.disable-defaults",
			"--collector.textfile", "--collector.textfile.directory="+dir)
		var logs bytes.Buffer
		cmd.Stdout, cmd.Stderr = &logs, &logs
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { cmd.Process.Kill(); cmd.Wait() }()
		var metrics string
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			resp, err := http.Get("http://" + addr + "/metrics")
			if err != nil {
				continue
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			metrics = string(body)
			break
		}
		var ours []string
		for _, line := range strings.Split(metrics, "\n") {
			if strings.HasPrefix(line, "tlsmgr_") || strings.HasPrefix(line, "node_textfile_scrape_error") {
				ours = append(ours, line)
			}
		}
		t.Logf("node_exporter's /metrics, our series:\n%s", strings.Join(ours, "\n"))
		for _, want := range []string{"node_textfile_scrape_error 0", `tlsmgr_cache_lookups_total{cache="smtp"} 2`,
			`tlsmgr_cache_hits_total{cache="smtp"} 1`, "tlsmgr_stats_live 1"} {
			if !slices.Contains(ours, want) {
				t.Errorf("node_exporter's /metrics lacks %q\n%s\n%s", want, metrics, logs.String())
			}
		}
	})

	t.Run("the README's SQL recipes run against these sessions", func(t *testing.T) {
		for _, recipe := range readmeRecipes(t) {
			out, err := run(t, time.Minute, "sqlite3", "-readonly", "-header", "-column", p.data+"/tlsmgr.sqlite", recipe)
			if err != nil || strings.Contains(out, "Error") {
				t.Errorf("%s\n%v %s", recipe, err, out)
			}
			t.Logf("$ sqlite3 -header -column tlsmgr.sqlite %q\n%s", recipe, out)
		}
	})
}

// readmeRecipes are the sql blocks of the README's recipes section.
func readmeRecipes(t *testing.T) []string {
	t.Helper()
	text, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, found := strings.Cut(string(text), "<!-- recipes -->")
	section, _, _ = strings.Cut(section, "<!-- /recipes -->")
	blocks := regexp.MustCompile("(?s)```sql\n(.*?)```").FindAllStringSubmatch(section, -1)
	if !found || len(blocks) < 4 {
		t.Fatalf("README: want at least 4 sql blocks between <!-- recipes --> and <!-- /recipes -->, found %d", len(blocks))
	}
	var out []string
	for _, b := range blocks {
		out = append(out, strings.TrimSpace(b[1]))
	}
	return out
}

// ticketAcrossReload sets tlsmgr_keep_ticket_keys in tlsmgr.toml, reloads,
// saves a TLS 1.3 session with its ticket, reloads again, and says whether
// that ticket resumed. Every smtpd serves one connection (max_use=1), so
// the key can only come from tlsmgr.
func (p *postfixInstance) ticketAcrossReload(t *testing.T, keep bool) bool {
	toml := filepath.Join(p.etc, "tlsmgr.toml")
	writeFile(t, p.etc, "tlsmgr.toml", fmt.Sprintf("tlsmgr_keep_ticket_keys = %v\n", keep))
	defer os.Remove(toml)
	p.reloadAndWait(t)
	sess := filepath.Join(p.dir, fmt.Sprintf("ticket-%v", keep))
	if first := p.handshake(p.testPort, "-tls1_3", "-sess_out", sess); !strings.HasPrefix(first, "New, TLSv1.3") {
		t.Fatalf("first handshake: %q", first)
	}
	p.reloadAndWait(t)
	off := p.logSize()
	second := p.handshake(p.testPort, "-tls1_3", "-sess_in", sess)
	if keep {
		p.waitLog(off, `Reusing old session`, 5*time.Second)
	}
	t.Logf("after postfix reload with tlsmgr_keep_ticket_keys = %v: %s", keep, second)
	return strings.HasPrefix(second, "Reused, TLSv1.3")
}

// reloadAndWait reloads and waits until the tlsmgr that ran is gone.
func (p *postfixInstance) reloadAndWait(t *testing.T) {
	before := p.tlsmgrPIDs()
	p.postfix("reload")
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		left := false
		for _, pid := range p.tlsmgrPIDs() {
			left = left || slices.Contains(before, pid)
		}
		if !left {
			time.Sleep(200 * time.Millisecond) // master has started the smtpd listeners again
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("tlsmgr %v still runs 10 s after postfix reload", before)
}

// checkRawPublicKey delivers through relay-rpk to the sink that sends its
// raw public key: the smtp cache's row for it has peer_rpk 1 and, as
// peer_fingerprint, the SHA-256 of the sink's SubjectPublicKeyInfo, as
// openssl computes it from the key file and as Postfix logs it.
func (p *postfixInstance) checkRawPublicKey(t *testing.T) {
	if p.rpkPort == 0 {
		t.Skip("this Postfix has no raw public keys (3.10 and later have); .ci/debian13 runs this on Debian 13")
	}
	off := p.logSize()
	if err := submit(fmt.Sprintf("127.0.0.1:%d", p.testPort), "sink@rpk.test"); err != nil {
		t.Fatalf("submit: %v", err)
	}
	if p.waitLog(off, `e2e/relay-rpk/smtp\[\d+\]: \w+: to=<sink@rpk.test>.*status=sent`, 20*time.Second) == "" {
		t.Fatalf("not delivered:\n%s", p.logText()[off:])
	}
	logged := p.logText()[off:]
	if !regexp.MustCompile(`e2e/relay-rpk/smtp\[\d+\]: .*TLS connection established`).MatchString(logged) {
		t.Fatalf("no TLS:\n%s", logged)
	}
	// openssl's fingerprint of the sink's public key, SubjectPublicKeyInfo DER
	spki, err := exec.Command("openssl", "pkey", "-in", p.etc+"/key.pem", "-pubout", "-outform", "DER").Output()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("openssl", "dgst", "-sha256", "-c")
	cmd.Stdin = bytes.NewReader(spki)
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	want := strings.ToUpper(strings.TrimSpace(string(out[bytes.LastIndexByte(out, ' ')+1:])))
	// Postfix logs it too at smtp_tls_loglevel 2 (tls_client.c, for a peer
	// without a certificate: "raw public key fingerprint=").
	if m := regexp.MustCompile(`e2e/relay-rpk/smtp\[\d+\]: .*: raw public key fingerprint=([0-9A-F:]+)`).FindStringSubmatch(logged); m == nil {
		t.Errorf("the smtp client logged no raw public key:\n%s", logged)
	} else if m[1] != want {
		t.Errorf("Postfix logged the key's fingerprint as %s, openssl says %s", m[1], want)
	}
	db := p.sessionsDB(t)
	var rows []string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		rows = queryStrings(t, db, "SELECT peer_fingerprint || ' ' || coalesce(peer_subject, '-') || ' ' || peer_rpk FROM sessions WHERE cache = 'smtp' AND peer_rpk = 1")
		if len(rows) > 0 {
			break
		}
	}
	if len(rows) != 1 || rows[0] != want+" - 1" {
		t.Errorf("smtp rows with a raw key: %q, want [%q]", rows, want+" - 1")
	}
	t.Logf("openssl: %s; the smtp row (peer_fingerprint, peer_subject, peer_rpk): %q", want, rows)
	// The certificate sessions of the other deliveries say 0.
	if certs := queryStrings(t, db, "SELECT count(*) FROM sessions WHERE cache = 'smtp' AND peer_rpk = 0 AND peer_subject IS NOT NULL"); len(certs) != 1 || certs[0] == "0" {
		t.Errorf("smtp rows with a certificate and peer_rpk 0: %q", certs)
	}
}
