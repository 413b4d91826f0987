package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0600); err != nil {
		t.Fatal(err)
	}
	return p
}

func loadMainCF(t *testing.T, content string) (*config, string) {
	t.Helper()
	var warnings []string
	c := newConfig()
	p := writeFile(t, t.TempDir(), "main.cf", content)
	if err := c.readMainCF(p, func(f string, a ...any) { warnings = append(warnings, strings.ReplaceAll(f, "%s", "")) }); err != nil {
		t.Fatal(err)
	}
	return c, strings.Join(warnings, "\n")
}

// The rules of postfix-tlsmgr.md §7.2: comments, continuation, trimming.
func TestMainCFSyntax(t *testing.T) {
	c, warnings := loadMainCF(t, `# a comment
smtpd_tls_loglevel=1
   # an indented comment is still a comment
myhostname = mail.example.com   
mydomain = example.com
  # comments vanish even between continuation lines
smtp_tls_session_cache_database = btree:
    ${data_directory}/smtp_scache
odd = a # b
smtpd_tls_loglevel = 2
`)
	for name, want := range map[string]string{
		"smtpd_tls_loglevel":              "2", // the last one wins
		"myhostname":                      "mail.example.com",
		"smtp_tls_session_cache_database": "btree:    /var/lib/postfix/smtp_scache",
		"odd":                             "a # b", // '#' after text is literal
	} {
		if got, err := c.str(name); err != nil || got != want {
			t.Errorf("%s = %q (%v), want %q", name, got, err, want)
		}
	}
	if !strings.Contains(warnings, "overriding earlier entry") {
		t.Errorf("no warning for the repeated name: %q", warnings)
	}
	if _, err := newConfig().raw("nonexistent"); err {
		t.Error("undefined name reported as defined")
	}
	bad := newConfig()
	p := writeFile(t, t.TempDir(), "main.cf", "no equals sign here\n")
	if err := bad.readMainCF(p, t.Logf); err == nil || !strings.Contains(err.Error(), "missing '=' after attribute name") {
		t.Errorf("missing '=': %v", err)
	}
}

// The expansion rules of postfix-tlsmgr.md §7.3.
func TestExpansion(t *testing.T) {
	c, _ := loadMainCF(t, `
full = yes
empty =
num = 10
chain = $full-$num
loop = $loop
`)
	for _, tc := range []struct{ in, want string }{
		{"$full", "yes"},
		{"${full}", "yes"},
		{"$(full)", "yes"},
		{"$$full", "$full"},
		{"$undefined.", "."},
		{"${full?set}", "set"},
		{"${empty?set}", ""},
		{"${undefined?set}", ""},
		{"${full:unset}", ""},
		{"${empty:unset}", "unset"},
		{"${undefined:unset}", "unset"},
		{"${full?{a}:{b}}", "a"},
		{"${empty?{a}:{b}}", "b"},
		{"${empty?{a}:b}", "b"},
		{"${full ? {a} : {b}}", "a"},
		{"${full?{$num}}", "10"},
		{"${empty:{x ${full}}}", "x yes"},
		{"$chain", "yes-10"},
		{"${{$num} == {10} ? {ten} : {other}}", "ten"},
		{"${{$num} < {9} ? {less} : {more}}", "more"}, // numeric: 10 > 9
		{"${{abc} < {abd} ? {lt} : {ge}}", "lt"},
		{"${{$full} != {no} ? {differ}}", "differ"},
		{"${data_directory}/prng_exch", "/var/lib/postfix/prng_exch"},
		{"${syslog_name}", "postfix"},
	} {
		got, err := c.expand(tc.in, 0)
		if err != nil || got != tc.want {
			t.Errorf("expand(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	for _, tc := range []struct{ in, wantErr string }{
		{"${full", "truncated macro reference"},
		{"$", ""}, // a lone trailing '$' is literal
		{"${}", "empty macro name"},
		{"$loop", "unreasonable macro call nesting"},
		{"${{a} =~ {b} ? {x}}", "unknown operator"},
	} {
		_, err := c.expand(tc.in, 0)
		if tc.wantErr == "" {
			if err != nil {
				t.Errorf("expand(%q): %v", tc.in, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("expand(%q) error %v, want %q", tc.in, err, tc.wantErr)
		}
	}
	c.mainCF["multi_instance_name"] = "postfix-out"
	if got, _ := c.str("syslog_name"); got != "postfix-out" {
		t.Errorf("syslog_name with multi_instance_name = %q", got)
	}
}

func TestTimeValues(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"3600", 3600, true}, {"3600s", 3600, true}, {"2m", 120, true}, {"1h", 3600, true},
		{"1hour", 3600, true}, {"1d", 86400, true}, {"1w", 604800, true}, {"0", 0, true},
		{"10x", 0, false}, {"-5", 0, false}, {"", 0, false}, {"h", 0, false}, {"99999999999999w", 0, false},
	} {
		got, err := parseTime(tc.in, 's')
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseTime(%q) = %d, %v; want %d ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

// Bad values stop start-up with one line that names the parameter, the
// value and what is allowed (Postfix's wording where it has one).
func TestBadValues(t *testing.T) {
	for _, tc := range []struct{ line, want string }{
		{"smtpd_tls_session_cache_timeout = 8640001", "invalid smtpd_tls_session_cache_timeout: 8640001 (max 8640000)"},
		{"smtp_tls_session_cache_timeout = 1fortnight", "parameter smtp_tls_session_cache_timeout: bad time value or unit: 1fortnight"},
		{"lmtp_tls_session_cache_timeout = -1", "parameter lmtp_tls_session_cache_timeout: bad time value or unit: -1"},
		{"tls_random_bytes = 0", "invalid tls_random_bytes parameter value 0 < 1"},
		{"tls_random_bytes = 32x", "bad numerical configuration: tls_random_bytes = 32x"},
		{"tls_random_reseed_period = 0", "invalid tls_random_reseed_period: 0 (min 1)"},
		{"tls_random_prng_update_period = 0", "invalid tls_random_prng_update_period: 0 (min 1)"},
		{"data_directory = ${oops", "parameter data_directory: truncated macro reference"},
		{"tlsmgr_sweep_batch_size = 0", "invalid tlsmgr_sweep_batch_size parameter value 0 < 1"},
	} {
		c, _ := loadMainCF(t, tc.line+"\n")
		err := c.validate()
		if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.line, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: error is more than one line: %q", tc.line, err)
		}
	}
	c, _ := loadMainCF(t, "smtpd_tls_session_cache_timeout = 0\nsmtp_tls_session_cache_timeout = 1h\n")
	if err := c.validate(); err != nil {
		t.Errorf("valid values rejected: %v", err)
	}
}

// Precedence: main.cf < TOML overlay < -o.
func TestTOMLOverlay(t *testing.T) {
	dir := t.TempDir()
	c, _ := loadMainCF(t, "smtpd_tls_session_cache_timeout = 100\nsmtp_tls_session_cache_timeout = 200\nlmtp_tls_session_cache_timeout = 300\n")
	toml := writeFile(t, dir, "tlsmgr.toml", "smtp_tls_session_cache_timeout = 2000\nlmtp_tls_session_cache_timeout = \"3000s\"\ntlsmgr_database = \"/x/y.sqlite\"\n")
	if err := c.readTOML(toml); err != nil {
		t.Fatal(err)
	}
	if err := c.setOverride("lmtp_tls_session_cache_timeout = 4000"); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]int64{
		"smtpd_tls_session_cache_timeout": 100, "smtp_tls_session_cache_timeout": 2000, "lmtp_tls_session_cache_timeout": 4000,
	} {
		if got := c.mustNum(name); got != want {
			t.Errorf("%s = %d, want %d", name, got, want)
		}
	}
	for _, tc := range []struct{ content, want string }{
		{"# a comment\n\nsmtpd_tls_session_cache_timout = 10\n",
			`bad.toml, line 3: unknown parameter "smtpd_tls_session_cache_timout"; did you mean "smtpd_tls_session_cache_timeout"?`},
		{"tlsmgr_keep_sesions = true\n", `line 1: unknown parameter "tlsmgr_keep_sesions"; did you mean "tlsmgr_keep_sessions"?`},
		{"completely_unrelated_name = 1\n", `unknown parameter "completely_unrelated_name" (tlsmgr -d lists every parameter it reads)`},
		{"tls_random_source = 5\n", "line 1: parameter tls_random_source = 5: want a string in quotes"},
		{"tls_random_bytes = true\n", "parameter tls_random_bytes = true: wrong type Bool; want a string or an integer"},
		{"tlsmgr_keep_sessions = 1\n", "parameter tlsmgr_keep_sessions = 1: want a string in quotes or true/false"},
		{"[section]\nx = 1\n", "tables are not used"},
		{"tls_random_bytes = 1\ntls_random_bytes = \n", "bad.toml, line 2: "},
	} {
		err := newConfig().readTOML(writeFile(t, dir, "bad.toml", tc.content))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want %q", tc.content, err, tc.want)
		}
	}
	if err := c.setOverride("novalue"); err == nil || !strings.Contains(err.Error(), "missing '='") {
		t.Errorf("-o novalue: %v", err)
	}
	// An unknown -o name is refused as an unknown TOML key is.
	if err := c.setOverride("tlsmgr_max_conections=5"); err == nil ||
		!strings.Contains(err.Error(), `invalid "-o tlsmgr_max_conections=5" option: unknown parameter "tlsmgr_max_conections"; did you mean "tlsmgr_max_connections"?`) {
		t.Errorf("-o with a misspelt name: %v", err)
	}
}

// tlsmgr -n shows what is set and where; tlsmgr -d every default, ours marked.
func TestShowConfig(t *testing.T) {
	bin := tlsmgrBinary(t)
	dir := t.TempDir()
	writeFile(t, dir, "main.cf", "myhostname = mx.example\nsmtpd_tls_session_cache_timeout = 2h\nunrelated = 1\n")
	writeFile(t, dir, "tlsmgr.toml", "tlsmgr_keep_ticket_keys = true\nsmtpd_tls_session_cache_timeout = \"3h\"\n")
	out, err := exec.Command(bin, "-n", "-mailconfig", dir, "-o", "tlsmgr_max_connections=5").CombinedOutput()
	want := "myhostname = mx.example\t# " + dir + "/main.cf\n" +
		"smtpd_tls_session_cache_timeout = 3h\t# " + dir + "/tlsmgr.toml\n" +
		"tlsmgr_keep_ticket_keys = yes\t# " + dir + "/tlsmgr.toml\n" +
		"tlsmgr_max_connections = 5\t# -o\n"
	if err != nil || string(out) != want {
		t.Errorf("tlsmgr -n: %v\n%s\nwant\n%s", err, out, want)
	}
	out, err = exec.Command(bin, "-d").CombinedOutput()
	for _, line := range []string{"smtpd_tls_session_cache_timeout = 3600s\n", "tlsmgr_keep_sessions = no\t# tlsmgr's own\n", "tls_random_exchange_name = ${data_directory}/prng_exch\n"} {
		if err != nil || !strings.Contains(string(out), line) {
			t.Errorf("tlsmgr -d lacks %q: %v\n%s", line, err, out)
		}
	}
	if n := strings.Count(string(out), "\n"); n != len(params) {
		t.Errorf("tlsmgr -d: %d lines for %d parameters", n, len(params))
	}
	out, err = exec.Command(bin, "-version").CombinedOutput()
	if err != nil || !regexp.MustCompile(`^tlsmgr \S+ \(commit \S+, go1\.\d+.*, linux/\w+\)\n$`).Match(out) {
		t.Errorf("tlsmgr -version: %v %q", err, out)
	}
}

// The shipped example must load: every key it sets is a known parameter.
func TestExampleTOMLLoads(t *testing.T) {
	text, err := os.ReadFile("tlsmgr.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	uncommented := strings.NewReplacer("\n# ", "\n").Replace("\n" + string(text))
	var lines []string
	for _, l := range strings.Split(uncommented, "\n") {
		if strings.Contains(l, " = ") && !strings.HasPrefix(l, "#") {
			lines = append(lines, l)
		}
	}
	c := newConfig()
	if err := c.readTOML(writeFile(t, t.TempDir(), "all.toml", strings.Join(lines, "\n")+"\n")); err != nil {
		t.Fatal(err)
	}
	for name := range params {
		if _, ok := c.overlay[name]; !ok {
			t.Errorf("tlsmgr.toml.example does not mention %s", name)
		}
	}
	if err := c.validate(); err != nil {
		t.Errorf("the example's values do not validate: %v", err)
	}
}

func TestDaemonArgs(t *testing.T) {
	o, err := parseDaemonArgs([]string{"-l", "-t", "unix", "-u", "-c", "-n", "tlsmgr2", "-o", "a=b", "-ofoo=bar", "-vv", "-s", "2", "-z", "-i", "100s", "-m", "5", "extra"})
	if err != nil {
		t.Fatal(err)
	}
	if !o.solitary || !o.dropPrivs || !o.chroot || o.transport != "unix" || o.serviceName != "tlsmgr2" ||
		o.verbose != 2 || o.listenFds != 2 || len(o.overrides) != 2 || o.overrides[1] != "foo=bar" || o.strayArgs[0] != "extra" {
		t.Errorf("parsed %+v", o)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-x"}, "invalid option: x"},
		{[]string{"-s", "0"}, "invalid socket_count: 0"},
		{[]string{"-t"}, "option requires an argument"},
	} {
		if _, err := parseDaemonArgs(tc.args); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want %q", tc.args, err, tc.want)
		}
	}
}

func TestDataRedirect(t *testing.T) {
	dir := t.TempDir()
	logged := captureLog(t)
	uid := os.Getuid()
	if got := dataRedirect("file", dir+"/prng_exch", "/data", uid); got != dir+"/prng_exch" {
		t.Errorf("own directory redirected to %s", got)
	}
	if got := dataRedirect("file", dir+"/prng_exch", "/data", uid+1); got != "/data/prng_exch" {
		t.Errorf("foreign directory: %s", got)
	}
	want := "warning: request to update file " + dir + "/prng_exch in non-postfix directory " + dir
	if !strings.Contains(logged(), want) || !strings.Contains(logged(), "warning: redirecting the request to postfix-owned data_directory /data") {
		t.Errorf("log %q", logged())
	}
	if got := dataRedirect("table", dir+"/x", "/data", -1); got != dir+"/x" {
		t.Errorf("standalone (no mail_owner) redirected to %s", got)
	}
}

// The man page documents every parameter tlsmgr reads.
func TestManPageListsEveryParameter(t *testing.T) {
	text, err := os.ReadFile("tlsmgr.8")
	if err != nil {
		t.Fatal(err)
	}
	for name := range params {
		if !strings.Contains(string(text), name) {
			t.Errorf("tlsmgr.8 does not mention %s", name)
		}
	}
}

// Postfix 3.11 and 3.12 main.cf and master.cf: "trace" and the other
// keywords of *_tls_loglevel are accepted without a warning (trace adds
// nothing to tlsmgr: "1,trace" logs no cache operations, as in Postfix's
// tls_log_mask, "2,trace" does); the Berkeley DB migration parameters and
// $default_cache_db_type in a cache name are read without complaint; -o
// service_name= and -o process_name= are ignored, as 3.12's daemons do, and
// main.cf cannot change them either.
func TestPostfix312Parameters(t *testing.T) {
	s := newStandalone(t)
	s.writeMainCF(`smtpd_tls_loglevel = 1,trace
smtp_tls_loglevel = 2, trace, ssl-session-packet-dump
non_bdb_migration_level = enable-redirect
non_bdb_migration_log_redirect = yes
default_cache_db_type = lmdb
service_name = from-main-cf
syslog_name = test/$service_name
smtpd_tls_session_cache_database = btree:${data_directory}/smtpd_scache
smtp_tls_session_cache_database = $default_cache_db_type:${data_directory}/smtp_scache
`)
	s.start("-o", "service_name=from-o", "-o", "process_name=from-o")
	c, _ := s.dialWithin(5 * time.Second)
	for _, cache := range []string{"smtpd", "smtp"} {
		if got := c.req("request", "update", "cache_type", cache, "cache_id", "id1", "session", b64("hello")); got != "status=0" {
			t.Fatalf("%s update: %s\n%s", cache, got, s.log)
		}
		if got := c.req("request", "lookup", "cache_type", cache, "cache_id", "id1"); got != "status=0 session="+b64("hello") {
			t.Fatalf("%s lookup: %s\n%s", cache, got, s.log)
		}
	}
	waitFor(t, func() bool { return strings.Contains(s.log.String(), "put smtp session id=id1") }, "smtp cache logging in %s", s.log)
	s.stop()
	logged := s.log.String()
	if regexp.MustCompile(`warning: .*(loglevel|log level|unknown|parameter|service_name|process_name)|fatal`).MatchString(logged) {
		t.Errorf("warnings:\n%s", logged)
	}
	if strings.Contains(logged, "smtpd session id=id1") {
		t.Errorf("smtpd_tls_loglevel = 1,trace logged cache operations:\n%s", logged)
	}
	if !strings.Contains(logged, "open smtp TLS cache lmdb:"+s.data+"/smtp_scache") {
		t.Errorf("$default_cache_db_type was not expanded:\n%s", logged)
	}
	if !strings.Contains(logged, "test/tlsmgr/tlsmgr[") || strings.Contains(logged, "from-") {
		t.Errorf("service_name from main.cf or -o was used:\n%s", logged)
	}
	out, err := exec.Command(tlsmgrBinary(t), "-n", "-mailconfig", filepath.Join(s.dir, "etc")).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "default_cache_db_type = lmdb") || strings.Contains(string(out), "warning") {
		t.Errorf("-n: %v\n%s", err, out)
	}
}
