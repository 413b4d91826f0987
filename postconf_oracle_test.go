package main

// main.cf fidelity: Postfix's own postconf is the oracle. For every case
// of the corpus, every Postfix parameter tlsmgr reads must expand to what
// `postconf -c DIR -x NAME` prints, or fail where postconf fails.

import (
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
)

var postconfCorpus = []struct{ name, mainCF string }{
	// Layout: comments, blank lines, whitespace, continuation lines.
	{"empty file", ""},
	{"comment only", "# nothing here\n"},
	{"plain value", "myhostname = mx.example.org\n"},
	{"no spaces around =", "myhostname=mx.example.org\n"},
	{"tabs around =", "myhostname\t=\tmx.example.org\n"},
	{"trailing whitespace", "myhostname = mx.example.org   \n"},
	{"empty value", "smtpd_tls_session_cache_database =\n"},
	{"continuation line", "syslog_name = postfix\n  -test\n"},
	{"continuation with tab", "syslog_name = post\n\tfix\n"},
	{"comment inside a continuation", "syslog_name = post\n# a comment\n  fix\n"},
	{"blank line inside a continuation", "syslog_name = post\n\n  fix\n"},
	{"trailing space before a continuation", "syslog_name = post \n  fix\n"},
	{"three-line continuation", "syslog_name = a\n b\n\t c\n"},
	{"later entry wins", "myhostname = one.example\nmyhostname = two.example\n"},
	{"CRLF line ends", "myhostname = mx.example.org\r\nsyslog_name = crlf\r\n"},
	{"hash inside a value", "syslog_name = post#fix\n"},
	{"value with spaces", "maillog_file_prefixes = /var, /tmp ,/dev/stdout\n"},
	{"no newline at the end", "myhostname = last.example"},
	// $name and ${name}.
	{"$name", "queue_directory = /srv/q\ndata_directory = $queue_directory/data\n"},
	{"${name}", "queue_directory = /srv/q\ndata_directory = ${queue_directory}/data\n"},
	{"$(name)", "queue_directory = /srv/q\ndata_directory = $(queue_directory)/data\n"},
	{"$name of a default", "smtpd_tls_session_cache_database = btree:$data_directory/smtpd_scache\n"},
	{"${name} of a default", "smtpd_tls_session_cache_database = btree:${data_directory}/smtpd_scache\n"},
	{"chained names", "a1 = /x\na2 = $a1/y\ndata_directory = $a2/z\n"},
	{"name used before its definition", "data_directory = $late/d\nlate = /early\n"},
	{"$$ is a dollar", "syslog_name = cost$$\n"},
	{"$name next to text", "myhostname = mx\nsyslog_name = $myhostname-log\n"},
	{"two names in one value", "myhostname = mx\nmultiinst = i\nsyslog_name = $myhostname/$multiinst\n"},
	{"undefined $name", "syslog_name = a$no_such_parameter_xyz/b\n"},
	{"undefined ${name}", "syslog_name = a${no_such_parameter_xyz}b\n"},
	{"name of an empty parameter", "empty_one =\nsyslog_name = [$empty_one]\n"},
	// ${name?value} and ${name:value}.
	{"${name?value}, set", "multi_instance_name = inst\nsyslog_name = ${multi_instance_name?pf-$multi_instance_name}\n"},
	{"${name?value}, empty", "multi_instance_name =\nsyslog_name = x${multi_instance_name?pf}y\n"},
	{"${name:value}, set", "multi_instance_name = inst\nsyslog_name = ${multi_instance_name:fallback}\n"},
	{"${name:value}, empty", "multi_instance_name =\nsyslog_name = ${multi_instance_name:fallback}\n"},
	{"${name:value}, undefined", "syslog_name = ${no_such_parameter_xyz:fallback}\n"},
	{"${name?value}, undefined", "syslog_name = <${no_such_parameter_xyz?set}>\n"},
	{"${name?{a}:{b}}, set", "multi_instance_name = inst\nsyslog_name = ${multi_instance_name?{yes}:{no}}\n"},
	{"${name?{a}:{b}}, empty", "syslog_name = ${multi_instance_name?{yes}:{no}}\n"},
	{"syslog_name's own default with an instance", "multi_instance_name = postfix-out\n"},
	{"nested ${name?{$other}}", "myhostname = mx\nmulti_instance_name = m\nsyslog_name = ${multi_instance_name?{$myhostname-x}:{none}}\n"},
	{"value with a brace in braces", "multi_instance_name = m\nsyslog_name = ${multi_instance_name?{a}:{b}}-tail\n"},
	// Postfix 3.5 relational forms.
	{"== true", "multi_instance_name = a\nsyslog_name = ${{$multi_instance_name} == {a} ? {eq} : {ne}}\n"},
	{"== false", "multi_instance_name = b\nsyslog_name = ${{$multi_instance_name} == {a} ? {eq} : {ne}}\n"},
	{"!= true", "multi_instance_name = b\nsyslog_name = ${{$multi_instance_name} != {a} ? {ne} : {eq}}\n"},
	{"!= false", "multi_instance_name = a\nsyslog_name = ${{$multi_instance_name} != {a} ? {ne} : {eq}}\n"},
	{"< numeric", "n1 = 9\nsyslog_name = ${{$n1} < {10} ? {less} : {more}}\n"},
	{"<= equal", "n1 = 10\nsyslog_name = ${{$n1} <= {10} ? {le} : {gt}}\n"},
	{"> numeric", "n1 = 100\nsyslog_name = ${{$n1} > {20} ? {gt} : {le}}\n"},
	{">= false", "n1 = 19\nsyslog_name = ${{$n1} >= {20} ? {ge} : {lt}}\n"},
	{"relational without else", "multi_instance_name = a\nsyslog_name = x${{$multi_instance_name} == {a} ? {y}}\n"},
	{"relational with spaces inside braces", "multi_instance_name = a b\nsyslog_name = ${{$multi_instance_name} == {a b} ? {same} : {diff}}\n"},
	{"relational on compatibility_level", "compatibility_level = 3.6\nsyslog_name = ${{$compatibility_level} < {3.6} ? {old} : {new}}\n"},
	{"relational with undefined name", "syslog_name = ${{$no_such_parameter_xyz} == {} ? {empty} : {full}}\n"},
	// Errors postconf reports: recursion, bad syntax.
	{"direct recursion", "syslog_name = $syslog_name-x\n"},
	{"mutual recursion", "loop_a = $loop_b\nloop_b = $loop_a\nsyslog_name = $loop_a\n"},
	{"unbalanced ${", "syslog_name = ${multi_instance_name\n"},
	{"unknown operator", "syslog_name = ${{a} =~ {b} ? {x} : {y}}\n"},
	// Time values, as postconf prints them (tlsmgr converts them later).
	{"time in seconds", "smtpd_tls_session_cache_timeout = 3600s\n"},
	{"time without unit", "smtp_tls_session_cache_timeout = 7200\n"},
	{"time in hours", "lmtp_tls_session_cache_timeout = 2h\n"},
	{"time in days and weeks", "tls_random_reseed_period = 1d\ntls_random_prng_update_period = 1w\n"},
	{"time from a name", "t1 = 30m\nipc_timeout = $t1\n"},
	{"time zero", "smtpd_tls_session_cache_timeout = 0\n"},
	// Booleans and numbers, as text.
	{"boolean yes/no", "tlsmgr_keep_sessions = yes\nsmtputf8_enable = no\nsmtpd_tls_loglevel = 2\n"},
	{"numbers", "tls_random_bytes = 64\ntls_daemon_random_bytes = 48\nmax_use = 5\n"},
	// A realistic Debian main.cf fragment.
	{"Debian-like", "smtpd_tls_cert_file=/etc/ssl/certs/ssl-cert-snakeoil.pem\n" +
		"smtpd_tls_security_level=may\nsmtp_tls_CApath=/etc/ssl/certs\nsmtp_tls_security_level=may\n" +
		"smtp_tls_session_cache_database = btree:${data_directory}/smtp_scache\n" +
		"smtpd_tls_session_cache_database = btree:${data_directory}/smtpd_scache\n" +
		"myhostname = debian.example\nalias_maps = hash:/etc/aliases\ncompatibility_level = 3.6\n"},
	{"mydomain completes a short myhostname default", "mydomain = example.net\n"},
	{"multi-instance", "multi_instance_name = postfix-out\nqueue_directory = /var/spool/$multi_instance_name\n" +
		"data_directory = /var/lib/$multi_instance_name\n"},
}

func TestMainCFAgreesWithPostconf(t *testing.T) {
	if _, err := exec.LookPath("postconf"); err != nil {
		skipOutsideCI(t, "main.cf fidelity: needs Postfix's postconf as the oracle (.ci/run installs postfix)")
		return
	}
	var names []string // the Postfix parameters tlsmgr reads; ours postconf does not know
	for name := range params {
		if !strings.HasPrefix(name, "tlsmgr_") || name == "tlsmgr_service_name" {
			// A parameter of a later Postfix than the oracle's (Postfix
			// 3.11's default_cache_db_type) is not the oracle's to judge.
			if out, _ := exec.Command("postconf", "-d", name).CombinedOutput(); strings.Contains(string(out), "unknown parameter") {
				t.Logf("%s: this postconf does not know it", name)
				continue
			}
			names = append(names, name)
		}
	}
	sort.Strings(names)
	if len(postconfCorpus) < 60 {
		t.Fatalf("the corpus has %d cases, want at least 60", len(postconfCorpus))
	}
	// postconf takes about 2 s to start here (mostly waiting), so every
	// case asks it at once.
	oracles := make([]map[string]string, len(postconfCorpus))
	dirs := make([]string, len(postconfCorpus))
	var wg sync.WaitGroup
	for i, tc := range postconfCorpus {
		dirs[i] = t.TempDir()
		writeFile(t, dirs[i], "main.cf", tc.mainCF)
		writeFile(t, dirs[i], "master.cf", "") // postconf warns without one
		wg.Add(1)
		go func() {
			defer wg.Done()
			oracles[i] = postconfValues(dirs[i], names)
		}()
	}
	wg.Wait()
	for i, tc := range postconfCorpus {
		t.Run(tc.name, func(t *testing.T) {
			want := oracles[i]
			c := newConfig()
			readErr := c.readMainCF(filepath.Join(dirs[i], "main.cf"), func(string, ...any) {})
			for _, name := range names {
				oracle, ok := want[name]
				var got string
				err := readErr
				if err == nil {
					got, err = c.str(name)
				}
				switch {
				case !ok && err == nil && len(want) == 0 && !strings.Contains(tc.mainCF, name+" ="):
					// postconf -x expands every parameter, so one bad value
					// stops it for all; a daemon, and we, expand only what
					// is used.
				case !ok && err == nil:
					t.Errorf("%s: postconf fails; we expand to %q", name, got)
				case ok && err != nil:
					t.Errorf("%s: postconf prints %q; we fail: %v", name, oracle, err)
				case ok && strings.Join(strings.Fields(got), " ") != oracle:
					// postconf prints a value with each run of whitespace
					// as one space; the daemons get it as written (the
					// "unused parameter" warning shows the indent kept).
					t.Errorf("%s: postconf prints %q; we expand to %q", name, oracle, got)
				}
			}
		})
	}
}

// postconfValues asks postconf -x for every name at once; when that fails
// (a recursion stops postconf), one name at a time. A name that postconf
// cannot expand is missing from the result.
func postconfValues(dir string, names []string) map[string]string {
	values := map[string]string{}
	parse := func(out []byte) {
		for _, line := range strings.Split(strings.TrimSuffix(string(out), "\n"), "\n") {
			if name, value, ok := strings.Cut(line, " = "); ok {
				values[name] = value
			} else if name, ok := strings.CutSuffix(line, " ="); ok {
				values[name] = ""
			}
		}
	}
	out, err := exec.Command("postconf", append([]string{"-c", dir, "-x"}, names...)...).Output()
	if err == nil {
		parse(out)
		return values
	}
	outs := make([][]byte, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if out, err := exec.Command("postconf", "-c", dir, "-x", name).Output(); err == nil {
				outs[i] = out
			}
		}()
	}
	wg.Wait()
	for _, out := range outs {
		parse(out)
	}
	return values
}
