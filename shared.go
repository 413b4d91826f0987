// The shared store (tlsmgr_shared_database): the session-ticket keys of
// every host of a realm, and the caches named by tlsmgr_shared_caches, in
// PostgreSQL, so that a client sent to another host of the same name
// resumes there.
//
// Ticket keys have no leader. Keys belong to slots of H seconds (see
// tktkeys.go); the first host that needs slot k inserts a fresh key (INSERT
// ... ON CONFLICT DO NOTHING), then every host reads the row for k in a
// statement of its own, so that all of them hold the key that won. A
// background refresher does this for slots k-1..k+1 every refresh period,
// publishing k+1 ahead of time: tktkey never waits for the database. When
// the database is away a slot without a key gets one of this host's,
// published when the database returns; the database's key then wins for
// every host, and the local one still decrypts its tickets.
//
// SECURITY: nothing the database sends is trusted: every statement has a
// deadline (tlsmgr_shared_database_timeout), messages are bounded
// (sharedMaxMessage), rows are counted and sizes checked, and its error
// texts are escaped before they are logged. Key material and sessions are
// sealed (AES-256-GCM, a fresh key per row derived from the secret) and
// bound to their realm and row, so the database never holds them in the
// clear. The secret is read as root in pre-init, from a root-owned file
// opened without following links. A database that is down, slow or refuses
// us costs sharing only: after sharedTripAfter failures in a row no request
// waits for it at all until a background retry gets through.

package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	_ "embed"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgxpool"
)

//go:embed schema_shared.sql
var sharedSchemaSQL string

const (
	sharedSecretLen  = 32
	sharedMaxMessage = 2*(maxAttrLen+sealOverhead) + 64<<10 // the largest row we read: a sealed session, as hex text too, and its id
	sharedTripAfter  = 3                                    // failures in a row before requests stop waiting
	sharedRetryEvery = 2 * time.Second                      // while down, how often a background ping tries
	sharedSweepBatch = 1000                                 // expired rows deleted per statement
	sharedMaxConns   = 8
	sharedClockSkew  = 5 * time.Second // warn past this difference with the database's clock
	schemaRetry      = 5 * time.Second // tables that could not be made: the next attempt waits this long
	sealVersion      = 1
	sealOverhead     = 1 + 16 + 16 // version, salt, GCM tag
)

// errSharedDown answers at once while the database is known to be away.
var errSharedDown = errors.New("the shared database is unreachable; retrying in the background")

// sharedConfig is what pre-init prepares: everything read from files (the
// secret, a pass file, certificates) is in it, so that connecting works
// after chroot and the privilege drop.
type sharedConfig struct {
	pool    *pgxpool.Config
	realm   string
	caches  []string
	timeout time.Duration
	secret  [sharedSecretLen]byte
}

// prepareShared reads the shared store's parameters in pre-init, as root.
// It returns nil when sharing is off: not configured, or (with one warning)
// the secret file is missing or unfit. A connection string that cannot be
// parsed stops start-up.
func prepareShared(cfg *config) *sharedConfig {
	conn := cfg.mustStr("tlsmgr_shared_database")
	if conn == "" {
		return nil
	}
	realm := cfg.mustStr("tlsmgr_shared_realm")
	caches, err := sharedCacheList(cfg.mustStr("tlsmgr_shared_caches"))
	if err != nil {
		msg.fatal("%v", err)
	}
	if err := checkRealm(realm); err != nil {
		msg.fatal("%v", err)
	}
	secretFile := cfg.mustStr("tlsmgr_shared_secret_file")
	sc := &sharedConfig{realm: realm, caches: caches,
		timeout: time.Duration(cfg.mustNum("tlsmgr_shared_database_timeout")) * time.Second}
	// pgx takes defaults from PG* variables and from files under $HOME:
	// none of them is checked, so as root the parse sees none of them.
	// The files the string names are checked, before pgx reads them, like
	// the secret.
	files, err := connFiles(conn)
	if err != nil {
		msg.fatal("tlsmgr_shared_database: %v", err)
	}
	for _, f := range files {
		if err := checkRootPath(f); err != nil {
			msg.warn("tlsmgr_shared_database: %v; sharing stays off", err)
			return nil
		}
	}
	var pc *pgxpool.Config
	withoutPGEnvironment(func() { pc, err = sharedPoolConfig(conn, sc.timeout) })
	if err != nil {
		msg.fatal("%v", err)
	}
	warnUnverified(&pc.ConnConfig.Config)
	sc.pool = pc
	if err := readSecret(secretFile, sc.secret[:]); err != nil {
		msg.warn("tlsmgr_shared_secret_file: %v; sharing stays off. Make one as root with: "+
			"umask 077; head -c 32 /dev/urandom > %s, and copy it to every host of realm %s", err, secretFile, realm)
		return nil
	}
	x509.SystemCertPool() // loads the system's CAs now: after chroot they are out of reach
	return sc
}

// sharedPoolConfig parses the connection string, which reads any pass
// file and certificates it names, and bounds what the connections may take.
func sharedPoolConfig(conn string, timeout time.Duration) (*pgxpool.Config, error) {
	pc, err := pgxpool.ParseConfig(conn)
	if err != nil {
		var pe *pgconn.ParseConfigError
		if errors.As(err, &pe) {
			err = pe.Unwrap() // its text would repeat the string, password and all
		}
		return nil, fmt.Errorf("tlsmgr_shared_database: cannot parse the connection string: %s (want a libpq URI or key=value string)", escapeText(fmt.Sprint(err)))
	}
	pc.MaxConns = sharedMaxConns
	pc.MinConns = 0
	pc.MaxConnIdleTime = 5 * time.Minute
	pc.HealthCheckPeriod = 30 * time.Second
	cc := pc.ConnConfig
	if cc.ConnectTimeout == 0 || cc.ConnectTimeout > timeout {
		cc.ConnectTimeout = timeout
	}
	if cc.RuntimeParams == nil {
		cc.RuntimeParams = map[string]string{}
	}
	if cc.RuntimeParams["application_name"] == "" {
		cc.RuntimeParams["application_name"] = "tlsmgr"
	}
	cc.BuildFrontend = func(r io.Reader, w io.Writer) *pgproto3.Frontend {
		f := pgproto3.NewFrontend(r, w)
		f.SetMaxBodyLen(sharedMaxMessage)
		return f
	}
	return pc, nil
}

// withoutPGEnvironment runs f with no PG* variable and no HOME.
func withoutPGEnvironment(f func()) {
	saved := map[string]string{}
	for _, kv := range os.Environ() {
		name, value, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "PG") || name == "HOME" {
			saved[name] = value
			os.Unsetenv(name)
		}
	}
	defer func() {
		for name, value := range saved {
			os.Setenv(name, value)
		}
	}()
	f()
}

// connFileParams are the connection string's parameters that name files
// pgx reads. service and servicefile name files that name more files: they
// are refused.
var connFileParams = map[string]bool{"passfile": true, "sslrootcert": true, "sslcert": true, "sslkey": true}

// connFiles lists the files a connection string names, so that they can be
// checked before pgx reads them as root. It fails closed: file parameters
// are taken in libpq's key=value form only (a URI's grammar has corners,
// such as fragments and multiple hosts, where Go's URL parser and pgx's
// disagree), and the name of a file parameter anywhere in the string that
// this scan did not find as a parameter refuses the string.
func connFiles(conn string) ([]string, error) {
	lower := strings.ToLower(conn)
	mentioned := func(name string) bool { return strings.Contains(lower, name) }
	if strings.HasPrefix(lower, "postgres://") || strings.HasPrefix(lower, "postgresql://") {
		for name := range connFileParams {
			if mentioned(name) {
				return nil, fmt.Errorf("give %s in the key=value form (host=... %s=...), not in a URI", name, name)
			}
		}
		if mentioned("service=") || mentioned("servicefile=") {
			return nil, errors.New("service and servicefile are not supported: give the parameters in the string")
		}
		return nil, nil
	}
	space := func(c byte) bool { return strings.IndexByte(" \t\n\r\v\f", c) >= 0 }
	var files []string
	seen := map[string]bool{}
	rest := conn
	for {
		for rest != "" && space(rest[0]) {
			rest = rest[1:]
		}
		eq := strings.IndexByte(rest, '=')
		if eq < 0 {
			break // the end, or a string pgx refuses
		}
		name := strings.TrimRightFunc(rest[:eq], func(r rune) bool { return r < 128 && space(byte(r)) })
		rest = rest[eq+1:]
		for rest != "" && space(rest[0]) {
			rest = rest[1:]
		}
		var value strings.Builder
		quoted := strings.HasPrefix(rest, "'")
		if quoted {
			rest = rest[1:]
		}
		i := 0
		for ; i < len(rest); i++ {
			c := rest[i]
			if c == '\\' && i+1 < len(rest) {
				i++
				value.WriteByte(rest[i])
				continue
			}
			if (quoted && c == '\'') || (!quoted && space(c)) {
				i++
				break
			}
			value.WriteByte(c)
		}
		rest = rest[i:]
		seen[strings.ToLower(name)] = true
		if name == "service" || name == "servicefile" {
			return nil, errors.New("service and servicefile are not supported: give the parameters in the string")
		}
		if connFileParams[name] {
			files = append(files, value.String())
		}
	}
	for name := range connFileParams {
		if mentioned(name) && !seen[name] {
			return nil, fmt.Errorf("it mentions %s, but not as a parameter this program can check; write %s=/path", name, name)
		}
	}
	return files, nil
}

// checkRootPath: a file pgx reads as root must be root's (or ours, when we
// are not root), and so must every directory on its way, none of them
// writable by anyone else; not a link.
func checkRootPath(path string) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("%s: give files as absolute paths", path)
	}
	uid := uint32(os.Geteuid())
	for p := filepath.Clean(path); ; p = filepath.Dir(p) {
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			return fmt.Errorf("%s: %v", path, err)
		}
		switch {
		case st.Mode&syscall.S_IFMT == syscall.S_IFLNK:
			return fmt.Errorf("%s: %s is a symbolic link", path, p)
		case p == filepath.Clean(path) && st.Mode&syscall.S_IFMT != syscall.S_IFREG:
			return fmt.Errorf("%s is not a regular file", path)
		case st.Uid != 0 && st.Uid != uid:
			return fmt.Errorf("%s: %s belongs to uid %d, not root", path, p, st.Uid)
		case st.Mode&0o022 != 0 && !(st.Mode&syscall.S_IFMT == syscall.S_IFDIR && st.Mode&syscall.S_ISVTX != 0 && p != filepath.Clean(path)):
			return fmt.Errorf("%s: others may write %s (mode %04o)", path, p, st.Mode&0o7777)
		}
		if p == "/" {
			return nil
		}
	}
}

// warnUnverified says once, at start, when the database's identity is not
// checked on a connection that leaves the host. The keys and sessions are
// sealed either way; what is exposed is which IDs are cached, and the
// rows can be withheld or replayed.
func warnUnverified(cc *pgconn.Config) {
	if strings.HasPrefix(cc.Host, "/") {
		return
	}
	if ip := net.ParseIP(cc.Host); ip != nil && ip.IsLoopback() || cc.Host == "localhost" {
		return
	}
	if cc.TLSConfig == nil || (cc.TLSConfig.InsecureSkipVerify && cc.TLSConfig.VerifyPeerCertificate == nil) {
		msg.warn("tlsmgr_shared_database: the connection to %s is not verified (set sslmode=verify-full and sslrootcert): "+
			"keys and sessions are sealed, but a machine in between sees which sessions are cached and can withhold rows", escapeText(cc.Host))
	}
}

// sharedCacheList parses tlsmgr_shared_caches.
func sharedCacheList(v string) ([]string, error) {
	var out []string
	for _, f := range strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' }) {
		switch f {
		case "smtpd", "smtp", "lmtp":
			out = append(out, f)
		default:
			return nil, fmt.Errorf("invalid tlsmgr_shared_caches value %q: %q is not a cache; allowed are smtpd, smtp and lmtp, as a list, or empty for ticket keys only", v, escapeText(f))
		}
	}
	return out, nil
}

func checkRealm(realm string) error {
	ok := realm != "" && len(realm) <= 64
	for _, r := range realm {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._-", r)) {
			ok = false
		}
	}
	if !ok {
		return fmt.Errorf("invalid tlsmgr_shared_realm value %q: want 1 to 64 letters, digits, dots, dashes or underscores", escapeText(realm))
	}
	return nil
}

// readSecret reads the shared secret: exactly 32 bytes in a regular file
// that belongs to root (or, when we are not root, to us) and that no one
// else may read or write, opened without following a link.
func readSecret(path string, out []byte) error {
	if path == "" {
		return errors.New("not set")
	}
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("cannot open %s: %v", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return fmt.Errorf("cannot stat %s: %v", path, err)
	}
	switch {
	case st.Mode&syscall.S_IFMT != syscall.S_IFREG:
		return fmt.Errorf("%s is not a regular file", path)
	case int(st.Uid) != os.Geteuid() && st.Uid != 0:
		return fmt.Errorf("%s belongs to uid %d, not root", path, st.Uid)
	case st.Mode&0o077 != 0:
		return fmt.Errorf("%s has mode %04o: others may read it (chmod 600)", path, st.Mode&0o7777)
	case st.Size != sharedSecretLen:
		return fmt.Errorf("%s holds %d bytes, not %d", path, st.Size, sharedSecretLen)
	}
	if _, err := io.ReadFull(f, out); err != nil {
		clear(out)
		return fmt.Errorf("cannot read %s: %v", path, err)
	}
	return nil
}

// sharedStore is the running shared store.
type sharedStore struct {
	pool    *pgxpool.Pool
	realm   string
	timeout time.Duration
	sealKey [32]byte // HKDF(secret, realm): rows are sealed under keys derived from it
	keys    *ticketKeys
	now     func() time.Time

	failures atomic.Int32
	down     atomic.Bool
	// stateMu guards retrying and closed: a retry starts only while none
	// runs and we are not exiting, and it ends (down false) under it.
	stateMu  sync.Mutex
	retrying bool
	closed   bool
	// keyMu: seal and open hold it for reading; close wipes sealKey under
	// it, so nothing is ever sealed under a wiped (known) key.
	keyMu       sync.RWMutex
	lastConnect time.Time // when "connected" was last logged
	schemaOK    atomic.Bool
	// noRawKeyColumn: the cache tables come from an earlier tlsmgr and
	// lack peer_rpk, which this role could not add: rows are stored
	// without it (sharedUpsert) until tlsmgr starts again after
	// schema_shared.sql is run.
	noRawKeyColumn atomic.Bool
	wake           chan struct{} // the refresher: publish a key this host made
	stop           chan struct{}
	// ctx is every statement's parent: close cancels it first, so that
	// nothing waits for the database at exit.
	ctx         context.Context
	cancel      context.CancelFunc
	wg          sync.WaitGroup
	schemaMu    sync.Mutex
	schemaTried time.Time // the last attempt that failed: the next waits schemaRetry
	// ready is closed once the refresher's first round is over: until
	// then, and startBy at the latest, cache requests wait for it.
	ready     chan struct{}
	readyOnce sync.Once
	startBy   time.Time
	dsn       string // what warnings call the database: host, port, database
}

// newSharedStore makes the running store from what pre-init prepared, and
// wipes the secret there. keys may be nil (smtpd timeout 0: no keys).
func newSharedStore(sc *sharedConfig, keys *ticketKeys) (*sharedStore, error) {
	sh := &sharedStore{realm: sc.realm, timeout: sc.timeout, keys: keys,
		now: time.Now, wake: make(chan struct{}, 1), stop: make(chan struct{}), ready: make(chan struct{}),
		startBy: time.Now().Add(min(openWait, sc.timeout))}
	sh.ctx, sh.cancel = context.WithCancel(context.Background())
	key, err := hkdf.Key(sha256.New, sc.secret[:], nil, "tlsmgr shared store v1\x00"+sc.realm, 32)
	clear(sc.secret[:])
	if err != nil {
		return nil, err
	}
	copy(sh.sealKey[:], key)
	clear(key)
	cc := sc.pool.ConnConfig
	sh.dsn = fmt.Sprintf("%s:%d/%s", cc.Host, cc.Port, cc.Database)
	if sh.pool, err = pgxpool.NewWithConfig(context.Background(), sc.pool); err != nil {
		return nil, err
	}
	return sh, nil
}

// start runs the refresher (the tables, and the ticket keys when there
// are any) and the sweeps of the shared caches.
func (sh *sharedStore) start(sweep []*cache) {
	sh.wg.Add(1)
	go sh.runRefresher()
	for _, c := range sweep {
		sh.wg.Add(1)
		go sh.runSweeper(c)
	}
}

// close stops the background work and the connections, and wipes the key.
func (sh *sharedStore) close() {
	sh.stateMu.Lock()
	if sh.closed {
		sh.stateMu.Unlock()
		return
	}
	sh.closed = true
	sh.stateMu.Unlock()
	sh.cancel()
	close(sh.stop)
	done := make(chan struct{})
	go func() { sh.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(sh.timeout + time.Second):
	}
	sh.pool.Close()
	sh.keyMu.Lock()
	clear(sh.sealKey[:])
	sh.down.Store(true) // nothing uses the database any more
	sh.keyMu.Unlock()
}

// made is the keySource's: a key this host made goes to the database as
// soon as the refresher can take it. It never blocks.
func (sh *sharedStore) made([]*ticketKey) {
	select {
	case sh.wake <- struct{}{}:
	default:
	}
}

// Sealing. A row is sealed under its own key, HMAC-SHA256(sealKey, salt)
// with a random 16-byte salt, so that no GCM nonce is ever used twice
// however many rows a realm writes; the row's identity is the additional
// data. Layout: version (1), salt (16), ciphertext, tag (16).
func (sh *sharedStore) aead(salt []byte) cipher.AEAD {
	m := hmac.New(sha256.New, sh.sealKey[:])
	m.Write(salt)
	k := m.Sum(nil)
	defer clear(k)
	block, err := aes.NewCipher(k)
	if err != nil {
		panic(err) // a 32-byte key always makes a cipher
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	return gcm
}

var zeroNonce [12]byte

func (sh *sharedStore) seal(plain, ad []byte) ([]byte, error) {
	sh.keyMu.RLock()
	defer sh.keyMu.RUnlock()
	if sh.sealKey == [32]byte{} {
		return nil, errSharedDown // wiped: we are exiting
	}
	out := make([]byte, 1+16, sealOverhead+len(plain))
	out[0] = sealVersion
	if _, err := rand.Read(out[1:17]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return sh.aead(out[1:17]).Seal(out, zeroNonce[:], plain, ad), nil
}

func (sh *sharedStore) open(sealed, ad []byte) ([]byte, error) {
	if len(sealed) < sealOverhead || sealed[0] != sealVersion {
		return nil, errors.New("not a sealed value of this version")
	}
	sh.keyMu.RLock()
	defer sh.keyMu.RUnlock()
	if sh.sealKey == [32]byte{} {
		return nil, errSharedDown
	}
	return sh.aead(sealed[1:17]).Open(nil, zeroNonce[:], sealed[17:], ad)
}

// keyAD and sessionAD bind a sealed value to its row.
func (sh *sharedStore) keyAD(period, slot int64) []byte {
	return fmt.Appendf(nil, "ticket_keys\x00%s\x00%d\x00%d", sh.realm, period, slot)
}

func (sh *sharedStore) sessionAD(label, id string, expires int64) []byte {
	return fmt.Appendf(nil, "%s_cache\x00%s\x00%d\x00%s", label, sh.realm, expires, id)
}

// do runs one use of the database within the timeout. While the database
// is known to be away it fails at once; a failure that says the database
// is away, slow or refusing us counts towards that, and trip makes it so
// at once (the refresher: it is the first to know).
func (sh *sharedStore) do(what string, trip bool, f func(ctx context.Context) error) error {
	return sh.doBy(time.Now().Add(sh.timeout), what, trip, f)
}

// doBy is do with the deadline of a request that may have waited already.
func (sh *sharedStore) doBy(deadline time.Time, what string, trip bool, f func(ctx context.Context) error) error {
	if sh.down.Load() {
		return errSharedDown
	}
	ctx, cancel := context.WithDeadline(sh.ctx, deadline)
	defer cancel()
	err := f(ctx)
	if err == nil || errors.Is(err, pgx.ErrNoRows) {
		sh.failures.Store(0)
		return err
	}
	if missingTable(err) || missingColumn(err) {
		// A restored or emptied database, or tables an earlier tlsmgr
		// made: the next use looks at them again, and makes what is missing.
		sh.schemaOK.Store(false)
		return err
	}
	if !countsAsDown(err) {
		return err
	}
	msg.warnLimited("shared database", "shared database %s: cannot %s: %s; sharing is degraded on this host until it works again",
		sh.dsn, what, escapeText(err.Error()))
	if n := sh.failures.Add(1); n >= sharedTripAfter || trip {
		sh.tripped()
	}
	return err
}

// countsAsDown: an error about our data (class 22, 23) says nothing about
// the database; anything else (a network error, a timeout, a refusal, a
// missing table) does.
func countsAsDown(err error) bool {
	var pe *pgconn.PgError
	if errors.As(err, &pe) && (strings.HasPrefix(pe.Code, "22") || strings.HasPrefix(pe.Code, "23")) {
		return false
	}
	return true
}

func missingTable(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "42P01"
}

func missingColumn(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "42703"
}

// accessRule: class 42, what the role may not do (insufficient_privilege,
// must be owner, ...), or a statement the server does not take.
func accessRule(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && strings.HasPrefix(pe.Code, "42")
}

// tripped: no request waits for the database until a background ping gets
// through.
func (sh *sharedStore) tripped() {
	sh.stateMu.Lock()
	defer sh.stateMu.Unlock()
	sh.down.Store(true)
	if sh.retrying || sh.closed {
		return
	}
	sh.retrying = true
	sh.wg.Add(1)
	go func() {
		defer logPanic()
		defer sh.wg.Done()
		for {
			select {
			case <-sh.stop:
				return
			case <-time.After(sharedRetryEvery):
			}
			if sh.writable() {
				break
			}
		}
		sh.schemaMu.Lock()
		sh.schemaTried = time.Time{} // back: look at the tables at once
		sh.schemaMu.Unlock()
		sh.stateMu.Lock()
		if sh.closed {
			sh.stateMu.Unlock()
			return
		}
		sh.failures.Store(0)
		sh.retrying = false
		sh.down.Store(false)
		say := time.Since(sh.lastConnect) > warnInterval
		if say {
			sh.lastConnect = time.Now()
		}
		sh.stateMu.Unlock()
		if say {
			msg.info("shared database %s: connected; sharing session ticket keys and caches again", sh.dsn)
		}
		sh.made(nil) // the refresher publishes what this host made meanwhile
	}()
}

// writable is the background retry's probe: the database answers, takes
// writes (a standby in recovery does not), and its tables can be read now
// (not locked by someone else); missing tables are the refresher's to make.
func (sh *sharedStore) writable() bool {
	ctx, cancel := context.WithTimeout(sh.ctx, sh.timeout)
	defer cancel()
	var primary bool
	err := sh.pool.QueryRow(ctx, "SELECT NOT pg_is_in_recovery()").Scan(&primary)
	if err == nil && !primary {
		msg.warnLimited("shared database", "shared database %s is a standby in recovery: it cannot take writes; sharing is degraded until it can", sh.dsn)
	}
	if err != nil || !primary {
		return false
	}
	for _, table := range sharedTables {
		if _, err := sh.pool.Exec(ctx, "SELECT 1 FROM "+table+" LIMIT 1"); err != nil && !missingTable(err) {
			return false
		}
	}
	return true
}

// sharedTables and sharedViews are schema_shared.sql's.
var (
	sharedTables = []string{"ticket_keys", "smtpd_cache", "smtp_cache", "lmtp_cache"}
	sharedViews  = []string{"sessions", "cache_stats", "ticket_key_names"}
)

// sharedCountRelations counts the tables and the views that the role's
// search_path finds, as its statements will, and the cache tables that
// have peer_rpk, which tables an earlier tlsmgr made lack.
const sharedCountRelations = `SELECT (SELECT count(*) FROM unnest($1::text[]) AS n WHERE to_regclass(n) IS NOT NULL)::int,
	(SELECT count(*) FROM unnest($2::text[]) AS n WHERE to_regclass(n) IS NOT NULL)::int,
	(SELECT count(*) FROM unnest($3::text[]) AS n JOIN pg_attribute AS a ON a.attrelid = to_regclass(n)
	 WHERE a.attname = 'peer_rpk' AND NOT a.attisdropped)::int`

var sharedCacheTables = []string{"smtpd_cache", "smtp_cache", "lmtp_cache"}

// ensureSchema makes the tables and views when one is missing, once per
// connection to a database that lacks them. A role that may not create
// them gets one warning: the README gives the schema to run by hand.
func (sh *sharedStore) ensureSchema() bool {
	if sh.schemaOK.Load() {
		return true
	}
	sh.schemaMu.Lock()
	defer sh.schemaMu.Unlock()
	if sh.schemaOK.Load() {
		return true
	}
	if time.Since(sh.schemaTried) < schemaRetry {
		return false
	}
	ok := sh.makeSchema()
	if !ok {
		sh.schemaTried = time.Now()
	}
	return ok
}

func (sh *sharedStore) makeSchema() bool {
	var tables, views, rawKey int
	err := sh.do("look for its tables", true, func(ctx context.Context) error {
		return sh.pool.QueryRow(ctx, sharedCountRelations, sharedTables, sharedViews, sharedCacheTables).Scan(&tables, &views, &rawKey)
	})
	if err != nil {
		return false
	}
	complete := func() bool {
		return tables == len(sharedTables) && views == len(sharedViews) && rawKey == len(sharedCacheTables)
	}
	if !complete() {
		created := false
		var refused error // the role may not: makeSchema's to say, not a sign the database is away
		err = sh.do("create its tables", false, func(ctx context.Context) error {
			err := pgx.BeginFunc(ctx, sh.pool, func(tx pgx.Tx) error {
				// One host at a time: two CREATE TABLE IF NOT EXISTS can still
				// clash. Then look again: another host may have made them.
				if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(7375696770)"); err != nil {
					return err
				}
				if err := tx.QueryRow(ctx, sharedCountRelations, sharedTables, sharedViews, sharedCacheTables).Scan(&tables, &views, &rawKey); err != nil || complete() {
					return err
				}
				_, err := tx.Exec(ctx, sharedSchemaSQL)
				created = err == nil
				return err
			})
			if accessRule(err) {
				refused, err = err, nil
			}
			return err
		})
		if err == nil && refused != nil {
			err = refused
		}
		switch {
		case err == nil && created && tables == len(sharedTables):
			msg.info("shared database %s: brought tlsmgr's tables and views up to date", sh.dsn)
			rawKey = len(sharedCacheTables)
		case err == nil && created:
			msg.info("shared database %s: created tlsmgr's tables", sh.dsn)
			rawKey = len(sharedCacheTables)
		case err != nil && tables == len(sharedTables):
			// The views are for people, and peer_rpk is one more column
			// for them: work without what is missing (sessions are stored
			// without peer_rpk) until tlsmgr starts again.
			var missing []string
			if views < len(sharedViews) {
				missing = append(missing, "its views (sessions, cache_stats, ticket_key_names)")
			}
			if rawKey < len(sharedCacheTables) {
				missing = append(missing, "the peer_rpk column of its cache tables (made by an earlier tlsmgr)")
			}
			verb := map[bool]string{true: "is", false: "are"}[len(missing) == 1 && views == len(sharedViews)]
			msg.warnLimited("shared schema", "shared database %s: %s %s missing and cannot be made: %s; run schema_shared.sql (see the README)",
				sh.dsn, strings.Join(missing, " and "), verb, escapeText(err.Error()))
		case err != nil:
			msg.warnLimited("shared schema", "shared database %s: its tables are missing and cannot be made: %s; create them with schema_shared.sql (see the README)",
				sh.dsn, escapeText(err.Error()))
			return false
		}
	}
	sh.noRawKeyColumn.Store(rawKey < len(sharedCacheTables))
	sh.schemaOK.Store(true)
	return true
}

// usable says whether a cache request may go to the database: its tables
// are there. A request never makes them (that is the refresher's, which it
// wakes): it waits at most for the refresher's first round at start, no
// longer than the start-up wait of the keys, and within its own deadline,
// of which its statement then gets what is left.
func (sh *sharedStore) usable(deadline time.Time) bool {
	if sh.schemaOK.Load() {
		return true
	}
	select {
	case <-sh.ready:
	default:
		if wait := min(time.Until(sh.startBy), time.Until(deadline)); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-sh.ready:
			case <-t.C:
			}
			t.Stop()
		}
	}
	if sh.schemaOK.Load() {
		return true
	}
	sh.made(nil) // the refresher looks at the tables now
	return false
}

// refreshEvery is the refresher's period: a quarter of H, between 5 s and
// a minute. Once the database is back every host holds its keys within it.
func (sh *sharedStore) refreshEvery() time.Duration {
	if sh.keys == nil {
		return time.Minute
	}
	return min(time.Minute, max(5*time.Second, time.Duration(sh.keys.half)*time.Second/4))
}

// runRefresher makes the tables when they are missing, and keeps the
// ticket keys, every refreshEvery and whenever it is woken.
func (sh *sharedStore) runRefresher() {
	defer logPanic()
	defer sh.wg.Done()
	first := true
	for {
		var err error
		if sh.keys != nil {
			err = sh.refreshKeys()
		} else if !sh.down.Load() && !sh.ensureSchema() {
			err = errors.New("no tables")
		}
		if first {
			first = false
			sh.readyOnce.Do(func() { close(sh.ready) })
			if sh.keys != nil {
				sh.keys.restoreDone() // requests no longer wait for the database's keys
			}
			if err != nil {
				sh.tripped() // a host that starts while the database is away does not make requests wait for it
			}
		}
		t := time.NewTimer(sh.refreshEvery())
		select {
		case <-sh.stop:
			t.Stop()
			return
		case <-sh.wake:
			t.Stop()
		case <-t.C:
		}
	}
}

// refreshKeys publishes this host's keys for slots k-1..k+1 where the
// database has none (k+1 ahead of time; k-1 only when this host holds one,
// as after the database was emptied), then reads the database's keys for
// those slots, in a statement of its own, and adopts them.
func (sh *sharedStore) refreshKeys() error {
	if sh.down.Load() {
		return errSharedDown
	}
	if !sh.ensureSchema() {
		return errors.New("no tables")
	}
	keys := sh.keys
	period := keys.half
	nowUnix := sh.now().Unix()
	slot := keys.slotOf(nowUnix)
	cands, err := keys.candidates(slot-1, slot+1, slot)
	if err != nil {
		return err
	}
	defer wipeKeys(cands)
	for try := 0; ; try++ {
		err = sh.publishKeys(cands, period, slot)
		if !missingTable(err) || try > 0 || !sh.ensureSchema() {
			break
		}
	}
	if err != nil {
		return err
	}
	var got []ticketKey
	defer func() { wipeKeys(got) }()
	var dbNow float64
	err = sh.do("read session ticket keys", true, func(ctx context.Context) error {
		got = got[:0]
		rows, err := sh.pool.Query(ctx, `SELECT slot, sealed, extract(epoch FROM clock_timestamp())::float8
			FROM ticket_keys WHERE realm = $1 AND period = $2 AND slot BETWEEN $3 AND $4 LIMIT 3`, sh.realm, period, slot-1, slot+1)
		if err != nil {
			return err
		}
		defer rows.Close()
		seen := map[int64]bool{}
		for rows.Next() {
			var s int64
			var sealed []byte
			if err := rows.Scan(&s, &sealed, &dbNow); err != nil {
				return err
			}
			if s < slot-1 || s > slot+1 || seen[s] || len(seen) == 3 {
				clear(sealed)
				return fmt.Errorf("the database answered with slot %d, which was not asked for or came twice", s)
			}
			seen[s] = true
			k, err := sh.openKey(period, s, sealed)
			clear(sealed)
			if err != nil {
				msg.warnLimited("shared key", "shared database %s: the session ticket key of realm %s, slot %d does not open: %v; not using it",
					sh.dsn, sh.realm, s, err)
				continue
			}
			got = append(got, k)
		}
		return rows.Err()
	})
	if err != nil {
		return err
	}
	if dbNow != 0 {
		if skew := time.Duration((float64(sh.now().UnixNano())/1e9 - dbNow) * float64(time.Second)); skew > sharedClockSkew || skew < -sharedClockSkew {
			msg.warnLimited("shared clock", "this host's clock differs from the shared database's by %v: keep clocks in step (NTP); "+
				"hosts more than smtpd_tls_session_cache_timeout/2 apart cannot share ticket keys", skew.Round(time.Second))
		}
	}
	keys.adopt(got)
	return nil
}

// publishKeys inserts the candidates where the database has no key for
// their slot, and deletes the realm's keys that no longer decrypt.
func (sh *sharedStore) publishKeys(cands []ticketKey, period, slot int64) error {
	return sh.do("publish session ticket keys", true, func(ctx context.Context) error {
		b := &pgx.Batch{}
		for i := range cands {
			k := &cands[i]
			plain := make([]byte, 0, 80)
			plain = append(append(append(plain, k.name[:]...), k.bits[:]...), k.hmac[:]...)
			sealed, err := sh.seal(plain, sh.keyAD(period, k.slot))
			clear(plain)
			if err != nil {
				return err
			}
			b.Queue("INSERT INTO ticket_keys (realm, period, slot, sealed) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
				sh.realm, period, k.slot, sealed)
		}
		// Keys that no longer decrypt, of any series of the realm.
		b.Queue("DELETE FROM ticket_keys WHERE realm = $1 AND (slot + 2) * period < $2", sh.realm, sh.now().Unix()-period)
		return sh.pool.SendBatch(ctx, b).Close()
	})
}

func (sh *sharedStore) openKey(period, slot int64, sealed []byte) (ticketKey, error) {
	var k ticketKey
	if len(sealed) != sealOverhead+80 {
		return k, fmt.Errorf("%d bytes, not %d", len(sealed), sealOverhead+80)
	}
	plain, err := sh.open(sealed, sh.keyAD(period, slot))
	if err != nil {
		return k, err
	}
	copy(k.name[:], plain[0:16])
	copy(k.bits[:], plain[16:48])
	copy(k.hmac[:], plain[48:80])
	clear(plain)
	k.slot = slot
	return k, nil
}

// usableID: a cache ID the database can hold as text. Others (Postfix
// sends none) are not shared: they miss, and are not cached.
func usableID(id string) bool { return utf8.ValidString(id) && len(id) <= 4096 }

// find is the shared cache's lookup.
func (sh *sharedStore) find(c *cache, id string) ([]byte, int) {
	deadline := time.Now().Add(sh.timeout)
	if !usableID(id) || !sh.usable(deadline) {
		return nil, statErr
	}
	var sealed []byte
	var rowID string
	var expires int64
	err := sh.doBy(deadline, "look up a "+c.label+" session", false, func(ctx context.Context) error {
		return sh.pool.QueryRow(ctx, "SELECT id, session, expires FROM "+c.label+"_cache WHERE realm = $1 AND hash = $2",
			sh.realm, rowKey(id)).Scan(&rowID, &sealed, &expires)
	})
	if err != nil || rowID != id {
		clear(sealed)
		return nil, statErr
	}
	if expires < sh.now().Unix() {
		clear(sealed)
		return nil, statErr // the sweep deletes it
	}
	session, err := sh.open(sealed, sh.sessionAD(c.label, id, expires))
	clear(sealed)
	if err != nil {
		msg.warnLimited("shared session", "shared database %s: %s session %s does not open: %v; not using it", sh.dsn, c.label, escapeText(id), err)
		return nil, statErr
	}
	if c.logCache {
		msg.info("read %s TLS cache entry %s: time=%d [data %d bytes]", c.label, id, expires-c.timeout, len(session))
	}
	return session, statOK
}

// update is the shared cache's update. It counts a new entry or a
// replaced one, as the local cache does.
func (sh *sharedStore) update(c *cache, id string, session []byte) int {
	deadline := time.Now().Add(sh.timeout)
	if !usableID(id) || len(session) > maxAttrLen || !sh.usable(deadline) {
		c.count.storeFailures.Add(1)
		return statErr
	}
	now := sh.now().Unix()
	expires := now + c.timeout
	sealed, err := sh.seal(session, sh.sessionAD(c.label, id, expires))
	if err != nil {
		c.count.storeFailures.Add(1)
		return statErr
	}
	values := decodedValues(session)
	if b, ok := values[5].(bool); ok { // ticket: 1 or 0, as in SQLite
		values[5] = map[bool]int64{false: 0, true: 1}[b]
	}
	withRawKey := !sh.noRawKeyColumn.Load()
	if !withRawKey {
		values = values[:len(values)-1] // peer_rpk is the last
	}
	args := append([]any{sh.realm, rowKey(id), id, sealed, now, expires}, values...)
	var inserted bool
	err = sh.doBy(deadline, "store a "+c.label+" session", false, func(ctx context.Context) error {
		return sh.pool.QueryRow(ctx, sharedUpsert(c.label, withRawKey), args...).Scan(&inserted)
	})
	if err != nil {
		c.count.storeFailures.Add(1) // do has warned: "not cached"
		return statErr
	}
	if inserted {
		c.count.stores.Add(1)
	} else {
		c.count.replaced.Add(1)
	}
	if c.logCache {
		msg.info("write %s TLS cache entry %s: time=%d [data %d bytes]", c.label, id, now, len(session))
	}
	return statOK
}

var sharedUpserts sync.Map

// sharedUpsert is the statement that stores a session of the cache;
// withRawKey false leaves out peer_rpk, decodedColumns' last.
func sharedUpsert(label string, withRawKey bool) string {
	key := label
	if !withRawKey {
		key += " without peer_rpk"
	}
	if q, ok := sharedUpserts.Load(key); ok {
		return q.(string)
	}
	cols := strings.Split(strings.ReplaceAll(decodedColumns, " ", ""), ",")
	if !withRawKey {
		cols = cols[:len(cols)-1]
	}
	all := append([]string{"realm", "hash", "id", "session", "stored", "expires"}, cols...)
	var ph, set []string
	for i, col := range all {
		ph = append(ph, "$"+strconv.Itoa(i+1))
		if i >= 2 {
			set = append(set, col+" = EXCLUDED."+col)
		}
	}
	q := "INSERT INTO " + label + "_cache (" + strings.Join(all, ", ") + ") VALUES (" + strings.Join(ph, ", ") +
		") ON CONFLICT (realm, hash) DO UPDATE SET " + strings.Join(set, ", ") + " RETURNING (xmax = 0)"
	sharedUpserts.Store(key, q)
	return q
}

// remove is the shared cache's delete.
func (sh *sharedStore) remove(c *cache, id string) int {
	deadline := time.Now().Add(sh.timeout)
	if !usableID(id) || !sh.usable(deadline) {
		return statErr
	}
	var tag pgconn.CommandTag
	err := sh.doBy(deadline, "delete a "+c.label+" session", false, func(ctx context.Context) error {
		var err error
		tag, err = sh.pool.Exec(ctx, "DELETE FROM "+c.label+"_cache WHERE realm = $1 AND hash = $2 AND id = $3", sh.realm, rowKey(id), id)
		return err
	})
	if err != nil || tag.RowsAffected() == 0 {
		return statErr
	}
	c.count.deletes.Add(1)
	return statOK
}

// runSweeper deletes the realm's expired rows of one shared cache, a batch
// per statement and resting as long again between batches, every timeout
// seconds. Every host sweeps; SKIP LOCKED keeps them out of each other's way.
func (sh *sharedStore) runSweeper(c *cache) {
	defer logPanic()
	defer sh.wg.Done()
	period := time.Duration(c.timeout) * time.Second
	for {
		t := time.NewTimer(period/2 + mrand.N(max(period, 1)))
		select {
		case <-sh.stop:
			t.Stop()
			return
		case <-t.C:
		}
		sh.sweep(c)
	}
}

// sweep deletes expired rows in batches until none is left (or we exit).
func (sh *sharedStore) sweep(c *cache) (total int64) {
	for {
		var n int64
		start := time.Now()
		err := sh.do("sweep the "+c.label+" cache", false, func(ctx context.Context) error {
			tag, err := sh.pool.Exec(ctx, "DELETE FROM "+c.label+"_cache WHERE ctid = ANY(ARRAY(SELECT ctid FROM "+c.label+
				"_cache WHERE realm = $1 AND expires < $2 LIMIT $3 FOR UPDATE SKIP LOCKED))", sh.realm, sh.now().Unix(), sharedSweepBatch)
			n = tag.RowsAffected()
			return err
		})
		total += n
		c.count.expiredBySweep.Add(n)
		if err != nil || n < sharedSweepBatch {
			return total
		}
		select {
		case <-sh.stop:
			return total
		case <-time.After(time.Since(start)):
		}
	}
}
