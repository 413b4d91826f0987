// Command tlsmgr is a drop-in replacement for Postfix's tlsmgr(8): it gives
// smtpd, smtp, lmtp and tlsproxy PRNG seeds, TLS session caches (kept in
// SQLite) and session-ticket keys over Postfix's private/tlsmgr socket.
package main

import (
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

const usage = `tlsmgr: Postfix's TLS session cache and PRNG manager, with SQLite caches.

Run it by hand, without Postfix, on a local socket and database:

	$ tlsmgr -listen ./tlsmgr.sock
	  serves ./tlsmgr.sock; caches and PRNG file in ./tlsmgr-data

	$ tlsmgr -query seed 32
	  asks ./tlsmgr.sock for 32 random bytes (also: policy smtpd,
	  lookup smtp ID, update smtp ID TEXT, delete smtp ID, tktkey [HEXNAME])

Under Postfix, master(8) runs it from master.cf: Debian's stock line with
only the command changed to the name it is installed under (make install,
or the .deb, put it in daemon_directory as tlsmgr-sqlite):

	tlsmgr    unix  -       -       y       1000?   1       tlsmgr-sqlite

See what it reads: tlsmgr -n (set, and where), tlsmgr -d (defaults),
tlsmgr -version; man tlsmgr-sqlite.

Flags of the standalone and query modes:
`

// cacheLabels are Postfix's three caches, in the order tlsmgr opens them.
var cacheLabels = []string{"smtpd", "smtp", "lmtp"}

// version is the release; packagers may set it, and commit, with
// -ldflags "-X main.version=... -X main.commit=...".
var version, commit = "0.9.0", ""

func main() {
	defer logPanic()
	noCoreDumps()
	args := os.Args[1:]
	if len(args) > 0 && (args[0] == "-n" || args[0] == "-d") && (len(args) == 1 || strings.HasPrefix(args[1], "-")) {
		// Not master's -n SERVICE: master always gives it a name.
		os.Exit(runShowConfig(args[0] == "-d", args[1:]))
	}
	if len(args) > 0 && isStandaloneFlag(args[0]) {
		runStandalone(args)
		return
	}
	runUnderMaster(args)
}

// isStandaloneFlag tells our long flags from Postfix's one-letter options.
func isStandaloneFlag(a string) bool {
	switch strings.TrimLeft(a, "-") {
	case "listen", "query", "stats", "version", "config", "data", "socket", "help", "h", "mailconfig", "repeat", "raw", "user":
		return strings.HasPrefix(a, "-")
	}
	return strings.HasPrefix(a, "--")
}

// runUnderMaster is the daemon as master(8) starts it, in Postfix's order:
// logging, main.cf, options, pre-init, chroot and setuid, serve.
func runUnderMaster(args []string) {
	signal.Ignore(syscall.SIGPIPE, syscall.SIGXFSZ)
	processName := filepath.Base(os.Args[0])

	// 1. Logging first: under master stderr goes nowhere, so until main.cf
	// says where the mail log is, messages go to syslog with Postfix's
	// default tag. Option errors wait until the mail log is known.
	msg.setup(logSetup{tag: defaultLogTag(processName), facility: "mail"})
	opts, optErr := parseDaemonArgs(args)
	if os.Getenv("MAIL_VERBOSE") != "" {
		opts.verbose++
	}
	msg.verbose = opts.verbose

	// 2. main.cf, and logging as it says (syslog, or postlogd for maillog_file).
	cfg := newConfig()
	if err := cfg.readMainCF(mainCFPath(""), msg.warn); err != nil {
		msg.fatal("%v", err)
	}
	configDir := filepath.Dir(cfg.file)
	serviceName := processName
	if opts.serviceName != "" {
		serviceName = opts.serviceName
	}
	cfg.always = map[string]string{"process_name": processName, "process_id": strconv.Itoa(os.Getpid()),
		"service_name": serviceName, "config_directory": configDir}
	logs := setupLogging(cfg, processName, opts.stderr, false, logSetup{})
	msg.debug("%s", versionString())

	// 3. Everything that can be wrong from here on lands in the mail log:
	// options, tlsmgr.toml, -o, then every value (main.cf < TOML < -o).
	if optErr != nil {
		msg.fatal("%v", optErr)
	}
	toml := filepath.Join(configDir, "tlsmgr.toml")
	if !fileExists(toml) {
		toml = ""
	}
	if err := cfg.applyOverlays(toml, opts.overrides); err != nil {
		msg.fatal("%v", err)
	}
	setupLogging(cfg, processName, opts.stderr, false, logs) // a TOML or -o logging parameter
	if !opts.debugMode && !opts.stdinStream && isTerminal(0) {
		msg.fatal("do not run this command by hand (to try it without Postfix: tlsmgr -listen ./tlsmgr.sock)")
	}
	if err := cfg.validate(); err != nil {
		msg.fatal("%v", err)
	}
	if !opts.solitary && !opts.stdinStream {
		msg.fatal("service %s requires a process limit of 1", serviceName)
	}
	if opts.debugger {
		runDebugger(cfg)
	}
	queueDir := cfg.mustStr("queue_directory")
	if err := os.Chdir(queueDir); err != nil {
		msg.fatal("chdir(\"%s\"): %s", queueDir, errText(err))
	}

	// Nothing from here on may hang start-up: the watchdog covers it.
	startup := startupWatchdog(cfg)

	// 4. Pre-init, as root: the entropy source, then, as mail_owner, every
	// file in data_directory, opened and not read.
	var owner *mailOwner
	if opts.dropPrivs || anyRoot() {
		var err error
		if owner, err = lookupMailOwner(cfg.mustStr("mail_owner")); err != nil {
			msg.fatal("%s/main.cf: %v", configDir, err)
		}
	}
	d := preJailInit(cfg, owner, false)
	var lns []net.Listener
	if !opts.stdinStream {
		var err error
		if lns, err = masterListeners(opts.transport, opts.listenFds); err != nil {
			msg.fatal("%v", err)
		}
	}

	// 5. chroot(queue_directory) and drop to mail_owner: real, effective
	// and saved uid. Without -u (master.cf's unprivileged = n) Postfix's
	// tlsmgr keeps root; ours never needs it after pre-init, and reads
	// nothing as root, so it drops all the same.
	dropTo := owner
	if !anyRoot() {
		dropTo = nil // nothing to drop (tests, -S by hand)
	} else if !opts.dropPrivs {
		msg.warn("master.cf runs %s with unprivileged = n; it drops to mail_owner %s anyway, as it never needs root after start-up", serviceName, owner.name)
	}
	if err := enterJail(queueDir, opts.chroot, dropTo); err != nil {
		msg.fatal("%v", err)
	}
	d.chrooted = opts.chroot

	// 6. Post-init, as mail_owner: the database, kept keys, reseed,
	// exchange file, cache cleanup; then serve.
	d.postJailInit()
	d.srv.streamName = serviceName + " socket"
	if len(opts.strayArgs) > 0 {
		d.srv.strayArg = opts.strayArgs[0]
	}
	if opts.stdinStream {
		d.srv.serveConn(stdio{}, nil, false)
		d.shutdown(0)
	}
	generation, err := generationFromEnv()
	if err != nil {
		msg.fatal("%v", err)
	}
	status := &masterStatus{file: os.NewFile(masterStatusFd, "master status"), generation: generation,
		onLost: func() { d.shutdown(0) }}
	syscall.CloseOnExec(3)
	syscall.CloseOnExec(4)
	d.srv.busy, d.srv.idle = status.busy, status.idle
	go status.watchMaster()
	startup.Stop()
	go watchdog(time.Duration(cfg.mustNum("daemon_timeout"))*time.Second, d.healthCheck)
	d.exitOnSignals()
	for _, ln := range lns[1:] {
		go func() {
			defer logPanic()
			d.srv.serveListener(ln)
		}()
	}
	d.srv.serveListener(lns[0])
	select {} // the listener is closed only by an orderly exit, which ends the process
}

// runStandalone runs without Postfix: no master, no chroot, stderr logging,
// its own socket, and all three caches on with data in a local directory.
func runStandalone(args []string) {
	fs := flag.NewFlagSet("tlsmgr", flag.ExitOnError)
	listen := fs.String("listen", "", "serve the tlsmgr protocol on this UNIX `socket`")
	query := fs.Bool("query", false, "send one request to -socket and print the reply: REQUEST ARGS...")
	stats := fs.Bool("stats", false, "print the statistics and cache sizes: the running tlsmgr's, asked on its socket, or else those kept in the session database; then exit")
	format := fs.String("format", "table", "with -stats: table, openmetrics (node_exporter's textfile collector reads it) or json")
	socket := fs.String("socket", "./tlsmgr.sock", "the `socket` that -query talks to")
	tomlFile := fs.String("config", "", "TOML `file` with parameters (see tlsmgr.toml.example)")
	dataDir := fs.String("data", "./tlsmgr-data", "`directory` for the session database and the PRNG exchange file")
	mailConfig := fs.String("mailconfig", "", "also read main.cf from this Postfix config `directory`")
	repeat := fs.Int("repeat", 1, "with -query: send the request this many `times` on one connection")
	raw := fs.Bool("raw", false, "with -query: write the decoded payload bytes to stdout instead of text")
	verbose := fs.Bool("v", false, "verbose logging")
	showVersion := fs.Bool("version", false, "print the version, commit and Go version, and exit")
	userName := fs.String("user", "", "started as root, run (and -query, -stats) as this `user` (default: mail_owner, postfix); never as root")
	overrides := overrideFlag(fs)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	fs.Parse(args)
	if *showVersion {
		fmt.Println(versionString())
		os.Exit(0)
	}
	if *query {
		// As root, the replies of a server that mail_owner may run are
		// read as mail_owner (or -user), never as root.
		if anyRoot() {
			cfg := newConfig()
			if *mailConfig != "" {
				if err := cfg.readMainCF(mainCFPath(*mailConfig), msg.warn); err != nil {
					msg.fatal("%v", err)
				}
			}
			if err := enterJail("", false, standaloneOwner(cfg, *userName)); err != nil {
				msg.fatal("%v", err)
			}
		}
		if *raw && isTerminal(1) {
			fmt.Fprintln(os.Stderr, "tlsmgr: ERROR: -raw writes the binary payloads (seeds, sessions, keys): send it to a file or a pipe, not a terminal")
			os.Exit(2)
		}
		os.Exit(runQuery(*socket, fs.Args(), *repeat, *raw))
	}
	if *stats {
		write, ok := statsFormats[*format]
		if !ok {
			fmt.Fprintf(os.Stderr, "tlsmgr: ERROR: -format %s: use table, openmetrics or json\n", escapeText(*format))
			os.Exit(2)
		}
		dataSet, socketSet := false, false
		fs.Visit(func(f *flag.Flag) {
			dataSet = dataSet || f.Name == "data"
			socketSet = socketSet || f.Name == "socket"
		})
		cfg := standaloneConfig(*dataDir, *mailConfig, *tomlFile, *overrides, dataSet || *mailConfig == "")
		sock := *socket
		if *mailConfig != "" && !socketSet { // Postfix's: master(8) starts a tlsmgr on it if none runs
			sock = filepath.Join(cfg.mustStr("queue_directory"), "private", cfg.mustStr("tlsmgr_service_name"))
		}
		os.Exit(runStats(cfg.mustStr("tlsmgr_database"), sock, standaloneOwner(cfg, *userName), write))
	}
	if *listen == "" {
		fmt.Fprintln(os.Stderr, "tlsmgr: ERROR: give -listen SOCKET to serve, -query to ask a running tlsmgr, or -stats")
		os.Exit(2)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "tlsmgr: ERROR: unexpected argument %q\n", fs.Arg(0))
		os.Exit(2)
	}
	signal.Ignore(syscall.SIGPIPE, syscall.SIGXFSZ)
	if *verbose {
		msg.verbose = 1
	}

	cfg := standaloneConfig(*dataDir, *mailConfig, *tomlFile, *overrides, true)
	startup := startupWatchdog(cfg)
	owner := standaloneOwner(cfg, *userName)
	makeDataDir(cfg.mustStr("data_directory"), owner)
	d := preJailInit(cfg, owner, true)
	var inUse *errDatabaseInUse
	if errors.As(d.storeErr, &inUse) { // a second tlsmgr on one database: stop before touching anything
		if err := enterJail("", false, owner); err != nil {
			msg.fatal("%v", err)
		}
		inUse.readHolder()
		msg.fatal("%v; not starting", inUse)
	}
	// The socket is made before the drop, as master(8) makes its own, and
	// as the user tlsmgr runs as: its clients are that user's (and root).
	var ln net.Listener
	err := asMailOwner(owner, func() (err error) {
		ln, err = listenUnix(*listen)
		return err
	})
	if err != nil && owner != nil {
		msg.fatal("%v (started as root, tlsmgr makes its socket as %s, who must be able to write to %s)", err, owner.name, filepath.Dir(*listen))
	} else if err != nil {
		msg.fatal("%v", err)
	}
	d.socketPath = *listen
	if err := enterJail("", false, owner); err != nil {
		msg.fatal("%v", err)
	}
	d.postJailInit()
	startup.Stop()
	d.srv.streamName = "tlsmgr socket"
	msg.info("serving %s; session database %s; stop with Ctrl-C", *listen, d.store.path)
	d.exitOnSignals()
	d.srv.serveListener(ln)
	select {} // as under master: only an orderly exit closes the listener
}

// standaloneConfig is the configuration of -listen and -stats: our own
// data directory (useData) and cache names unless main.cf (-mailconfig)
// says otherwise, then tlsmgr.toml, then -o. Logging goes to stderr.
func standaloneConfig(dataDir, mailConfig, tomlFile string, overrides []string, useData bool) *config {
	data, err := filepath.Abs(dataDir)
	if err != nil {
		msg.fatal("data directory %s: %v", dataDir, err)
	}
	cfg := newConfig()
	cfg.builtin = map[string]string{
		"smtpd_tls_session_cache_database": "btree:${data_directory}/smtpd_scache",
		"smtp_tls_session_cache_database":  "btree:${data_directory}/smtp_scache",
		"lmtp_tls_session_cache_database":  "btree:${data_directory}/lmtp_scache",
	}
	if useData {
		cfg.builtin["data_directory"] = data
		cfg.builtin["queue_directory"] = data
	}
	if mailConfig != "" {
		if err := cfg.readMainCF(mainCFPath(mailConfig), msg.warn); err != nil {
			msg.fatal("%v", err)
		}
	}
	cfg.always = map[string]string{"process_name": "tlsmgr", "process_id": strconv.Itoa(os.Getpid()),
		"service_name": "tlsmgr", "config_directory": mailConfig}
	if err := cfg.applyOverlays(tomlFile, overrides); err != nil {
		msg.fatal("%v", err)
	}
	setupLogging(cfg, "tlsmgr", true, true, logSetup{})
	if err := cfg.validate(); err != nil {
		msg.fatal("%v", err)
	}
	msg.debug("%s", versionString())
	return cfg
}

// overrideFlag is -o name=value, repeatable, as in master.cf.
func overrideFlag(fs *flag.FlagSet) *[]string {
	var overrides []string
	fs.Func("o", "override a parameter: -o `name=value` (repeatable)", func(v string) error {
		overrides = append(overrides, v)
		return nil
	})
	return &overrides
}

// versionString is what -version prints and -v logs at start.
func versionString() string {
	rev, goVersion, dirty := commit, runtime.Version(), ""
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, s := range info.Settings {
			switch {
			case s.Key == "vcs.revision" && rev == "":
				rev = s.Value
			case s.Key == "vcs.modified" && s.Value == "true" && commit == "":
				dirty = "+modified"
			}
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev == "" {
		rev = "unknown"
	}
	return fmt.Sprintf("tlsmgr %s (commit %s%s, %s, %s/%s)", version, rev, dirty, goVersion, runtime.GOOS, runtime.GOARCH)
}

// runShowConfig is tlsmgr -n and tlsmgr -d: like postconf -n and -d, for
// the parameters tlsmgr reads, from main.cf in -mailconfig (default
// $MAIL_CONFIG or /etc/postfix), tlsmgr.toml beside it, and -o.
func runShowConfig(defaults bool, args []string) int {
	name := map[bool]string{true: "-d", false: "-n"}[defaults]
	fs := flag.NewFlagSet("tlsmgr "+name, flag.ExitOnError)
	dir := os.Getenv("MAIL_CONFIG")
	if dir == "" {
		dir = "/etc/postfix"
	}
	mailConfig := fs.String("mailconfig", dir, "Postfix config `directory` whose main.cf and tlsmgr.toml to read")
	tomlFile := fs.String("config", "", "TOML `file` (default: tlsmgr.toml in -mailconfig, when it exists)")
	overrides := overrideFlag(fs)
	fs.Parse(args)
	if defaults {
		printDefaults(os.Stdout)
		return 0
	}
	cfg := newConfig()
	if err := cfg.readMainCF(mainCFPath(*mailConfig), msg.warn); err != nil {
		msg.fatal("%v", err)
	}
	if *tomlFile == "" {
		if t := filepath.Join(*mailConfig, "tlsmgr.toml"); fileExists(t) {
			*tomlFile = t
		}
	}
	if err := cfg.applyOverlays(*tomlFile, *overrides); err != nil {
		msg.fatal("%v", err)
	}
	if err := cfg.validate(); err != nil {
		msg.fatal("%v", err)
	}
	cfg.printNonDefault(os.Stdout)
	return 0
}

// runStats is tlsmgr -stats: it reads the database read-only, while the
// daemon runs or after it. Started as root, it first becomes owner
// (-user, or mail_owner) for good, as the daemon does: the file is
// mail_owner's, and root reads nothing of it. It opens the file as
// untrusted (store.go), refuses a file whose schema is not exactly ours,
// reads our tables and none of the file's views, and prints no byte of
// the file's text as it is (readStatsDB).
func runStats(path, socket string, owner *mailOwner, write func(io.Writer, *statsSnapshot) error) int {
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "tlsmgr: ERROR: session cache database %s: "+format+"\n", append([]any{escapeText(path)}, args...)...)
		return 1
	}
	if owner != nil {
		if err := enterJail("", false, owner); err != nil {
			return fail("%v", err)
		}
	}
	if snap, err := askDaemonStats(socket); err == nil {
		if err := write(os.Stdout, snap); err != nil {
			return fail("%v", err)
		}
		return 0
	}
	f, err := openStatsFile(path)
	if err != nil {
		return fail("%s (read it as its owner, mail_owner, or as root; -mailconfig /etc/postfix finds Postfix's)", escapeText(errText(err)))
	}
	defer f.Close()
	db, _ := openPool(path, 1, true)
	defer db.Close()
	// The version before's schema has every table and column -stats reads.
	if _, why := keptSchemaProblem(context.Background(), db); why != "" {
		return fail("%s: not a database of this tlsmgr", why)
	}
	snap, err := readStatsDB(db)
	if err != nil {
		return fail("%s", escapeText(err.Error()))
	}
	if err := write(os.Stdout, snap); err != nil {
		return fail("%v", err)
	}
	return 0
}

// openStatsFile checks, by a descriptor opened without following a link,
// that path is a regular file we may read.
func openStatsFile(path string) (*os.File, error) {
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), path)
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, err
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		f.Close()
		return nil, errors.New("not a regular file")
	}
	return f, nil
}

// standaloneOwner is whom a standalone tlsmgr started as root becomes,
// after pre-init as under master: -user NAME, or else mail_owner. It
// never serves, nor reads a database, as root. Not root: nil, itself.
func standaloneOwner(cfg *config, name string) *mailOwner {
	if !anyRoot() {
		return nil
	}
	param := "-user"
	if name == "" {
		name, param = cfg.mustStr("mail_owner"), "mail_owner"
	}
	owner, err := lookupUser(param, name)
	if err != nil {
		msg.fatal("%v; started as root, tlsmgr runs as -user NAME (default: mail_owner), never as root", err)
	}
	return owner
}

// makeDataDir makes sure the standalone data directory exists, belongs to
// whom the daemon will run as, and is within that user's reach. Started as
// root, it makes a missing one for that user (makeOwnersDirectory); one of
// anyone else stops start-up.
func makeDataDir(dir string, owner *mailOwner) {
	if owner == nil {
		if err := os.MkdirAll(dir, 0700); err != nil {
			msg.fatal("cannot create data directory %s: %s", dir, errText(err))
		}
		return
	}
	var st syscall.Stat_t
	switch err := syscall.Stat(dir, &st); {
	case err == syscall.ENOENT:
		if err := makeOwnersDirectory(dir, owner); err != nil {
			msg.fatal("cannot create data directory %s: %s", dir, errText(err))
		}
	case err != nil:
		msg.fatal("data directory %s: %s", dir, errText(err))
	case int(st.Uid) != owner.uid:
		msg.fatal("data directory %s belongs to uid %d, not to %s (uid %d), whom tlsmgr started as root runs as: give it to %s, or choose another -user or -data",
			dir, st.Uid, owner.name, owner.uid, owner.name)
	}
	err := asMailOwner(owner, func() error {
		fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
		if err == nil {
			syscall.Close(fd)
		}
		return err
	})
	if err != nil {
		msg.fatal("data directory %s is out of reach of %s (%s): a directory on the way is closed to it; choose a -data that %s can reach", dir, owner.name, errText(err), owner.name)
	}
}

// makeOwnersDirectory makes dir, as root, for owner, so that nobody else
// chooses where it goes: in a directory of owner's, it is made as owner;
// otherwise every directory on the way must be root's alone (a real
// directory, not a link, that nobody else may write to), and it is made as
// root and given to owner through its descriptor.
func makeOwnersDirectory(dir string, owner *mailOwner) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	var st syscall.Stat_t
	parent := filepath.Dir(dir)
	if err := syscall.Lstat(parent, &st); err != nil {
		return err
	}
	if st.Mode&syscall.S_IFMT == syscall.S_IFDIR && int(st.Uid) == owner.uid {
		return asMailOwner(owner, func() error { return syscall.Mkdir(dir, 0o700) })
	}
	for p := parent; ; p = filepath.Dir(p) {
		if err := syscall.Lstat(p, &st); err != nil {
			return err
		}
		if st.Mode&syscall.S_IFMT != syscall.S_IFDIR || st.Uid != 0 || st.Mode&0o022 != 0 {
			return fmt.Errorf("%s is not a directory of root's that only root may write to; make the data directory yourself and give it to %s", p, owner.name)
		}
		if p == "/" {
			return giveNewDirectory(dir, owner)
		}
	}
}

// defaultLogTag is the tag before main.cf is read: $MAIL_LOGTAG, or
// Postfix's default syslog_name, then the process name.
func defaultLogTag(processName string) string {
	tag := os.Getenv("MAIL_LOGTAG")
	if tag == "" {
		tag = "postfix"
	}
	return tag + "/" + processName
}

// setupLogging connects the log sinks of postfix-tlsmgr.md §8 as the
// configuration says, unless they are already as it says (was). A bad
// value is fatal, reported where logs go so far.
func setupLogging(cfg *config, processName string, toStderr, standalone bool, was logSetup) logSetup {
	want := logSetupFor(cfg, processName, toStderr, standalone)
	if want == was {
		return was
	}
	if err := msg.setup(want); err != nil {
		msg.fatal("%v", err)
	}
	return want
}

// logSetupFor reads the logging parameters. master(8) passes the full
// host name in $POSTLOG_HOSTNAME; Postfix logs only its first label.
func logSetupFor(cfg *config, processName string, toStderr, standalone bool) logSetup {
	tag := os.Getenv("MAIL_LOGTAG")
	if tag == "" {
		tag = cfg.mustStrOr("syslog_name", "postfix")
	}
	host := os.Getenv("POSTLOG_HOSTNAME")
	if host == "" {
		host = cfg.mustStrOr("myhostname", "localhost")
	}
	host, _, _ = strings.Cut(host, ".")
	postlog := os.Getenv("POSTLOG_SERVICE")
	if postlog == "" {
		postlog = cfg.mustStrOr("queue_directory", "") + "/public/" + cfg.mustStrOr("postlog_service_name", "postlog")
	}
	maillog := ""
	if !standalone {
		maillog = cfg.mustStrOr("maillog_file", "")
	}
	return logSetup{
		tag: tag + "/" + processName, facility: cfg.mustStrOr("syslog_facility", "mail"),
		maillogFile: maillog, prefixes: cfg.mustStrOr("maillog_file_prefixes", ""),
		postlogPath: postlog, host: host, stderr: toStderr, noSyslog: standalone,
	}
}

// mustStrOr is str for logging set-up, which runs before validation and
// must not fail on a bad value that validation will report properly.
func (c *config) mustStrOr(name, fallback string) string {
	v, err := c.str(name)
	if err != nil {
		return fallback
	}
	return v
}

// daemon is everything the running process owns.
type daemon struct {
	cfg      *config
	owner    *mailOwner // whom files are opened as; nil when we are not root
	store    *store
	pool     *pool
	source   *entropySource
	exchange *exchangeFile // nil when tls_random_exchange_name is empty or unusable
	srv      *server
	keeper   atomic.Pointer[keyKeeper] // writes the ticket keys to the database; nil unless kept
	// sharedCfg is the shared store's set-up from pre-init (nil: no
	// sharing); shared is the running store, from post-init.
	sharedCfg *sharedConfig
	shared    *sharedStore
	// keysUnreadable: the kept keys could not be read; set by openStore.
	keysUnreadable bool
	storeErr       error // why pre-init could not open the database files
	// openStore runs beside serving; shutdown stops it and waits for it.
	stopOpening context.CancelFunc
	storeOpened chan struct{}
	chrooted    bool           // paths outside queue_directory no longer resolve
	socketPath  string         // standalone mode removes its socket on exit
	stopSweep   chan struct{}  // closed on exit: the sweepers stop
	sweepers    sync.WaitGroup // ... and exit waits for them before closing the store
	exitOnce    sync.Once
}

// Bounds of an orderly exit. master(8) starts our successor while we exit
// (postfix reload), and the successor waits for our database lock for
// longer than we can take to let it go.
const (
	drainLimit     = 2 * time.Second // requests in flight take microseconds
	exitLimit      = 3 * time.Second // a stuck lock must not keep us alive
	masterLockWait = 5 * time.Second
)

// preJailInit is Postfix's pre-jail initialization (tlsmgr_pre_init): it
// runs as root, before chroot and before privileges are dropped, and does
// only what needs root or a path outside the jail. It instantiates the
// pool from the kernel, opens the entropy source as root, and, with
// mail_owner's effective uid and gid, takes the database lock and opens
// the session database files and the exchange file. It reads nothing that
// mail_owner could have written: their content waits for postJailInit.
// Only a configuration error stops us here; a file that cannot be used
// costs only what it holds.
func preJailInit(cfg *config, owner *mailOwner, standalone bool) *daemon {
	d := &daemon{cfg: cfg, owner: owner, stopSweep: make(chan struct{})}
	var err error
	if d.pool, err = newPool(); err != nil {
		msg.fatal("%v", err)
	}
	d.source = openEntropySource(cfg.mustStr("tls_random_source"), int(cfg.mustNum("tls_random_bytes")))
	d.sharedCfg = prepareShared(cfg) // the secret and any file the connection string names, as root
	var caches []cacheConfig
	for _, label := range cacheLabels {
		database := cfg.mustStr(label + "_tls_session_cache_database")
		if database != "" && !strings.Contains(database, ":") {
			database = cfg.mustStr("default_database_type") + ":" + database
		}
		caches = append(caches, cacheConfig{
			label:      label,
			database:   database,
			timeout:    cfg.mustNum(label + "_tls_session_cache_timeout"),
			loglevel:   cfg.mustStr(label + "_tls_loglevel"),
			entryLimit: cfg.mustNum("tlsmgr_" + label + "_session_cache_entry_limit"),
			sizeLimit:  cfg.mustNum("tlsmgr_" + label + "_session_cache_size_limit"),
		})
	}
	d.store, err = newStore(caches, storeOptions{
		sweepBatch:   int(cfg.mustNum("tlsmgr_sweep_batch_size")),
		keepSessions: cfg.mustBool("tlsmgr_keep_sessions"),
		keepKeys:     cfg.mustBool("tlsmgr_keep_ticket_keys"),
	})
	if err != nil {
		msg.fatal("%v", err)
	}

	uid, redirectUID := fileOwnerUID(owner), -1
	if owner != nil {
		redirectUID = owner.uid
	}
	lockWait := masterLockWait
	if standalone {
		lockWait = 0
	}
	dataDir := cfg.mustStr("data_directory")
	err = asMailOwner(owner, func() error {
		// The database first: a second tlsmgr must stop before it touches anything.
		path := dataRedirect("table", cfg.mustStr("tlsmgr_database"), dataDir, redirectUID)
		d.storeErr = d.store.openFiles(path, uid, lockWait)
		var inUse *errDatabaseInUse
		if standalone && errors.As(d.storeErr, &inUse) {
			return nil // a second standalone tlsmgr stops, and touches nothing
		}
		if name := cfg.mustStr("tls_random_exchange_name"); name != "" {
			name = dataRedirect("file", name, dataDir, redirectUID)
			if d.exchange, err = openExchangeFile(name, uid, d.pool); err != nil {
				msg.warn("%v; running without it", err)
			}
		}
		return nil
	})
	if err != nil {
		msg.fatal("%v", err)
	}
	d.srv = &server{
		store:      d.store,
		pool:       d.pool,
		keys:       newTicketKeys(d.store.caches["smtpd"].timeout, d.pool),
		ipcTimeout: time.Duration(cfg.mustNum("ipc_timeout")) * time.Second,
		maxConns:   int(cfg.mustNum("tlsmgr_max_connections")),
	}
	return d
}

// postJailInit is Postfix's post-jail initialization (tlsmgr_post_init):
// it runs after chroot and after every uid was dropped to mail_owner (it
// refuses to run otherwise), and everything that reads what mail_owner
// could have written happens here: the session database (checked, then
// continued or started again), the kept ticket keys, the exchange file.
// Then, as in Postfix: reseed, exchange update, cache cleanup timers.
func (d *daemon) postJailInit() {
	mustHaveDropped()
	pinsOnly() // SQLite opens the descriptors of pre-init, and no name at all
	if err := d.storeErr; err != nil {
		var inUse *errDatabaseInUse
		if errors.As(err, &inUse) {
			inUse.readHolder() // not before: the lock file is mail_owner's
		}
		msg.warn("%v; session caching is off in this process", err)
		d.store.offline()
	}
	// The database is checked and opened beside serving: seeds and ticket
	// keys never wait for it, even when it is large, or held by another
	// process. Until it is open, lookups miss and updates are not stored.
	var ctx context.Context
	ctx, d.stopOpening = context.WithCancel(context.Background())
	d.storeOpened = make(chan struct{})
	d.store.openBy = time.Now().Add(openWait)
	d.startShared()
	if keys := d.srv.keys; d.store.keepKeys && d.shared == nil && d.store.files[0] != nil && !keys.disabled() {
		keys.awaitRestore(d.store.openBy)
		d.store.keptKeys = func(kept []ticketKey, err error) {
			if err != nil {
				msg.warn("session cache database %s: cannot read the kept session ticket keys: %v; making new ones", d.store.path, err)
				d.keysUnreadable = true
			}
			keys.restore(kept)
			keys.restoreDone()
		}
	}
	go d.openStore(ctx)

	d.reseedKernel() // then tls_random_source, beside serving: it may take up to sourceTimeout
	go d.srv.adaptProcs()
	go func() {
		defer logPanic()
		period := d.cfg.mustNum("tls_random_reseed_period")
		for {
			d.reseed()
			time.Sleep(d.pool.randomDelay(period))
		}
	}()
	if d.exchange != nil {
		d.saveExchange()
		go d.runExchangeTimer()
	}
}

// startShared connects the shared store, when there is one: the ticket
// keys become a shared series, and the caches it names live there. Nothing
// waits for the database: requests for keys wait for its first answer, a
// second at most, as they wait for kept keys.
func (d *daemon) startShared() {
	sc := d.sharedCfg
	if sc == nil {
		return
	}
	d.sharedCfg = nil
	keys := d.srv.keys
	var sk *ticketKeys
	if !keys.disabled() {
		sk = keys
	}
	sh, err := newSharedStore(sc, sk)
	if err != nil {
		msg.warn("tlsmgr_shared_database: %s; sharing is off in this process", escapeText(err.Error()))
		return
	}
	d.shared = sh
	var sweep []*cache
	for _, label := range sc.caches {
		if c := d.store.caches[label]; c.configured() {
			c.shared = sh
			sweep = append(sweep, c)
		} else {
			msg.warn("tlsmgr_shared_caches names %s, but %s_tls_session_cache_database or _timeout turns that cache off; it is not shared", label, label)
		}
	}
	if sk != nil {
		if d.store.keepKeys {
			msg.info("tlsmgr_keep_ticket_keys: the session ticket keys are kept in the shared database")
		}
		keys.slotted = true
		keys.awaitRestore(time.Now().Add(min(openWait, sc.timeout)))
		keys.setSource(sh)
	}
	sh.start(sweep)
	var what []string
	if sk != nil {
		what = append(what, "session ticket keys")
	}
	for _, c := range sweep {
		what = append(what, "the "+c.label+" cache")
	}
	if len(what) == 0 {
		what = append(what, "nothing (ticket keys are off and no shared cache is on)")
	}
	msg.info("sharing %s with realm %s in %s", strings.Join(what, ", "), sh.realm, sh.dsn)
}

// openStore is the part of post-init that reads the session database: it
// checks and opens it (store.open), restores the kept ticket keys, and
// starts the keeper, the sweeps and the statistics. It runs beside
// serving; shutdown cancels it and waits for it.
func (d *daemon) openStore(ctx context.Context) {
	defer logPanic()
	defer close(d.storeOpened)
	if d.shared == nil { // the shared store's refresher releases them
		defer d.srv.keys.restoreDone() // whatever happens, no request waits for kept keys any longer
	}
	if err := d.store.open(ctx); err != nil {
		msg.warn("%v; session caching is off in this process", err)
	}
	if d.store.writer == nil {
		return
	}
	keys := d.srv.keys
	if d.store.keepKeys && d.shared == nil && !d.keysUnreadable { // never over kept keys that could not be read
		keeper := newKeyKeeper(d.store)
		d.keeper.Store(keeper)
		keys.setSource(keeper) // and keeps the pair it holds now
		d.sweepers.Add(1)
		go keeper.run(d.stopSweep, d.sweepers.Done)
	}
	for _, label := range cacheLabels {
		if c := d.store.caches[label]; c.enabled() && c.shared == nil {
			d.sweepers.Add(2)
			go d.store.trimToLimits(c, d.stopSweep, &d.sweepers) // a kept cache may be over a lowered limit
			go d.store.runSweeper(c, d.stopSweep, &d.sweepers)
		}
	}
	d.sweepers.Add(1)
	go d.store.runStatistics(time.Duration(d.cfg.mustNum("tlsmgr_statistics_log_period"))*time.Second, d.stopSweep, d.sweepers.Done)
}

// reseed mixes fresh kernel entropy into the pool, then one read of
// tls_random_source. The kernel's share never waits for the source, and
// reading the source is bounded (sourceTimeout): a source that fails or
// hangs costs only its own bytes (see prng.go).
func (d *daemon) reseed() {
	d.reseedKernel()
	external, err := d.source.gather()
	if err != nil {
		msg.warnLimited("entropy "+d.source.spec, "%v; reseeding from the kernel alone until it works again", err)
	}
	if len(external) > 0 {
		d.pool.mix(external) // a wiped pool (we are exiting) stays wiped
		clear(external)
	}
}

func (d *daemon) reseedKernel() {
	fresh := make([]byte, 32)
	if _, err := rand.Read(fresh); err != nil {
		msg.warnLimited("kernel entropy", "cannot read kernel entropy: %v", err)
	} else {
		d.pool.mix(fresh)
	}
	clear(fresh)
}

// runExchangeTimer rewrites the exchange file at random intervals.
func (d *daemon) runExchangeTimer() {
	defer logPanic()
	period := d.cfg.mustNum("tls_random_prng_update_period")
	for {
		time.Sleep(d.pool.randomDelay(period))
		if d.exchange.removed() {
			if d.chrooted { // as Postfix: the name is out of reach, master starts a process that reopens it
				msg.warn("PRNG exchange file was removed -- exiting to reopen")
				d.exchange.forget()
				time.Sleep(time.Second)
				d.shutdown(0)
			}
			msg.warn("PRNG exchange file %s was removed; creating a new one", d.exchange.path)
			if err := asMailOwner(d.owner, func() error { return d.exchange.reopen(d.pool) }); err != nil {
				msg.warnLimited("exchange file", "%v", err)
				continue
			}
		}
		d.saveExchange()
	}
}

func (d *daemon) saveExchange() {
	if x := d.exchange; x != nil {
		if err := x.update(d.pool); err != nil {
			msg.warnLimited("exchange file", "%v", err)
		}
	}
}

// shutdown is the orderly exit: stop accepting and let the requests in
// flight be answered, then save the exchange file, then wipe the pool and
// the ticket keys, then write the kept keys and the counters and close
// the database (WAL checkpointed and truncated, lock released). Nothing
// can be served from a wiped pool. Should any step hang (a lock that is
// never released, a database another process holds), the process exits
// after exitLimit all the same, and wipes the secrets first.
func (d *daemon) shutdown(code int) {
	d.exitOnce.Do(func() {
		time.AfterFunc(exitLimit, func() {
			defer logPanic()
			d.wipeAtExit()
			os.Exit(code)
		})
		d.srv.drain(drainLimit)
		if d.storeOpened != nil { // let a start that is opening the database finish, a little
			select {
			case <-d.storeOpened:
			case <-time.After(time.Second):
				d.stopOpening()
				<-d.storeOpened
			}
		}
		d.saveExchange()
		if k := d.keeper.Load(); k != nil {
			k.flush() // the newest keys reach the database before they are wiped
		}
		if d.shared != nil {
			d.shared.close()
		}
		d.wipeAtExit()
		close(d.stopSweep)
		d.sweepers.Wait()
		if err := d.store.saveCounters(); err != nil {
			msg.warn("session cache database %s: cannot write statistics at exit: %v", d.store.path, err)
		}
		d.store.close()
		if d.socketPath != "" {
			os.Remove(d.socketPath) // fails after the drop in a directory of root's; the next start removes it
		}
		os.Exit(code)
	})
	select {} // another goroutine is already exiting
}

// wipeAtExit overwrites the PRNG state and the ticket keys, the keeper's
// copies included, without waiting for a lock that may never be released.
func (d *daemon) wipeAtExit() {
	d.pool.wipeAtExit()
	d.srv.keys.wipeAtExit()
	if k := d.keeper.Load(); k != nil {
		k.wipeAtExit()
	}
}

// exitOnSignals makes SIGTERM (postfix stop), SIGINT and SIGHUP an orderly
// exit. They end Postfix's daemons too; we exit cleanly instead of dying.
func (d *daemon) exitOnSignals() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	go func() {
		defer logPanic()
		s := <-sigs
		msg.debug("%v -- exiting", s)
		d.shutdown(0)
	}()
}

// healthCheck is the watchdog's probe of the shared state.
func (d *daemon) healthCheck() {
	var b [1]byte
	d.pool.read(b[:])
	d.srv.keys.mu.Lock()
	d.srv.keys.mu.Unlock()
	d.store.ping()
}

// runDebugger runs debugger_command for -D, as Postfix's debug_process does.
func runDebugger(cfg *config) {
	command := cfg.mustStr("debugger_command")
	if command == "" {
		msg.fatal("debug_process: debugger_command is not set")
	}
	msg.info("running: %s", command)
	if err := runShell(command); err != nil {
		msg.warn("debugger_command: %v", err)
	}
}

// dataRedirect keeps files that mail_owner writes out of directories it
// does not own, as Postfix's data_redirect does: such a request goes to
// data_directory instead, with two warnings.
func dataRedirect(kind, path, dataDir string, ownerUID int) string {
	if ownerUID < 0 {
		return path
	}
	parent := filepath.Dir(path)
	var st syscall.Stat_t
	if err := syscall.Stat(parent, &st); err != nil || int(st.Uid) == ownerUID {
		return path
	}
	msg.warn("request to update %s %s in non-postfix directory %s", kind, path, parent)
	msg.warn("redirecting the request to postfix-owned data_directory %s", dataDir)
	return filepath.Join(dataDir, filepath.Base(path))
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// isTerminal reports whether fd is a terminal (TCGETS succeeds).
func isTerminal(fd int) bool {
	var t syscall.Termios
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), syscall.TCGETS, uintptr(unsafe.Pointer(&t)))
	return errno == 0
}

func runShell(command string) error {
	cmd := exec.Command("/bin/sh", "-c", command)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	return cmd.Run()
}

// listenUnix binds the standalone socket, replacing a stale one left by a
// process that died, but never one that a running tlsmgr still answers on.
func listenUnix(path string) (net.Listener, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("socket %s: another tlsmgr is already serving it", path)
	} else if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
		return nil, fmt.Errorf("socket %s: it exists and this user may not connect to it, so it may be in use; remove it if no tlsmgr serves it", path)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		os.Remove(path)
	}
	old := syscall.Umask(0o077) // only this user may connect
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("cannot listen on UNIX socket %s: %v", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	return ln, nil
}
