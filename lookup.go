// The lookup path: most requests are lookups, so they do not go through
// database/sql. Each of lookupConns connections is held for the life of
// the process with one lookup statement per cache prepared on it at the
// driver level, and a lookup takes a free one, binds, steps and reads the
// row directly: no pool bookkeeping, argument conversion, Rows wrapper or
// second copy of the session.

package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"runtime"
)

// lookupConns is how many lookups run at once: WAL lets them run beside
// the writer, one per CPU. Each connection keeps its own 2 MiB page cache;
// on two cores, four connections were no faster than two (tlsload,
// lookup=90,update=10 at 4 and 16 clients; lookup only at 4) and held
// 4 MiB more.
var lookupConns = min(max(runtime.GOMAXPROCS(0), 2), 8)

type lookupConn struct {
	conn  *sql.Conn
	stmts map[*cache]driver.StmtQueryContext
	args  [2]driver.NamedValue
	row   [2]driver.Value
}

// openLookups holds lookupConns connections of db and prepares on each the
// lookup of every cache; db must allow that many open at once.
func (s *store) openLookups(db *sql.DB) error {
	s.lookups = make(chan *lookupConn, lookupConns)
	for range lookupConns {
		conn, err := db.Conn(context.Background())
		if err != nil {
			return err
		}
		lc := &lookupConn{conn: conn, stmts: map[*cache]driver.StmtQueryContext{}}
		lc.args[0].Ordinal, lc.args[1].Ordinal = 1, 2
		s.lookups <- lc // closeLookups closes it, even if preparing fails
		s.lookupsOpen++
		err = conn.Raw(func(dc any) error {
			for _, c := range s.caches {
				stmt, err := dc.(driver.ConnPrepareContext).PrepareContext(context.Background(),
					"SELECT session, expires FROM "+c.label+"_cache WHERE hash = ? AND id = ?")
				if err != nil {
					return err
				}
				q, ok := stmt.(driver.StmtQueryContext)
				if !ok {
					stmt.Close()
					return errors.New("the SQLite driver cannot query a prepared statement with a context")
				}
				lc.stmts[c] = q
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("prepare the lookups: %v", err)
		}
	}
	return nil
}

// selectSession reads the row of id: its session and expiry, or found =
// false.
func (s *store) selectSession(c *cache, id string) (session []byte, expires int64, found bool, err error) {
	lc := <-s.lookups
	defer func() { s.lookups <- lc }()
	if lc == nil {
		return nil, 0, false, errStoreClosed
	}
	err = lc.conn.Raw(func(any) error {
		lc.args[0].Value, lc.args[1].Value = rowKey(id), id
		rows, err := lc.stmts[c].QueryContext(context.Background(), lc.args[:])
		if err != nil {
			return err
		}
		defer rows.Close()
		switch err := rows.Next(lc.row[:]); {
		case err == io.EOF:
			return nil
		case err != nil:
			return err
		}
		session, _ = lc.row[0].([]byte) // the driver's own copy
		expires, _ = lc.row[1].(int64)
		found = true
		return nil
	})
	clear(lc.row[:])
	lc.args[1].Value = nil
	return session, expires, found, err
}

// closeLookups waits for the lookups under way, finalizes the statements
// and gives the connections back; later lookups get errStoreClosed.
func (s *store) closeLookups() {
	for range s.lookupsOpen {
		lc := <-s.lookups
		lc.conn.Raw(func(any) error {
			for _, stmt := range lc.stmts {
				stmt.(driver.Stmt).Close()
			}
			return nil
		})
		lc.conn.Close()
	}
	for range s.lookupsOpen {
		s.lookups <- nil
	}
	s.lookupsOpen = 0 // a second close finds nothing to close
}
