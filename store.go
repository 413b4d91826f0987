// The three TLS session caches (smtpd, smtp, lmtp) as tables of one SQLite
// file, with an expiry index that a sweep goroutine per cache uses to
// delete expired sessions in small batches.
//
// SECURITY: cache ids and sessions come from Postfix daemons and are stored
// as opaque bytes through bound parameters; nothing a client sends is ever
// part of SQL text. The file is 0600 and owned by mail_owner; every
// connection is opened before chroot and kept open, because nothing can be
// reopened by path afterwards.

package main

import (
	"context"
	"database/sql"
	_ "embed"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	_ "modernc.org/sqlite"
)

//go:embed schema.sql
var schemaSQL string

// readerConns is the size of the read pool; WAL lets readers run beside the
// one writer, and two cores gain nothing from more.
const readerConns = 4

// Lookup, update and delete results, as tlsmgr sends them (postfix-tlsmgr.md §2).
const (
	statOK   = 0
	statErr  = -1 // not found, or no usable key
	statFail = -2 // bad request, unknown or disabled cache
)

// cache is one of smtpd, smtp, lmtp.
type cache struct {
	label    string // smtpd, smtp or lmtp: the cache_type on the wire
	database string // *_tls_session_cache_database; non-empty enables the cache
	timeout  int64  // effective timeout in seconds, 0 = disabled
	logCache bool   // the "cache" bit of *_tls_loglevel

	lookupStmt, expireStmt, updateStmt, deleteStmt, sweepStmt *sql.Stmt
}

func (c *cache) enabled() bool { return c.database != "" && c.timeout > 0 }

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
	writer     *sql.DB // one connection: SQLite has one writer at a time anyway
	reader     *sql.DB
	caches     map[string]*cache
	sweepBatch int
	now        func() time.Time
}

// cacheConfig is what openStore needs to know about one cache.
type cacheConfig struct {
	label, database, loglevel string
	timeout                   int64
}

// openStore opens (creating if needed) the SQLite file, empties the caches
// as Postfix does at every start, and opens every connection it will use.
func openStore(path string, caches []cacheConfig, uid, gid int, sweepBatch int) (*store, error) {
	seen := map[string]string{}
	s := &store{path: path, caches: map[string]*cache{}, sweepBatch: sweepBatch, now: time.Now}
	for _, cc := range caches {
		c := &cache{label: cc.label, database: cc.database, timeout: effectiveTimeout(cc.timeout)}
		mask, err := tlsLogMask(cc.loglevel)
		if err != nil {
			msg.warn("%s_tls_loglevel: %v", cc.label, err)
		}
		c.logCache = mask&logMaskCache != 0
		if c.enabled() {
			if other, dup := seen[c.database]; dup {
				return nil, fmt.Errorf("do not use the same TLS cache file %s for %s and %s", c.database, other, c.label)
			}
			seen[c.database] = c.label
		}
		s.caches[c.label] = c
	}

	// Create the file ourselves so that it is 0600 and mail_owner's; SQLite
	// gives its -wal and -shm files the same mode and owner.
	f, err := openOwned(path, uid, gid)
	if err != nil {
		return nil, fmt.Errorf("cannot open session cache database %s: %s (check tlsmgr_database and data_directory)", path, errText(err))
	}
	f.Close()

	dsn := "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)" +
		"&_pragma=synchronous(NORMAL)&_pragma=temp_store(MEMORY)"
	if s.writer, err = openPool(dsn, 1); err != nil {
		return nil, fmt.Errorf("session cache database %s: %v", path, err)
	}
	if _, err := s.writer.Exec(schemaSQL); err != nil {
		s.close()
		return nil, fmt.Errorf("session cache database %s: create schema: %v", path, err)
	}
	for _, c := range s.caches {
		if _, err := s.writer.Exec("DELETE FROM " + c.label + "_cache"); err != nil {
			s.close()
			return nil, fmt.Errorf("session cache database %s: empty %s cache: %v", path, c.label, err)
		}
	}
	if s.reader, err = openPool(dsn, readerConns); err != nil {
		s.close()
		return nil, fmt.Errorf("session cache database %s: %v", path, err)
	}
	if err := s.warm(s.writer, 1); err != nil {
		s.close()
		return nil, err
	}
	if err := s.warm(s.reader, readerConns); err != nil {
		s.close()
		return nil, err
	}
	for _, c := range s.caches {
		if err := s.prepare(c); err != nil {
			s.close()
			return nil, err
		}
		if c.enabled() && c.logCache {
			msg.info("open %s TLS cache %s", c.label, c.database)
		}
	}
	return s, nil
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
	} {
		if *p.stmt, err = p.db.Prepare(p.sql); err != nil {
			return fmt.Errorf("session cache database %s: prepare %q: %v", s.path, p.sql, err)
		}
	}
	return nil
}

func (s *store) close() {
	if s.reader != nil {
		s.reader.Close()
	}
	if s.writer != nil {
		s.writer.Close()
	}
}

// lookup returns the session and statOK, or statErr for a missing or
// expired entry (which it deletes). An entry is fresh while
// stored + timeout >= now, as in tls_scache.c.
func (s *store) lookup(c *cache, id string) ([]byte, int) {
	if c.logCache {
		msg.info("lookup %s session id=%s", c.label, id)
	}
	var session []byte
	var expires int64
	err := c.lookupStmt.QueryRow(id).Scan(&session, &expires)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, statErr
	}
	if err != nil {
		msg.warn("%s TLS cache: lookup %s: %v", c.label, id, err)
		return nil, statErr
	}
	now := s.now().Unix()
	if expires < now {
		if _, err := c.expireStmt.Exec(id, now); err != nil {
			msg.warn("%s TLS cache: delete expired %s: %v", c.label, id, err)
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
		msg.warn("%s TLS cache: cannot store entry %s: %v", c.label, id, err)
		return statFail
	}
	if c.logCache {
		msg.info("write %s TLS cache entry %s: time=%d [data %d bytes]", c.label, id, now, len(session))
	}
	return statOK
}

func (s *store) remove(c *cache, id string) int {
	if c.logCache {
		msg.info("delete %s session id=%s", c.label, id)
	}
	res, err := c.deleteStmt.Exec(id)
	if err != nil {
		msg.warn("%s TLS cache: cannot delete entry %s: %v", c.label, id, err)
		return statFail
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return statErr
	}
	return statOK
}

// sweepExpired deletes every expired entry of one cache, a batch per
// statement, so that a lookup or update waits at most one batch.
func (s *store) sweepExpired(c *cache) (int64, error) {
	var total int64
	cutoff := s.now().Unix() - 1 // expired means expires < now
	for {
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
		n, err := s.sweepExpired(c)
		if err != nil {
			msg.warn("%s TLS cache: cleanup: %v", c.label, err)
		} else {
			msg.debug("%s TLS cache: cleanup removed %d entries", c.label, n)
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
