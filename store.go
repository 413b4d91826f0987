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
	"crypto/sha256"
	"database/sql"
	"database/sql/driver"
	_ "embed"
	"encoding/binary"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	sqlite "modernc.org/sqlite"
)

//go:embed schema.sql
var schemaSQL string

// readerConns is the size of the read pool beside the lookups' own
// connections (lookup.go): it reads for everything else.
const readerConns = 1

// walSizeLimit bounds the -wal file: after a checkpoint SQLite truncates it
// to this size, so it neither grows without bound nor keeps old session
// pages around for long.
const walSizeLimit = 4 << 20

// pageSize is the database page size. A 2,000-byte session, more than a
// 2 KiB page holds, goes to one overflow page and leaves about 240 bytes
// in a leaf shared with eight others: 2.4 KB a session on disk. On 4 KiB
// pages one such row fills a page, 4.2 KB a session.
const pageSize = 2048

// Lookup, update and delete results, as tlsmgr sends them (postfix-tlsmgr.md §2).
const (
	statOK   = 0
	statErr  = -1 // not found, not stored, or no usable key
	statFail = -2 // bad request, unknown or disabled cache
)

// cache is one of smtpd, smtp, lmtp.
type cache struct {
	label    string       // smtpd, smtp or lmtp: the cache_type on the wire
	database string       // *_tls_session_cache_database; non-empty enables the cache
	timeout  int64        // effective timeout in seconds, 0 = disabled
	logCache bool         // the "cache" bit of *_tls_loglevel
	offline  atomic.Bool  // the database could not be opened: no caching in this process
	shared   *sharedStore // tlsmgr_shared_caches names it: its sessions live there, not in SQLite

	entryLimit, sizeLimit int64        // tlsmgr_<label>_session_cache_{entry,size}_limit; 0 = none
	entries, bytes        atomic.Int64 // what the table holds now (bytes of session)
	count                 cacheCounters

	sizeStmt, expireStmt, updateStmt, deleteStmt, sweepStmt, evictStmt driver.Stmt // the writer's
	existsStmt                                                         *sql.Stmt
}

// offline turns every cache off in this process: the database could not
// be opened.
func (s *store) offline() {
	for _, c := range s.caches {
		c.offline.Store(true)
	}
	s.doneOpening()
}

func (s *store) doneOpening() { s.openedOnce.Do(func() { close(s.opened) }) }

// openWait is how long cache requests wait at start for a database that
// is still being opened (usually some milliseconds): from then on, until
// it is open, a lookup misses at once and an update is not stored, as for
// a cache that cannot write.
const openWait = time.Second

// usable says whether cache requests can be served, waiting while the
// database is being opened, until openBy at the latest.
func (s *store) usable() bool {
	if s.ready.Load() {
		return true
	}
	wait := time.Until(s.openBy)
	if wait <= 0 {
		return false
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-s.opened:
	case <-t.C:
	}
	return s.ready.Load()
}

// configured is what main.cf asks for; enabled is what this process does.
func (c *cache) configured() bool { return c.database != "" && c.timeout > 0 }
func (c *cache) enabled() bool    { return c.configured() && (c.shared != nil || !c.offline.Load()) }

// evictBatch is how many of the oldest sessions go at once when the cache
// is full: a twentieth of the limit, so that a full cache is not trimmed
// on every update, and never more than one sweep batch.
func (c *cache) evictBatch(sweepBatch int) int64 {
	n := int64(100)
	if c.entryLimit > 0 {
		n = c.entryLimit / 20
	}
	return max(1, min(n, int64(sweepBatch)))
}

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
	path        string
	uid         int         // mail_owner's: every file must belong to it
	lock        *os.File    // held for the life of the process: one tlsmgr per database
	files       [3]*os.File // the database, its -wal and its -shm, opened in pre-init
	pins        *pinnedDB   // their names for SQLite
	writer      *sql.DB     // one connection: SQLite has one writer at a time anyway
	reader      *sql.DB
	lookups     chan *lookupConn // lookup.go; nil entries once closed
	lookupsOpen int
	caches      map[string]*cache
	sweepBatch  int
	now         func() time.Time
	closed      bool
	ready       atomic.Bool   // open has succeeded
	opened      chan struct{} // closed once open has finished, or will never run
	openBy      time.Time     // until when requests wait for open (openWait after the start)

	// keptKeys, when set, learns the kept ticket keys as soon as the kept
	// database's schema and its ticket_keys table have passed their check,
	// before the rest of the file is checked and before open goes on to
	// write to it (which another process holding the database can delay),
	// or that there are none: once, from open.
	keptKeys     func(keys []ticketKey, err error)
	keptKeysOnce sync.Once
	openedOnce   sync.Once

	// keepSessions and keepKeys are tlsmgr_keep_sessions and
	// tlsmgr_keep_ticket_keys: with either, the database survives a
	// restart; kept says whether this start found one to continue.
	keepSessions, keepKeys, kept bool

	// Every write goes through one writer goroutine (writer.go), which
	// makes each write and what it counts one step: the entry and byte
	// counts that the limits use must match the table.
	queueMu                             sync.Mutex
	queue, batch                        []*writeRequest // waiting; being committed (reused)
	leading, writesStopped              bool
	backgroundWaited                    int        // transactions a background write waited through
	idle                                *sync.Cond // no transaction under way
	tx                                  writeTx    // the leader's
	beginStmt, commitStmt, rollbackStmt driver.Stmt
	writeStmts                          []driver.Stmt // all the writer's, to close
	committed                           atomic.Int64  // writes since the last checkpoint
	checkpointNow                       chan struct{}
	checkpointer                        *sql.DB // one connection of its own
	stopCheckpoints, checkpointerDone   chan struct{}

	service serviceCounters
	since   int64 // when the counters began

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

// schemaVersion is schema.sql's user_version: a kept database of another
// version is set aside, but for one of the version before, which is
// brought to this one (upgradeKept).
const schemaVersion = 5

// cacheConfig is what newStore needs to know about one cache.
type cacheConfig struct {
	label, database, loglevel string
	timeout                   int64
	entryLimit, sizeLimit     int64
}

// storeOptions are the parameters that concern the database as a whole.
type storeOptions struct {
	sweepBatch             int
	keepSessions, keepKeys bool
}

// newStore checks the cache configuration; a database named twice is
// Postfix's fatal error. It opens nothing.
func newStore(caches []cacheConfig, opts storeOptions) (*store, error) {
	seen := map[string]string{}
	s := &store{caches: map[string]*cache{}, sweepBatch: opts.sweepBatch, now: time.Now,
		keepSessions: opts.keepSessions, keepKeys: opts.keepKeys, opened: make(chan struct{})}
	s.since = s.now().Unix()
	for _, cc := range caches {
		c := &cache{label: cc.label, database: cc.database, timeout: effectiveTimeout(cc.timeout),
			entryLimit: cc.entryLimit, sizeLimit: cc.sizeLimit}
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

// openFiles is the store's part of pre-init, run with mail_owner's
// effective uid and gid while the real and saved uids are still root's:
// it takes the database lock and opens the database, its -wal and its
// -shm, and nothing in them is read. Without tlsmgr_keep_sessions or
// tlsmgr_keep_ticket_keys it replaces whatever is at path with new, empty
// files, as Postfix empties its caches at start; with either, it keeps
// the files it finds (a link, a foreign file or a file with other links is
// replaced), for open to check once privileges are gone. On error nothing
// is left open; the caller decides whether that stops us (a second
// standalone daemon) or only costs caching.
func (s *store) openFiles(path string, uid int, lockWait time.Duration) (err error) {
	s.path, s.uid = path, uid
	wanted := s.keepKeys
	for _, c := range s.caches {
		wanted = wanted || c.configured()
	}
	if !wanted {
		return nil // no cache is on and no key is kept: no database to hold
	}
	defer func() {
		if err != nil {
			s.closeFiles()
		}
	}()
	if s.lock, err = lockDatabase(path, uid, lockWait); err != nil {
		return err
	}
	if s.keepSessions || s.keepKeys {
		if err := s.openKeptFiles(path, uid); err != nil {
			return err
		}
	}
	if s.files[0] == nil {
		for _, suffix := range []string{"", "-wal", "-shm", "-journal"} {
			if err := removeName(path + suffix); err != nil {
				return fmt.Errorf("cannot remove the old session cache: %s", errText(err))
			}
		}
		for i, suffix := range []string{"", "-wal", "-shm"} {
			if s.files[i], err = createDataFile(path+suffix, uid, nil); err != nil {
				return fmt.Errorf("cannot create session cache database %s: %s", path, errText(err))
			}
		}
	}
	return nil
}

// openKeptFiles opens the files a previous tlsmgr left, when their names
// lead to files fit to be opened; it leaves s.files empty when there is no
// database, or it was refused and a new one must be made. Their content is
// not looked at here.
func (s *store) openKeptFiles(path string, uid int) error {
	f, err := openDataFile(path, uid)
	var bad *badFileError
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case errors.As(err, &bad):
		msg.warn("refusing session cache database %s: %s; replacing it", path, bad.why)
		return nil // openFiles removes it and its companions
	case err != nil:
		return fmt.Errorf("session cache database %s: %s", path, errText(err))
	}
	s.files[0] = f
	// tlsmgr always runs in WAL mode: a -journal is never its own.
	if err := removeName(path + "-journal"); err != nil {
		return err
	}
	for i, suffix := range []string{"-wal", "-shm"} {
		if s.files[i+1], err = openOrCreateDataFile(path+suffix, "session cache file", uid, func() []byte { return nil }, nil); err != nil {
			return fmt.Errorf("session cache database %s: %s", path+suffix, errText(err))
		}
	}
	s.kept = true // until open has checked what is in it
	return nil
}

// closeFiles closes what openFiles opened; SQLite must have closed its
// copies of the descriptors first.
func (s *store) closeFiles() {
	for i, f := range s.files {
		if f != nil {
			f.Close()
			s.files[i] = nil
		}
	}
	if s.lock != nil {
		s.lock.Close()
		s.lock = nil
	}
}

// open is the store's part of post-init, run once no uid is root's: it
// hands SQLite the files that openFiles opened (pin.go), checks a kept
// database before any of its rows is used, and opens every connection the
// process will use. A kept database that is not exactly ours (its schema,
// down to the SQL text), that fails SQLite's quick_check, or that cannot
// be read, is emptied with one warning and started again: it may come
// from anyone who had the postfix account. On error the caches are
// offline.
func (s *store) open(ctx context.Context) (err error) {
	defer s.doneOpening()
	defer s.tellKeptKeys(nil, nil) // no kept database, or it was not usable
	if s.files[0] == nil {
		return nil
	}
	defer func() {
		if err != nil {
			// Caching is off in this process; the lock stays ours.
			s.closeDB(false)
			for i, f := range s.files {
				f.Close()
				s.files[i] = nil
			}
			s.offline()
		}
	}()
	s.pins = pinFiles(s.files[0], s.files[1], s.files[2])
	name := s.pins.name
	if !s.kept {
		s.tellKeptKeys(nil, nil)
	} else {
		why, keys, keysErr := s.checkKept(ctx, name)
		if why == "" {
			s.tellKeptKeys(keys, keysErr)
		}
		if why != "" {
			if ctx.Err() != nil {
				return fmt.Errorf("session cache database %s: not checked: the start was cut short (%v)", s.path, ctx.Err())
			}
			msg.warn("session cache database %s %s; emptied it and started a new one", s.path, why)
			s.kept = false
			for _, f := range s.files {
				if err := f.Truncate(0); err != nil {
					return fmt.Errorf("session cache database %s: cannot empty it: %s", s.path, errText(err))
				}
			}
		}
	}
	if s.writer, err = openPool(name, 1, false); err != nil {
		return fmt.Errorf("session cache database %s: %v", s.path, err)
	}
	if !s.kept {
		// What a database keeps from its creation: the page size, and WAL
		// mode, which writes the first page (through an in-memory journal:
		// only the pinned files exist for SQLite). There is no auto_vacuum:
		// it costs every write a pointer-map page, and giving pages back
		// after a sweep stalls writers for seconds; freed pages are zeroed
		// (secure_delete) and new sessions reuse them.
		for _, pragma := range []string{"page_size = " + fmt.Sprint(pageSize), "journal_mode = MEMORY", "journal_mode = WAL"} {
			if _, err := s.writer.ExecContext(ctx, "PRAGMA "+pragma); err != nil {
				return fmt.Errorf("session cache database %s: PRAGMA %s: %v", s.path, pragma, err)
			}
		}
		if _, err := s.writer.ExecContext(ctx, schemaSQL); err != nil {
			return fmt.Errorf("session cache database %s: create schema: %v", s.path, err)
		}
	}
	if s.reader, err = openPool(name, readerConns+lookupConns, false); err != nil {
		return fmt.Errorf("session cache database %s: %v", s.path, err)
	}
	if s.checkpointer, err = openPool(name, 1, false); err != nil {
		return fmt.Errorf("session cache database %s: %v", s.path, err)
	}
	for _, pool := range []struct {
		db *sql.DB
		n  int
	}{{s.writer, 1}, {s.reader, readerConns + lookupConns}, {s.checkpointer, 1}} {
		if err := s.warm(ctx, pool.db, pool.n); err != nil {
			return err
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
	if err := s.openLookups(s.reader); err != nil {
		return fmt.Errorf("session cache database %s: %v", s.path, err)
	}
	if s.kept {
		if err := s.continueKept(ctx); err != nil {
			return fmt.Errorf("session cache database %s: %v", s.path, err)
		}
	}
	if err := s.prepareWriter(); err != nil {
		return fmt.Errorf("session cache database %s: %v", s.path, err)
	}
	if err := s.startWriter(); err != nil {
		return fmt.Errorf("session cache database %s: %v", s.path, err)
	}
	s.ready.Store(true)
	return nil
}

// keptCheckLimit bounds how long a kept database is checked at start.
const keptCheckLimit = 10 * time.Second

// checkKept says what is wrong with a kept database, or "": it must be a
// WAL database of our schema version whose sqlite_schema is exactly ours
// (so it has no view, trigger or table of anyone else's to run), or
// exactly the version before's, which is then brought to ours
// (upgradeKept), and it must pass SQLite's quick_check first. The check itself runs with the
// untrusted-file settings, as the first statements on the file. The kept
// ticket keys, if they are kept, are read and told (tellKeptKeys) once
// the schema and their own table have passed, before the rest of the file
// is checked: reading waits for no other process.
func (s *store) checkKept(ctx context.Context, name string) (why string, keys []ticketKey, keysErr error) {
	db, err := openPool(name, 1, false)
	if err != nil {
		return "cannot be opened (" + err.Error() + ")", nil, nil
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(ctx, keptCheckLimit)
	defer cancel()
	version, why := keptSchemaProblem(ctx, db)
	if why != "" {
		return why, nil, nil
	}
	var mode string
	if err := db.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil || mode != "wal" {
		return fmt.Sprintf("is not in WAL mode (%q, %v)", mode, err), nil, nil
	}
	var check string
	// The ticket keys first, once their own table has passed quick_check:
	// tktkey waits for them for a second at most, and the whole file's
	// check can take longer than that for a large cache (20,000 sessions
	// under the race detector in CI did), after which a TLS 1.3 ticket
	// from before a restart would not resume. The keys stay in use even
	// if the rest of the file is then emptied.
	if s.keepKeys {
		if err := db.QueryRowContext(ctx, "PRAGMA quick_check(ticket_keys)").Scan(&check); err == nil && check == "ok" {
			keys, keysErr = readTicketKeys(ctx, db)
			if keysErr == nil {
				// An error is told only if the file passes: a file that is
				// then emptied has no unreadable keys left to protect.
				s.tellKeptKeys(keys, nil)
			}
		}
	}
	if err := db.QueryRowContext(ctx, "PRAGMA quick_check").Scan(&check); err != nil {
		return "is damaged (" + err.Error() + ")", keys, keysErr
	}
	if check != "ok" {
		return "is damaged (quick_check: " + sanitize(check) + ")", keys, keysErr
	}
	if version != schemaVersion {
		if why := upgradeKept(ctx, db); why != "" {
			return why, keys, keysErr
		}
		msg.info("session cache database %s: brought from schema version %d to %d", s.path, version, schemaVersion)
	}
	return "", keys, keysErr
}

// keptSchemaProblem is schemaProblem for a kept database, which may also
// be exactly the version before's (ourSchemaBefore): it says which.
func keptSchemaProblem(ctx context.Context, db schemaReader) (version int, why string) {
	if err := db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&version); err != nil {
		return 0, "is damaged (" + err.Error() + ")"
	}
	if version == schemaVersion-1 {
		return version, schemaDiffers(ctx, db, version, ourSchemaBefore)
	}
	return version, schemaProblem(ctx, db)
}

// upgradeKept brings a kept database that is exactly the version before
// schema.sql's (keptSchemaProblem), in WAL mode and whole (quick_check), to
// schema.sql's, in one write transaction that ends with schemaProblem's
// exact check as well: version 4 lacked peer_rpk, which each table gets as
// ALTER TABLE ... ADD COLUMN writes it into the table's SQL (schema.sql
// has it there for that reason), and the views that show it are made
// again. Rows stored before keep NULL there. Like every check, it runs once
// no uid is root's, and on nothing but our own schema: ALTER TABLE and
// DROP VIEW run no trigger and read no view.
func upgradeKept(ctx context.Context, db *sql.DB) string {
	fail := func(err error) string {
		return fmt.Sprintf("has schema version %d and cannot be brought to %d (%s)", schemaVersion-1, schemaVersion, sanitize(err.Error()))
	}
	conn, err := db.Conn(ctx)
	if err != nil {
		return fail(err)
	}
	defer conn.Close()
	// IMMEDIATE: the write lock from the start, so that no other writer
	// can change the file between this transaction's read and its write.
	if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return fail(err)
	}
	done := false
	defer func() {
		if !done {
			conn.ExecContext(context.Background(), "ROLLBACK")
		}
	}()
	steps := []string{"DROP VIEW cache_stats", "DROP VIEW sessions"}
	for _, label := range cacheLabels {
		steps = append(steps, "ALTER TABLE "+label+"_cache ADD COLUMN peer_rpk INTEGER")
	}
	for _, q := range append(steps, schemaSQL) {
		if _, err := conn.ExecContext(ctx, q); err != nil {
			return fail(err)
		}
	}
	if why := schemaProblem(ctx, conn); why != "" {
		return fmt.Sprintf("has schema version %d and, brought to %d, %s", schemaVersion-1, schemaVersion, why)
	}
	if _, err := conn.ExecContext(ctx, "COMMIT"); err != nil {
		return fail(err)
	}
	done = true
	return ""
}

// schemaReader is a *sql.DB, *sql.Conn or *sql.Tx.
type schemaReader interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// tellKeptKeys calls keptKeys, once.
func (s *store) tellKeptKeys(keys []ticketKey, err error) {
	s.keptKeysOnce.Do(func() {
		if s.keptKeys != nil {
			s.keptKeys(keys, err)
		}
	})
}

// schemaProblem says how a database's schema differs from schema.sql's, or
// "" when it is the same: every table, index and view, with its SQL text,
// and the user_version. Reading sqlite_schema runs nothing the file defines.
func schemaProblem(ctx context.Context, db schemaReader) string {
	return schemaDiffers(ctx, db, schemaVersion, ourSchema)
}

// schemaDiffers is schemaProblem against one version's schema.
func schemaDiffers(ctx context.Context, db schemaReader, wantVersion int, schema func() (map[string]string, error)) string {
	want, err := schema()
	if err != nil {
		return "cannot be compared with our schema (" + err.Error() + ")"
	}
	var version int
	if err := db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&version); err != nil {
		return "is damaged (" + err.Error() + ")"
	}
	if version != wantVersion {
		return fmt.Sprintf("has schema version %d, not %d", version, wantVersion)
	}
	have, err := readSchema(ctx, db)
	if err != nil {
		return "is damaged (" + err.Error() + ")"
	}
	for key, sqlText := range have {
		if wantText, ok := want[key]; !ok {
			return fmt.Sprintf("has a schema object of its own (%s)", sanitize(key))
		} else if wantText != sqlText {
			return fmt.Sprintf("has another definition of %s", sanitize(key))
		}
	}
	for key := range want {
		if _, ok := have[key]; !ok {
			return fmt.Sprintf("lacks %s", key)
		}
	}
	return ""
}

// readSchema is sqlite_schema by "type name on tbl_name", without the root
// pages, which differ from file to file.
func readSchema(ctx context.Context, db schemaReader) (map[string]string, error) {
	rows, err := db.QueryContext(ctx, "SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_schema")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	schema := map[string]string{}
	for rows.Next() {
		var typ, name, table, text string
		if err := rows.Scan(&typ, &name, &table, &text); err != nil {
			return nil, err
		}
		schema[typ+" "+name+" on "+table] = text
		if len(schema) > 100 {
			return nil, errors.New("more than 100 schema objects")
		}
	}
	return schema, rows.Err()
}

// ourSchema is schema.sql as SQLite records it, read from a database in
// memory that has nothing else.
var ourSchema = sync.OnceValues(func() (map[string]string, error) {
	db, err := sql.Open("sqlite", ":memory:")
	if err != nil {
		return nil, err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	if _, err := db.Exec(schemaSQL); err != nil {
		return nil, err
	}
	return readSchema(context.Background(), db)
})

// ourSchemaBefore is the previous version's schema (4) as SQLite records
// it: schema.sql's without peer_rpk, the one thing version 5 added to a
// table or view (TestSchemaBefore compares it with testdata/schema-v4.sql,
// version 4's schema.sql).
var ourSchemaBefore = sync.OnceValues(func() (map[string]string, error) {
	now, err := ourSchema()
	if err != nil {
		return nil, err
	}
	before := map[string]string{}
	for key, text := range now {
		before[key] = strings.ReplaceAll(strings.ReplaceAll(text, ", peer_rpk INTEGER", ""), ", peer_rpk", "")
	}
	return before, nil
})

// continueKept keeps of a previous process's database what the options
// say: sessions (and the counts that go with them), ticket keys, both,
// and the counters. Rows of caches that are off now are dropped (a DELETE
// without WHERE empties a table at once, it does not go row by row). A
// cache over a lowered limit is trimmed later, in sweep batches, while
// clients are served (trimToLimits).
func (s *store) continueKept(ctx context.Context) error {
	if !s.keepKeys {
		if _, err := s.writer.ExecContext(ctx, "DELETE FROM ticket_keys"); err != nil {
			return err
		}
	}
	for _, label := range cacheLabels {
		c := s.caches[label]
		if !s.keepSessions || !c.enabled() {
			if _, err := s.writer.ExecContext(ctx, "DELETE FROM "+label+"_cache"); err != nil {
				return err
			}
			continue
		}
		var n, bytes int64
		if err := s.writer.QueryRowContext(ctx, "SELECT count(*), coalesce(sum(length(session)), 0) FROM "+label+"_cache").Scan(&n, &bytes); err != nil {
			return err
		}
		c.entries.Store(n)
		c.bytes.Store(bytes)
	}
	return s.loadCounters(ctx)
}

// sqliteDriver opens every connection: openPool wraps it to set each
// connection up before database/sql hands it out.
var sqliteDriver = &sqlite.Driver{}

// untrustedPragmas treat a database file as hostile, as SQLite's own
// guidance for files of uncertain provenance says (sqlite.org/security.html,
// with _defensive in the name: SQLITE_DBCONFIG_DEFENSIVE): functions in a
// schema's views and triggers may not have side effects, every cell's size
// is checked against its page, and nothing is memory-mapped, so a damaged
// or crafted page is an error rather than a read out of bounds. They run
// first on every connection, before anything reads the schema.
var untrustedPragmas = []string{"trusted_schema = OFF", "cell_size_check = ON", "mmap_size = 0"}

// storePragmas are the daemon's settings.
//
// Nothing is synced (synchronous = OFF): the caches are disposable, as
// Postfix's own are (its btree cache never syncs); a sync holds the writer
// whenever the WAL restarts or a checkpoint ends, and measured, it cost
// update-heavy load at 4 connections a tenth of its throughput and a
// third of its p99. A crash of tlsmgr loses nothing (the kernel has every
// write); a kept database that a power failure damaged fails its check at
// start and is emptied, like any other damage.
var storePragmas = []string{"busy_timeout = 10000", "synchronous = OFF", "temp_store = MEMORY",
	"secure_delete = ON", "journal_size_limit = " + fmt.Sprint(walSizeLimit)}

// sqliteConnector opens connections to one database with the settings
// above, the untrusted-file ones first.
type sqliteConnector struct {
	dsn     string
	pragmas []string
}

func (c sqliteConnector) Connect(ctx context.Context) (driver.Conn, error) {
	conn, err := sqliteDriver.Open(c.dsn)
	if err != nil {
		return nil, err
	}
	auth, ok := conn.(sqlite.AuthorizerRegisterer)
	if !ok {
		conn.Close()
		return nil, errors.New("the SQLite driver cannot install an authorizer")
	}
	if err := auth.RegisterAuthorizer(authorizeOurs); err != nil {
		conn.Close()
		return nil, err
	}
	for _, p := range c.pragmas {
		if _, err := conn.(driver.ExecerContext).ExecContext(ctx, "PRAGMA "+p, nil); err != nil {
			conn.Close()
			return nil, fmt.Errorf("PRAGMA %s: %v", p, err)
		}
	}
	return conn, nil
}

func (c sqliteConnector) Driver() driver.Driver { return sqliteDriver }

// authorizeOurs is every connection's authorizer. tlsmgr's own statements
// use no view, trigger, recursive query or attached database; whoever has
// the postfix account can add a trigger or a view to a database while it
// is in use, so anything a trigger or view would do is refused
// (SQLITE_DENY): a statement that would fire a planted trigger fails, with
// "not authorized", and runs nothing. (SQLITE_IGNORE would not do: a
// DELETE in a trigger still runs under it, with its conditions read as
// NULL.) It is consulted when a statement is prepared, not when it runs.
func authorizeOurs(action sqlite.AuthorizerActionCode, _, _, _, triggerOrView string) sqlite.AuthorizerReturnCode {
	switch {
	case triggerOrView != "":
		return sqlite.AuthorizerDeny
	case action == sqlite.AuthAttach, action == sqlite.AuthDetach, action == sqlite.AuthRecursive,
		action == sqlite.AuthCreateVTable, action == sqlite.AuthDropVTable:
		return sqlite.AuthorizerDeny
	}
	return sqlite.AuthorizerOK
}

// openPool opens a fixed-size pool of connections to name (a pinned name,
// or a path for -stats), set up as untrusted, whose connections are never
// closed. readOnly opens it for reading only.
func openPool(name string, n int, readOnly bool) (*sql.DB, error) {
	dsn := "file:" + (&url.URL{Path: name}).EscapedPath() + "?_defensive=1" // a ? or # in a path is not a parameter
	pragmas := append([]string(nil), untrustedPragmas...)
	if readOnly {
		dsn += "&mode=ro"
		pragmas = append(pragmas, "busy_timeout = 5000", "query_only = ON")
	} else {
		pragmas = append(pragmas, storePragmas...)
	}
	db := sql.OpenDB(sqliteConnector{dsn: dsn, pragmas: pragmas})
	db.SetMaxOpenConns(n)
	db.SetMaxIdleConns(n)
	db.SetConnMaxLifetime(0)
	db.SetConnMaxIdleTime(0)
	return db, nil
}

// warm opens all n connections of a pool at once and reads through each, so
// that each has the database, WAL and shared-memory files open before
// chroot; they then stay in the pool for the life of the process.
func (s *store) warm(ctx context.Context, db *sql.DB, n int) error {
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

// prepare prepares a cache's statements: the writer's at the driver level
// on its one connection (writer.go), the rest on the read pool.
func (s *store) prepare(c *cache) error {
	t := c.label + "_cache"
	for _, p := range []struct {
		stmt *driver.Stmt
		sql  string
	}{
		{&c.sizeStmt, "SELECT length(session) FROM " + t + " WHERE hash = ?"},
		{&c.expireStmt, "DELETE FROM " + t + " WHERE hash = ? AND id = ? AND expires < ? RETURNING length(session)"},
		{&c.updateStmt, "INSERT INTO " + t + " (hash, id, session, stored, expires, " + decodedColumns + ")" +
			" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hash) DO UPDATE SET" +
			" id = excluded.id, session = excluded.session, stored = excluded.stored, expires = excluded.expires" + decodedUpdates},
		{&c.deleteStmt, "DELETE FROM " + t + " WHERE hash = ? AND id = ? RETURNING length(session)"},
		{&c.sweepStmt, "DELETE FROM " + t + " WHERE rowid IN (SELECT rowid FROM " + t + " WHERE expires <= ? LIMIT ?) RETURNING length(session)"},
		{&c.evictStmt, "DELETE FROM " + t + " WHERE rowid IN (SELECT rowid FROM " + t + " ORDER BY expires LIMIT ?) RETURNING length(session)"},
	} {
		if err := s.prepareWrite(p.stmt, p.sql); err != nil {
			return fmt.Errorf("session cache database %s: prepare %q: %v", s.path, p.sql, err)
		}
	}
	var err error
	if c.existsStmt, err = s.reader.Prepare("SELECT 1 FROM " + t + " WHERE hash = ? AND id = ?"); err != nil {
		return fmt.Errorf("session cache database %s: %v", s.path, err)
	}
	return nil
}

// rowKey is where the row of a cache id is: the first 63 bits of its
// SHA-256, the table's rowid. A hash a client cannot steer, so no client
// can pick ids that collide with another's.
func rowKey(id string) int64 {
	sum := sha256.Sum256([]byte(id))
	return int64(binary.BigEndian.Uint64(sum[:8]) >> 1)
}

// decodedColumns are the columns decodeSession fills, in decodedValues' order.
const decodedColumns = "protocol, cipher, session_time, session_timeout, sni, ticket, ticket_lifetime," +
	" verify_result, peer_subject, peer_issuer, peer_fingerprint, peer_not_after, peer_rpk"

var decodedUpdates = func() string {
	var b strings.Builder
	for _, col := range strings.Split(decodedColumns, ",") {
		col = strings.TrimSpace(col)
		fmt.Fprintf(&b, ", %s = excluded.%s", col, col)
	}
	return b.String()
}()

// decodedValues are the column values for a session: all NULL when it
// does not decode.
func decodedValues(blob []byte) []any {
	values := make([]any, 13)
	info, err := decodeSession(blob)
	if err != nil {
		return values
	}
	copy(values, []any{info.protocol, info.cipher, info.time, info.timeout, nullString(info.sni),
		info.hasTicket, info.ticketLifetime, info.verifyResult})
	if p := info.peer; p != nil {
		values[8], values[9], values[10] = nullString(p.subject), nullString(p.issuer), p.fingerprint
		if p.notAfter != 0 {
			values[11] = p.notAfter
		}
		values[12] = int64(0)
		if info.rawKey {
			values[12] = int64(1)
		}
	}
	return values
}

func nullString(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// close checkpoints the WAL and truncates it through the open connection
// (a -wal left behind would hold deleted sessions), closes every
// connection, and then the files and the lock, in that order.
func (s *store) close() {
	if s.closed {
		return
	}
	s.closed = true
	s.ready.Store(false)
	s.closeDB(true)
	s.closeFiles()
}

// closeDB closes every connection, after a checkpoint that empties the WAL
// when checkpoint says so, and forgets the pinned names. It may run twice.
func (s *store) closeDB(checkpoint bool) {
	s.stopWriter()
	s.closeWriteStmts()
	s.closeLookups()
	for _, db := range []**sql.DB{&s.reader, &s.checkpointer} {
		if *db != nil {
			(*db).Close()
			*db = nil
		}
	}
	if s.writer != nil {
		if checkpoint {
			if _, err := s.writer.Exec("PRAGMA wal_checkpoint(TRUNCATE)"); err != nil {
				msg.warn("session cache database %s: checkpoint at exit: %v", s.path, err)
			}
		}
		s.writer.Close()
		s.writer = nil
	}
	if s.pins != nil {
		s.pins.unpin()
		s.pins = nil
	}
}

// ping is the watchdog's probe: the writer still takes writes.
func (s *store) ping() {
	if s.ready.Load() {
		s.write(func(*writeTx) error { return nil })
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
	c.count.lookups.Add(1)
	var session []byte
	var status int
	if c.shared != nil {
		session, status = c.shared.find(c, id)
	} else {
		session, status = s.find(c, id)
	}
	if status == statOK {
		c.count.hits.Add(1)
	} else {
		c.count.misses.Add(1)
	}
	return session, status
}

func (s *store) find(c *cache, id string) ([]byte, int) {
	if s.hiddenCount.Load() > 0 && s.isHidden(c, id) {
		return nil, statErr
	}
	session, expires, found, err := s.selectSession(c, id)
	if err == nil && !found {
		return nil, statErr
	}
	if err != nil {
		msg.warnLimited("cache read", "%s TLS cache: cannot look up entry %s: %v", c.label, id, err)
		return nil, statErr
	}
	now := s.now().Unix()
	if expires < now {
		err := s.write(func(tx *writeTx) error {
			n, err := s.deleteRows(tx, c, c.expireStmt, rowKey(id), id, now)
			tx.add(&c.count.expiredAtLookup, n)
			return err
		})
		if err != nil {
			s.writeFailed(c, "delete expired", id, err)
		}
		return nil, statErr
	}
	if c.logCache {
		msg.info("read %s TLS cache entry %s: time=%d [data %d bytes]", c.label, id, expires-c.timeout, len(session))
	}
	return session, statOK
}

// deleteRows runs a DELETE ... RETURNING length(session) in the writer's
// transaction and keeps the entry and byte counts.
func (s *store) deleteRows(tx *writeTx, c *cache, stmt driver.Stmt, args ...any) (int64, error) {
	var n, bytes int64
	err := tx.query(stmt, func(row []driver.Value) {
		size, _ := row[0].(int64)
		n, bytes = n+1, bytes+size
	}, args...)
	if err != nil {
		return 0, err // nothing was deleted: the statement rolled back
	}
	tx.add(&c.entries, -n)
	tx.add(&c.bytes, -bytes)
	return n, nil
}

func (s *store) update(c *cache, id string, session []byte) int {
	now := s.now().Unix()
	if c.logCache {
		msg.info("put %s session id=%s [data %d bytes]", c.label, id, len(session))
	}
	if session == nil {
		session = []byte{} // NOT NULL: an empty session is still a session
	}
	if c.shared != nil {
		return c.shared.update(c, id, session)
	}
	key := rowKey(id)
	args := append([]any{key, id, session, now, now + c.timeout}, decodedValues(session)...)
	err := s.write(func(tx *writeTx) error {
		var oldSize int64
		replaces := false // this id, or one of the same hash
		err := tx.query(c.sizeStmt, func(row []driver.Value) { oldSize, _ = row[0].(int64); replaces = true }, key)
		if err != nil {
			return err
		}
		if err := tx.exec(c.updateStmt, args...); err != nil {
			return err
		}
		if replaces {
			tx.add(&c.count.replaced, 1)
			tx.add(&c.bytes, int64(len(session))-oldSize)
		} else {
			tx.add(&c.count.stores, 1)
			tx.add(&c.entries, 1)
			tx.add(&c.bytes, int64(len(session)))
			tx.inserted++
		}
		if s.hiddenCount.Load() > 0 {
			tx.onCommit(func() { s.unhide(c, id) })
			s.flushHidden(tx)
		}
		return s.enforceLimits(tx, c)
	})
	if err != nil {
		c.count.storeFailures.Add(1)
		s.writeFailed(c, "store", id, err)
		s.hide(c, id)  // the session it replaces must not come back
		return statErr // clients treat it as "not cached"
	}
	if c.logCache {
		msg.info("write %s TLS cache entry %s: time=%d [data %d bytes]", c.label, id, now, len(session))
	}
	return statOK
}

// enforceLimits evicts, in the writer's transaction, the oldest sessions
// of a cache that is over its entry or byte limit: a batch (a twentieth
// of the entry limit). However many updates a transaction carries, it
// evicts at most one tlsmgr_sweep_batch_size more sessions than it added,
// so that no client's write waits for more than one batch, while a full
// cache stays within its limit under any load. A cache far over a lowered
// limit goes down a batch per transaction, and in batches beside the
// clients (trimToLimits).
func (s *store) enforceLimits(tx *writeTx, c *cache) error {
	param, limit, n := c.overLimit(s.sweepBatch)
	if n = min(n, int64(s.sweepBatch)+tx.inserted-tx.evicted); n <= 0 {
		return nil
	}
	evicted, err := s.deleteRows(tx, c, c.evictStmt, n)
	if err != nil || evicted == 0 {
		return err
	}
	tx.evicted += evicted
	tx.add(&c.count.evictions, evicted)
	tx.onCommit(func() {
		msg.warnLimited("full "+c.label, "%s TLS cache is full: evicted the %d oldest sessions to stay within tlsmgr_%s_session_cache_%s_limit = %d; raise that limit to keep more",
			c.label, evicted, c.label, param, limit)
	})
	return nil
}

// overLimit says which limit a cache is over and how many of its oldest
// sessions to evict now: 0 when it is within both.
func (c *cache) overLimit(sweepBatch int) (param string, limit, evict int64) {
	batch := c.evictBatch(sweepBatch)
	switch {
	case c.entryLimit > 0 && c.entries.Load() > c.entryLimit:
		return "entry", c.entryLimit, min(c.entries.Load()-c.entryLimit+batch-1, int64(sweepBatch))
	case c.sizeLimit > 0 && c.bytes.Load() > c.sizeLimit:
		return "size", c.sizeLimit, batch
	}
	return "", 0, 0
}

// trimToLimits evicts, a sweep batch per background write and resting as
// the sweep does, until a cache is within its limits: a kept cache may
// start far over a limit that was lowered. Clients' writes go between the
// batches. It stops early when stop is closed (we are exiting).
func (s *store) trimToLimits(c *cache, stop <-chan struct{}, wg *sync.WaitGroup) {
	defer logPanic()
	defer wg.Done()
	err := s.inBatches(stop, func(tx *writeTx) (bool, error) {
		_, _, evict := c.overLimit(s.sweepBatch)
		if evict == 0 {
			return false, nil
		}
		n, err := s.deleteRows(tx, c, c.evictStmt, evict)
		tx.add(&c.count.evictions, n)
		return n > 0, err
	})
	if err != nil {
		msg.warnLimited("cache write", "%s TLS cache: cannot evict sessions over its limits: %v", c.label, err)
	}
}

func (s *store) remove(c *cache, id string) int {
	if c.logCache {
		msg.info("delete %s session id=%s", c.label, id)
	}
	if c.shared != nil {
		return c.shared.remove(c, id)
	}
	if s.hiddenCount.Load() > 0 && s.isHidden(c, id) {
		return statErr // already deleted, as far as clients can tell
	}
	var n int64
	err := s.write(func(tx *writeTx) error {
		var err error
		if n, err = s.deleteRows(tx, c, c.deleteStmt, rowKey(id), id); err != nil {
			return err
		}
		tx.add(&c.count.deletes, min(n, 1))
		if s.hiddenCount.Load() > 0 {
			s.flushHidden(tx)
		}
		return nil
	})
	if err != nil {
		s.writeFailed(c, "delete", id, err)
		if s.hide(c, id) {
			c.count.deletes.Add(1)
			return statOK // gone for every lookup; the row goes when it can
		}
		return statErr
	}
	if n == 0 {
		return statErr
	}
	return statOK
}

// hide makes lookups miss an existing row whose delete or replacement
// failed. It reports whether the row existed and is now hidden.
func (s *store) hide(c *cache, id string) bool {
	if err := c.existsStmt.QueryRow(rowKey(id), id).Scan(new(int)); err != nil {
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

// flushHidden deletes, in the writer's transaction, hidden rows now that
// writes work again, a few at a time so that no request waits long for it.
// A row is shown again only once its delete has committed.
func (s *store) flushHidden(tx *writeTx) {
	s.hiddenMu.Lock()
	var batch []hiddenEntry
	for e := range s.hidden {
		if batch = append(batch, e); len(batch) == 100 {
			break
		}
	}
	s.hiddenMu.Unlock()
	for _, e := range batch {
		c := s.caches[e.cache]
		if _, err := s.deleteRows(tx, c, c.deleteStmt, rowKey(e.id), e.id); err != nil {
			return // still failing: the next successful write tries again
		}
		tx.onCommit(func() { s.unhide(c, e.id) })
	}
}

// sweepExpired deletes every expired entry of one cache, one batch per
// write, so that a client's write waits at most one batch: the writer
// takes the writes that queued meanwhile before the next batch. It stops
// early when stop is closed (we are exiting).
func (s *store) sweepExpired(c *cache, stop <-chan struct{}) (int64, error) {
	var total int64
	cutoff := s.now().Unix() - 1 // expired means expires < now, as for lookup
	err := s.inBatches(stop, func(tx *writeTx) (bool, error) {
		n, err := s.deleteRows(tx, c, c.sweepStmt, cutoff, s.sweepBatch)
		tx.add(&c.count.expiredBySweep, n)
		tx.onCommit(func() { total += n })
		return n == int64(s.sweepBatch), err
	})
	return total, err
}

// inBatches runs batch in one background write after another until it
// says there is no more to do, or stop is closed. Between two, the WAL is
// restarted (a batch writes many pages) and the work rests twice as long
// as the batch took: it then takes at most a third of a CPU from clients,
// whose writes go between the batches. (Unpaced, a sweep of 500,000 rows
// halved client throughput for 30 s.)
func (s *store) inBatches(stop <-chan struct{}, batch func(tx *writeTx) (more bool, err error)) error {
	for {
		select {
		case <-stop:
			return nil
		default:
		}
		batchStart := time.Now()
		more := false
		err := s.writeBackground(func(tx *writeTx) (err error) {
			more, err = batch(tx)
			return err
		})
		if err != nil || !more {
			return err
		}
		s.restartWAL()
		pause := time.NewTimer(sweepPauseFactor * time.Since(batchStart))
		select {
		case <-stop:
			pause.Stop()
			return nil
		case <-pause.C:
		}
	}
}

// sweepPauseFactor is how much longer the sweep rests than it works.
const sweepPauseFactor = 2

// saveTicketKeys keeps the current and previous ticket keys
// (tlsmgr_keep_ticket_keys), so that tickets issued before a restart still
// decrypt after it. A failure costs only that. Only the key keeper calls
// it, never a request.
func (s *store) saveTicketKeys(keys []ticketKey) error {
	return s.write(func(tx *writeTx) error {
		if err := tx.execSQL("DELETE FROM ticket_keys"); err != nil {
			return err
		}
		for slot := range keys {
			k := &keys[slot]
			if err := tx.execSQL("INSERT INTO ticket_keys (slot, name, cipher_key, hmac_key, tout) VALUES (?, ?, ?, ?, ?)",
				int64(slot), k.name[:], k.bits[:], k.hmac[:], k.tout); err != nil {
				return err
			}
		}
		return nil
	})
}

// keyKeeper writes the ticket keys to the database beside the request
// path: tktkey hands it copies while it holds the key lock and goes on at
// once, and the keeper writes the newest pair when the database lets it.
// A pair that a newer one replaced before it was written is wiped
// unwritten. So no tktkey waits for a disk, or for another process that
// holds the database.
type keyKeeper struct {
	store   *store
	mu      sync.Mutex
	pending []ticketKey // the newest pair not yet taken (current first); empty: none
	writeMu sync.Mutex  // one write at a time: run's, or flush's at exit
	writing []ticketKey // the pair being written
	wake    chan struct{}
}

func newKeyKeeper(s *store) *keyKeeper {
	return &keyKeeper{store: s, wake: make(chan struct{}, 1)}
}

// made is the keySource's: it runs under the key lock, so it only copies
// the pair (current first).
func (k *keyKeeper) made(held []*ticketKey) {
	k.mu.Lock()
	wipeKeys(k.pending)
	k.pending = k.pending[:0]
	for _, key := range held[:min(2, len(held))] {
		k.pending = append(k.pending, *key)
	}
	k.mu.Unlock()
	select {
	case k.wake <- struct{}{}:
	default: // the keeper is already due to look
	}
}

// run writes what keep hands it until stop is closed.
func (k *keyKeeper) run(stop <-chan struct{}, done func()) {
	defer logPanic()
	defer done()
	for {
		select {
		case <-k.wake:
			k.flush()
		case <-stop:
			return
		}
	}
}

// flush writes the pair that is pending, if any, and wipes its copy. The
// exit calls it before it wipes the keys, so that the newest pair is kept.
func (k *keyKeeper) flush() {
	k.writeMu.Lock()
	defer k.writeMu.Unlock()
	k.mu.Lock()
	k.writing, k.pending = k.pending, k.writing[:0]
	k.mu.Unlock()
	if len(k.writing) == 0 {
		return
	}
	if err := k.store.saveTicketKeys(k.writing); err != nil {
		msg.warnLimited("ticket keys", "session cache database %s: cannot keep the session ticket keys: %v", k.store.path, err)
	}
	wipeKeys(k.writing)
	k.writing = k.writing[:0]
}

// wipeAtExit clears the copies, waiting neither for a write that a
// database held by another process may stall nor, for long, for the lock:
// the process is exiting. Nothing is written after it.
func (k *keyKeeper) wipeAtExit() {
	if lockSoon(&k.writeMu) {
		defer k.writeMu.Unlock()
	}
	if lockSoon(&k.mu) {
		defer k.mu.Unlock()
	}
	wipeKeys(k.pending[:cap(k.pending)])
	wipeKeys(k.writing[:cap(k.writing)])
	k.pending = k.pending[:0]
}

func wipeKeys(keys []ticketKey) {
	for i := range keys {
		keys[i].wipe()
	}
}

// readTicketKeys reads the kept keys from db, the current one first. The
// driver's copies of the key bytes are wiped once copied.
func readTicketKeys(ctx context.Context, db *sql.DB) ([]ticketKey, error) {
	rows, err := db.QueryContext(ctx, "SELECT name, cipher_key, hmac_key, tout FROM ticket_keys ORDER BY slot LIMIT 2")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var keys []ticketKey
	for rows.Next() {
		var name, bits, hmac sql.RawBytes
		var k ticketKey
		if err := rows.Scan(&name, &bits, &hmac, &k.tout); err != nil {
			return nil, err
		}
		if len(name) == len(k.name) && len(bits) == len(k.bits) && len(hmac) == len(k.hmac) {
			copy(k.name[:], name)
			copy(k.bits[:], bits)
			copy(k.hmac[:], hmac)
			keys = append(keys, k)
		}
		clear(bits)
		clear(hmac)
		k.wipe()
	}
	return keys, rows.Err()
}

// runSweeper sweeps one cache now and then every timeout seconds, like
// tlsmgr's cleanup timer, until stop is closed.
func (s *store) runSweeper(c *cache, stop <-chan struct{}, wg *sync.WaitGroup) {
	defer logPanic()
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
			s.writeBackground(func(tx *writeTx) error { s.flushHidden(tx); return nil })
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
		case "0", "none", "1", "routine", "summary", "untrusted", "peercert", "certmatch", "verbose", "dane", "ssl-debug", "ssl-handshake-packet-dump",
			"ssl-session-packet-dump", // Postfix 3.x
			"trace":                   // Postfix 3.12: SSL_trace() to a file, in the clients; nothing for tlsmgr
		case "2", "debug", "3", "ssl-expert", "4", "5", "6", "7", "8", "9", "ssl-developer", "cache":
			mask |= logMaskCache
		default:
			return 0, fmt.Errorf("unknown TLS log level keyword %q (allowed: 0-9, none, routine, debug, ssl-expert, ssl-developer, summary, untrusted, peercert, certmatch, verbose, cache, dane, ssl-debug, ssl-handshake-packet-dump, ssl-session-packet-dump, trace)", word)
		}
	}
	return mask, nil
}
