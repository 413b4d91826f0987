// The three TLS session caches (smtpd, smtp, lmtp) as tables of one SQLite
// file, with an expiry index that a sweep goroutine per cache uses to
// delete expired sessions in small batches.
//
// SECURITY: cache ids and sessions come from Postfix daemons and are stored
// as opaque bytes through bound parameters; nothing a client sends is ever
// part of SQL text. The caches are disposable, as in Postfix, which
// truncates its cache files at every start: we remove the file and its
// companions and create a new one, as mail_owner and never through a link
// (files.go), so a damaged, foreign or planted file can neither stop us nor
// be written through. Deleted sessions are overwritten (secure_delete), the
// WAL is bounded and truncated at exit, and every connection is opened
// before chroot and kept open, because nothing can be reopened by path
// afterwards. A database that cannot be opened, or a disk that fills up,
// costs caching only: seeds and ticket keys keep flowing.

package main

import (
	"context"
	"database/sql"
	_ "embed"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	_ "modernc.org/sqlite"
)

//go:embed schema.sql
var schemaSQL string

// readerConns is the size of the read pool; WAL lets readers run beside the
// one writer, and two cores gain nothing from more.
const readerConns = 4

// walSizeLimit bounds the -wal file: after a checkpoint SQLite truncates it
// to this size, so it neither grows without bound nor keeps old session
// pages around for long.
const walSizeLimit = 4 << 20

// Lookup, update and delete results, as tlsmgr sends them (postfix-tlsmgr.md §2).
const (
	statOK   = 0
	statErr  = -1 // not found, not stored, or no usable key
	statFail = -2 // bad request, unknown or disabled cache
)

// cache is one of smtpd, smtp, lmtp.
type cache struct {
	label    string // smtpd, smtp or lmtp: the cache_type on the wire
	database string // *_tls_session_cache_database; non-empty enables the cache
	timeout  int64  // effective timeout in seconds, 0 = disabled
	logCache bool   // the "cache" bit of *_tls_loglevel
	offline  bool   // the database could not be opened: no caching in this process

	lookupStmt, expireStmt, updateStmt, deleteStmt, sweepStmt, existsStmt *sql.Stmt
}

// configured is what main.cf asks for; enabled is what this process does.
func (c *cache) configured() bool { return c.database != "" && c.timeout > 0 }
func (c *cache) enabled() bool    { return c.configured() && !c.offline }

// effectiveTimeout sanitises a cache timeout the way tlsmgr does at start.
func effectiveTimeout(t int64) int64 {
	switch {
	case t <= 0:
		return 0
	case t < 120:
		return 120
	}
	return t
}

type store struct {
	path       string
	uid        int      // mail_owner's: every file must belong to it
	lock       *os.File // held for the life of the process: one tlsmgr per database
	writer     *sql.DB  // one connection: SQLite has one writer at a time anyway
	reader     *sql.DB
	caches     map[string]*cache
	sweepBatch int
	now        func() time.Time
	closed     bool

	// hidden holds entries whose delete or replacement could not be
	// written (a full disk, a read-only file): lookups miss them until
	// the row is really gone, so a failed write never brings back a
	// session that a client replaced or deleted.
	hiddenMu    sync.Mutex
	hidden      map[hiddenEntry]struct{}
	hiddenCount atomic.Int64 // len(hidden), for the lookup path without the lock
}

// hiddenEntry names one hidden row.
type hiddenEntry struct{ cache, id string }

// maxHidden bounds the hidden entries; past it a failed write is only logged.
const maxHidden = 10000

// cacheConfig is what newStore needs to know about one cache.
type cacheConfig struct {
	label, database, loglevel string
	timeout                   int64
}

// newStore checks the cache configuration; a database named twice is
// Postfix's fatal error. It opens nothing.
func newStore(caches []cacheConfig, sweepBatch int) (*store, error) {
	seen := map[string]string{}
	s := &store{caches: map[string]*cache{}, sweepBatch: sweepBatch, now: time.Now}
	for _, cc := range caches {
		c := &cache{label: cc.label, database: cc.database, timeout: effectiveTimeout(cc.timeout)}
		mask, err := tlsLogMask(cc.loglevel)
		if err != nil {
			msg.warn("%s_tls_loglevel: %v", cc.label, err)
		}
		c.logCache = mask&logMaskCache != 0
		if c.configured() {
			if other, dup := seen[c.database]; dup {
				return nil, fmt.Errorf("do not use the same TLS cache file %s for %s and %s", c.database, other, c.label)
			}
			seen[c.database] = c.label
		}
		s.caches[c.label] = c
	}
	return s, nil
}

// open takes the database lock, replaces whatever is at path with a new,
// empty database, and opens every connection the process will use. The
// caller runs it with mail_owner's effective uid and gid. On error nothing
// is left open and the caches are offline; the caller decides whether
// that stops us (a second standalone daemon) or only costs caching.
func (s *store) open(path string, uid int, lockWait time.Duration) (err error) {
	s.path, s.uid = path, uid
	wanted := false
	for _, c := range s.caches {
		wanted = wanted || c.configured()
	}
	if !wanted {
		return nil // no cache is on: no database to hold
	}
	defer func() {
		if err != nil {
			s.close()
			for _, c := range s.caches {
				c.offline = true
			}
		}
	}()
	if s.lock, err = lockDatabase(path, uid, lockWait); err != nil {
		return err
	}
	for _, suffix := range []string{"", "-wal", "-shm", "-journal"} {
		if err := removeName(path + suffix); err != nil {
			return fmt.Errorf("cannot remove the old session cache: %s", errText(err))
		}
	}
	f, err := createDataFile(path, uid, nil)
	if err != nil {
		return fmt.Errorf("cannot create session cache database %s: %s", path, errText(err))
	}
	defer f.Close()

	// auto_vacuum goes first: it only takes effect before the first table.
	dsn := "file:" + path + "?_pragma=auto_vacuum(INCREMENTAL)&_pragma=busy_timeout(10000)" +
		"&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_pragma=temp_store(MEMORY)" +
		"&_pragma=secure_delete(ON)&_pragma=journal_size_limit(" + fmt.Sprint(walSizeLimit) + ")"
	if s.writer, err = openPool(dsn, 1); err != nil {
		return fmt.Errorf("session cache database %s: %v", path, err)
	}
	if _, err := s.writer.Exec(schemaSQL); err != nil {
		return fmt.Errorf("session cache database %s: create schema: %v", path, err)
	}
	if s.reader, err = openPool(dsn, readerConns); err != nil {
		return fmt.Errorf("session cache database %s: %v", path, err)
	}
	if err := s.warm(s.writer, 1); err != nil {
		return err
	}
	if err := s.warm(s.reader, readerConns); err != nil {
		return err
	}
	// SQLite opened the file by name: make sure it is the one we created,
	// and that the -wal and -shm it made are as they should be.
	if err := sameFile(path, int(f.Fd()), uid); err != nil {
		return fmt.Errorf("session cache database: %v", err)
	}
	for _, suffix := range []string{"-wal", "-shm"} {
		if err := checkCompanion(path+suffix, uid); err != nil {
			return fmt.Errorf("session cache database: %v", err)
		}
	}
	for _, c := range s.caches {
		if err := s.prepare(c); err != nil {
			return err
		}
		if c.enabled() && c.logCache {
			msg.info("open %s TLS cache %s", c.label, c.database)
		}
	}
	return nil
}

// openPool opens a fixed-size pool whose connections are never closed.
func openPool(dsn string, n int) (*sql.DB, error) {
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(n)
	db.SetMaxIdleConns(n)
	db.SetConnMaxLifetime(0)
	db.SetConnMaxIdleTime(0)
	return db, nil
}

// warm opens all n connections of a pool at once and reads through each, so
// that each has the database, WAL and shared-memory files open before
// chroot; they then stay in the pool for the life of the process.
func (s *store) warm(db *sql.DB, n int) error {
	ctx := context.Background()
	conns := make([]*sql.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		c, err := db.Conn(ctx)
		if err != nil {
			return fmt.Errorf("session cache database %s: open connection: %v", s.path, err)
		}
		conns = append(conns, c)
		var count int
		if err := c.QueryRowContext(ctx, "SELECT count(*) FROM smtpd_cache").Scan(&count); err != nil {
			return fmt.Errorf("session cache database %s: %v", s.path, err)
		}
	}
	return nil
}

func (s *store) prepare(c *cache) error {
	t := c.label + "_cache"
	var err error
	for _, p := range []struct {
		stmt **sql.Stmt
		db   *sql.DB
		sql  string
	}{
		{&c.lookupStmt, s.reader, "SELECT session, expires FROM " + t + " WHERE id = ?"},
		{&c.expireStmt, s.writer, "DELETE FROM " + t + " WHERE id = ? AND expires < ?"},
		{&c.updateStmt, s.writer, "INSERT INTO " + t + " (id, session, stored, expires) VALUES (?, ?, ?, ?)" +
			" ON CONFLICT (id) DO UPDATE SET session = excluded.session, stored = excluded.stored, expires = excluded.expires"},
		{&c.deleteStmt, s.writer, "DELETE FROM " + t + " WHERE id = ?"},
		{&c.sweepStmt, s.writer, "DELETE FROM " + t + " WHERE rowid IN (SELECT rowid FROM " + t + " WHERE expires <= ? LIMIT ?)"},
		{&c.existsStmt, s.reader, "SELECT 1 FROM " + t + " WHERE id = ?"},
	} {
		if *p.stmt, err = p.db.Prepare(p.sql); err != nil {
			return fmt.Errorf("session cache database %s: prepare %q: %v", s.path, p.sql, err)
		}
	}
	return nil
}

// close checkpoints the WAL and truncates it through the open connection
// (in a chroot SQLite cannot remove it by name, and a -wal left behind
// would hold deleted sessions), closes every connection, and releases the
// lock, in that order.
func (s *store) close() {
	if s.closed {
		return
	}
	s.closed = true
	if s.reader != nil {
		s.reader.Close()
	}
	if s.writer != nil {
		if _, err := s.writer.Exec("PRAGMA wal_checkpoint(TRUNCATE)"); err != nil {
			msg.warn("session cache database %s: checkpoint at exit: %v", s.path, err)
		}
		s.writer.Close()
	}
	if s.lock != nil {
		s.lock.Close()
	}
}

// ping is the watchdog's probe: the writer connection can still be taken.
func (s *store) ping() {
	if s.writer != nil {
		s.writer.Exec("SELECT 1")
	}
}

// writeFailed reports a failed write at most once a minute: a full disk or
// a read-only file turns every update into one, and the log must not fill
// up with them. Storing resumes by itself when the fault goes away.
func (s *store) writeFailed(c *cache, what, id string, err error) {
	msg.warnLimited("cache write", "%s TLS cache: cannot %s entry %s: %v; session not cached", c.label, what, id, err)
}

// lookup returns the session and statOK, or statErr for a missing or
// expired entry (which it deletes). An entry is fresh while
// stored + timeout >= now, as in tls_scache.c.
func (s *store) lookup(c *cache, id string) ([]byte, int) {
	if c.logCache {
		msg.info("lookup %s session id=%s", c.label, id)
	}
	if s.hiddenCount.Load() > 0 && s.isHidden(c, id) {
		return nil, statErr
	}
	var session []byte
	var expires int64
	err := c.lookupStmt.QueryRow(id).Scan(&session, &expires)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, statErr
	}
	if err != nil {
		msg.warnLimited("cache read", "%s TLS cache: cannot look up entry %s: %v", c.label, id, err)
		return nil, statErr
	}
	now := s.now().Unix()
	if expires < now {
		if _, err := c.expireStmt.Exec(id, now); err != nil {
			s.writeFailed(c, "delete expired", id, err)
		}
		return nil, statErr
	}
	if c.logCache {
		msg.info("read %s TLS cache entry %s: time=%d [data %d bytes]", c.label, id, expires-c.timeout, len(session))
	}
	return session, statOK
}

func (s *store) update(c *cache, id string, session []byte) int {
	now := s.now().Unix()
	if c.logCache {
		msg.info("put %s session id=%s [data %d bytes]", c.label, id, len(session))
	}
	if session == nil {
		session = []byte{} // NOT NULL: an empty session is still a session
	}
	if _, err := c.updateStmt.Exec(id, session, now, now+c.timeout); err != nil {
		s.writeFailed(c, "store", id, err)
		s.hide(c, id)  // the session it replaces must not come back
		return statErr // clients treat it as "not cached"
	}
	if c.logCache {
		msg.info("write %s TLS cache entry %s: time=%d [data %d bytes]", c.label, id, now, len(session))
	}
	if s.hiddenCount.Load() > 0 {
		s.unhide(c, id)
		s.flushHidden()
	}
	return statOK
}

func (s *store) remove(c *cache, id string) int {
	if c.logCache {
		msg.info("delete %s session id=%s", c.label, id)
	}
	if s.hiddenCount.Load() > 0 && s.isHidden(c, id) {
		return statErr // already deleted, as far as clients can tell
	}
	res, err := c.deleteStmt.Exec(id)
	if err != nil {
		s.writeFailed(c, "delete", id, err)
		if s.hide(c, id) {
			return statOK // gone for every lookup; the row goes when it can
		}
		return statErr
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return statErr
	}
	if s.hiddenCount.Load() > 0 {
		s.flushHidden()
	}
	return statOK
}

// hide makes lookups miss an existing row whose delete or replacement
// failed. It reports whether the row existed and is now hidden.
func (s *store) hide(c *cache, id string) bool {
	if err := c.existsStmt.QueryRow(id).Scan(new(int)); err != nil {
		return false // no such row: nothing to hide
	}
	s.hiddenMu.Lock()
	defer s.hiddenMu.Unlock()
	if len(s.hidden) >= maxHidden {
		return false
	}
	if s.hidden == nil {
		s.hidden = map[hiddenEntry]struct{}{}
	}
	s.hidden[hiddenEntry{c.label, id}] = struct{}{}
	s.hiddenCount.Store(int64(len(s.hidden)))
	return true
}

func (s *store) isHidden(c *cache, id string) bool {
	s.hiddenMu.Lock()
	defer s.hiddenMu.Unlock()
	_, hidden := s.hidden[hiddenEntry{c.label, id}]
	return hidden
}

func (s *store) unhide(c *cache, id string) {
	s.hiddenMu.Lock()
	defer s.hiddenMu.Unlock()
	delete(s.hidden, hiddenEntry{c.label, id})
	s.hiddenCount.Store(int64(len(s.hidden)))
}

// flushHidden deletes hidden rows now that writes work again, a few at a
// time so that no request waits long for it.
func (s *store) flushHidden() {
	s.hiddenMu.Lock()
	var batch []hiddenEntry
	for e := range s.hidden {
		if batch = append(batch, e); len(batch) == 100 {
			break
		}
	}
	s.hiddenMu.Unlock()
	for _, e := range batch {
		if _, err := s.caches[e.cache].deleteStmt.Exec(e.id); err != nil {
			return // still failing: the next successful write tries again
		}
		s.unhide(s.caches[e.cache], e.id)
	}
}

// sweepExpired deletes every expired entry of one cache, a batch per
// statement, so that a lookup or update waits at most one batch. It stops
// early when stop is closed (we are exiting).
func (s *store) sweepExpired(c *cache, stop <-chan struct{}) (int64, error) {
	var total int64
	cutoff := s.now().Unix() - 1 // expired means expires < now, as for lookup
	for {
		select {
		case <-stop:
			return total, nil
		default:
		}
		res, err := c.sweepStmt.Exec(cutoff, s.sweepBatch)
		if err != nil {
			return total, err
		}
		n, _ := res.RowsAffected()
		total += n
		if n < int64(s.sweepBatch) {
			return total, nil
		}
	}
}

// shrink gives the pages that deleted sessions occupied back to the file
// system once they are a quarter of the file (secure_delete has already
// zeroed them), in steps of vacuumStep pages so that a writer waits at most
// one step.
func (s *store) shrink() error {
	const vacuumStep = 1000
	var free, total int64
	if err := s.writer.QueryRow("PRAGMA freelist_count").Scan(&free); err != nil {
		return err
	}
	if err := s.writer.QueryRow("PRAGMA page_count").Scan(&total); err != nil {
		return err
	}
	if free < 256 || free*4 < total {
		return nil
	}
	for ; free > 0; free -= vacuumStep {
		if _, err := s.writer.Exec(fmt.Sprintf("PRAGMA incremental_vacuum(%d)", vacuumStep)); err != nil {
			return err
		}
	}
	return nil
}

// runSweeper sweeps one cache now and then every timeout seconds, like
// tlsmgr's cleanup timer, until stop is closed.
func (s *store) runSweeper(c *cache, stop <-chan struct{}, wg *sync.WaitGroup) {
	defer wg.Done()
	tick := time.NewTicker(time.Duration(c.timeout) * time.Second)
	defer tick.Stop()
	for {
		if c.logCache {
			msg.info("tlsmgr_cache_run_event: start TLS %s session cache cleanup", c.label)
		}
		n, err := s.sweepExpired(c, stop)
		if err != nil {
			msg.warnLimited("cache write", "%s TLS cache: cleanup: %v", c.label, err)
		} else {
			msg.debug("%s TLS cache: cleanup removed %d entries", c.label, n)
		}
		if s.hiddenCount.Load() > 0 {
			s.flushHidden()
		}
		if n > 0 {
			if err := s.shrink(); err != nil {
				msg.warnLimited("cache write", "session cache database %s: shrink: %v", s.path, err)
			}
		}
		select {
		case <-stop:
			return
		case <-tick.C:
		}
	}
}

// tlsLogMask is the part of Postfix's tls_log_mask that matters to tlsmgr:
// whether the "cache" feature is on (level 2 and up, or the keyword).
const logMaskCache = 1 << 0

func tlsLogMask(level string) (int, error) {
	mask := 0
	for _, word := range strings.FieldsFunc(strings.ToLower(level), func(r rune) bool { return r == ',' || r == ' ' || r == '\t' }) {
		switch word {
		case "0", "none", "1", "routine", "summary", "untrusted", "peercert", "certmatch", "verbose", "dane", "ssl-debug", "ssl-handshake-packet-dump":
		case "2", "debug", "3", "ssl-expert", "4", "5", "6", "7", "8", "9", "ssl-developer", "cache":
			mask |= logMaskCache
		default:
			return 0, fmt.Errorf("unknown TLS log level keyword %q (allowed: 0-9, none, routine, debug, ssl-expert, ssl-developer, summary, untrusted, peercert, certmatch, verbose, cache, dane, ssl-debug)", word)
		}
	}
	return mask, nil
}
