// Logging the way Postfix daemons log: "postfix/tlsmgr[PID]: warning: text"
// to syslog, or as datagrams to postlogd when maillog_file is set, and to
// stderr with -V, in standalone mode, or when no syslog socket exists.
//
// SECURITY: text that came from a client is logged only after every
// non-printable byte is replaced with '?', and cut at 2000 bytes.

package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	gsyslog "github.com/hashicorp/go-syslog"
)

type logger struct {
	mu      sync.Mutex
	tag     string // e.g. postfix/tlsmgr
	syslog  gsyslog.Syslogger
	postlog *net.UnixConn // connected to postlogd's socket before chroot
	host    string        // first label of myhostname, for postlog records
	stderr  bool
	out     io.Writer // where stderr lines go; tests swap it
	verbose int
	limited map[string]*limitedWarning // warnLimited's state, by kind of fault
}

// limitedWarning is one kind of repeated fault: when it was last logged,
// and how many times it happened since.
type limitedWarning struct {
	last       time.Time
	suppressed int
}

// warnInterval is how often warnLimited logs one kind of fault.
const warnInterval = time.Minute

// msg is the process-wide logger (Postfix's msg_info, msg_warn, msg_fatal); it writes to stderr until setup runs.
var msg = &logger{tag: "tlsmgr", stderr: true, out: os.Stderr}

type logSetup struct {
	tag, facility, maillogFile, prefixes, postlogPath, host string
	stderr, noSyslog                                        bool
}

// setup connects the log sinks. It runs before chroot so that the sockets
// are already connected when their paths are out of reach.
func (l *logger) setup(s logSetup) error {
	// Check first: a bad value must still be reported where logs go now.
	if s.maillogFile != "" {
		allowed := false
		for _, p := range strings.FieldsFunc(s.prefixes, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' }) {
			if strings.HasPrefix(s.maillogFile, p) {
				allowed = true
			}
		}
		if !allowed {
			return fmt.Errorf("parameter maillog_file: value %q does not match any prefix in maillog_file_prefixes = %s", s.maillogFile, s.prefixes)
		}
	} else if !s.noSyslog && !syslogFacilities[strings.ToLower(s.facility)] {
		return fmt.Errorf("parameter syslog_facility: unknown syslog facility: %s (allowed: auth, authpriv, cron, daemon, ftp, kern, lpr, mail, news, syslog, user, uucp, local0 to local7)", s.facility)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closeSinks()
	l.tag = s.tag
	l.stderr = s.stderr
	l.host = s.host
	switch {
	case s.maillogFile != "":
		conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: s.postlogPath, Net: "unixgram"})
		if err != nil {
			// Like Postfix's maillog client: fall back to stderr and say so.
			l.stderr = true
			fmt.Fprintf(l.out, "%s[%d]: warning: connect to postlog service %s: %v\n", l.tag, os.Getpid(), s.postlogPath, err)
			return nil
		}
		l.postlog = conn
	case !s.noSyslog:
		sl, err := gsyslog.NewLogger(gsyslog.LOG_INFO, strings.ToUpper(s.facility), s.tag)
		if err != nil {
			// No /dev/log (containers, CI): stderr is the only place left.
			l.stderr = true
			return nil
		}
		l.syslog = sl
	}
	return nil
}

// closeSinks lets setup run again when a later configuration layer (the
// TOML file, -o) changes a logging parameter.
func (l *logger) closeSinks() {
	if l.postlog != nil {
		l.postlog.Close()
		l.postlog = nil
	}
	if l.syslog != nil {
		l.syslog.Close()
		l.syslog = nil
	}
}

// syslogFacilities are the names go-syslog knows, as Postfix accepts them.
var syslogFacilities = map[string]bool{
	"kern": true, "user": true, "mail": true, "daemon": true, "auth": true, "syslog": true, "lpr": true,
	"news": true, "uucp": true, "cron": true, "authpriv": true, "ftp": true, "local0": true, "local1": true,
	"local2": true, "local3": true, "local4": true, "local5": true, "local6": true, "local7": true,
}

func (l *logger) emit(prio gsyslog.Priority, prefix, format string, args ...any) {
	text := prefix + sanitize(fmt.Sprintf(format, args...))
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.postlog != nil {
		rec := fmt.Sprintf("%s %s %s[%d]: %s", time.Now().Format("Jan 02 15:04:05"), l.host, l.tag, os.Getpid(), text)
		l.postlog.Write([]byte(rec))
	}
	if l.syslog != nil {
		l.syslog.WriteLevel(prio, []byte(text))
	}
	if l.stderr {
		fmt.Fprintf(l.out, "%s[%d]: %s\n", l.tag, os.Getpid(), text)
	}
}

// sanitize makes client-supplied text safe for a log line, as Postfix does.
func sanitize(s string) string {
	if len(s) > 2000 {
		s = s[:2000]
	}
	b := []byte(s)
	for i, c := range b {
		if c < 0x20 || c >= 0x7f {
			b[i] = '?'
		}
	}
	return string(b)
}

// escapeText makes text from a file, a peer or a server safe to print on
// a terminal, and says what it was: a backslash is doubled, and every
// byte of a control character (C0, DEL, C1), of a Unicode bidirectional
// control, or of invalid UTF-8 becomes \xHH. Anything else is unchanged.
func escapeText(s string) string { return escapeWith(s, `\x%02x`, true) }

// escapeDN is escapeText for a distinguished name that is already in RFC
// 4514 form (which escapes backslashes itself): a control byte becomes
// RFC 4514's \HH.
func escapeDN(s string) string { return escapeWith(s, `\%02x`, false) }

func escapeWith(s, hexForm string, backslash bool) string {
	if isPlainText(s) && (!backslash || !strings.Contains(s, `\`)) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == '\\' && backslash:
			b.WriteString(`\\`)
		case unsafeRune(r, size):
			for _, c := range []byte(s[i : i+size]) {
				fmt.Fprintf(&b, hexForm, c)
			}
		default:
			b.WriteString(s[i : i+size])
		}
		i += size
	}
	return b.String()
}

func isPlainText(s string) bool {
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		if unsafeRune(r, size) {
			return false
		}
		i += size
	}
	return true
}

// unsafeRune reports a rune that a terminal acts on, or invalid UTF-8.
func unsafeRune(r rune, size int) bool {
	switch {
	case r == utf8.RuneError && size <= 1:
		return true
	case r < 0x20 || r >= 0x7f && r <= 0x9f:
		return true
	case r >= 0x202a && r <= 0x202e, r >= 0x2066 && r <= 0x2069, r == 0x200e, r == 0x200f, r == 0x061c:
		return true
	}
	return false
}

func (l *logger) info(format string, args ...any) { l.emit(gsyslog.LOG_INFO, "", format, args...) }
func (l *logger) warn(format string, args ...any) {
	l.emit(gsyslog.LOG_WARNING, "warning: ", format, args...)
}

// warnLimited logs a warning about a fault that can repeat at request rate
// (a full disk, a failing entropy source, connection pressure) at most
// once a minute per kind, and says how many were left out in between.
func (l *logger) warnLimited(kind, format string, args ...any) {
	now := time.Now()
	l.mu.Lock()
	if l.limited == nil {
		l.limited = map[string]*limitedWarning{}
	}
	w := l.limited[kind]
	if w != nil && now.Sub(w.last) < warnInterval {
		w.suppressed++
		l.mu.Unlock()
		return
	}
	left := 0
	if w != nil {
		left = w.suppressed
	}
	l.limited[kind] = &limitedWarning{last: now}
	l.mu.Unlock()
	text := fmt.Sprintf(format, args...)
	if left > 0 {
		text += fmt.Sprintf(" (%d more like this since the last warning)", left)
	}
	l.emit(gsyslog.LOG_WARNING, "warning: ", "%s", text)
}

// debug logs only with -v, like Postfix's msg_verbose lines.
func (l *logger) debug(format string, args ...any) {
	if l.verbose > 0 {
		l.info(format, args...)
	}
}

// logPanic, deferred first in every goroutine of ours, logs a panic as a
// fatal error, so that it reaches the mail log (under master(8) stderr
// goes nowhere), with the frames that led to it, and exits 1.
func logPanic() {
	r := recover()
	if r == nil {
		return
	}
	var frames []string
	pcs := make([]uintptr, 16)
	it := runtime.CallersFrames(pcs[:runtime.Callers(3, pcs)])
	for f, more := it.Next(); ; f, more = it.Next() {
		frames = append(frames, fmt.Sprintf("%s:%d", filepath.Base(f.File), f.Line))
		if !more {
			break
		}
	}
	msg.fatal("panic: %v (at %s)", r, strings.Join(frames, " < "))
}

// fatal logs and exits 1; master(8) then logs the exit status and, if no
// request was ever served, throttles the service.
func (l *logger) fatal(format string, args ...any) {
	l.emit(gsyslog.LOG_CRIT, "fatal: ", format, args...)
	os.Exit(1)
}
