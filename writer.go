// Group commit: every write to the session cache database (updates,
// deletes, expiry, the sweep, evictions, counters, kept ticket keys) is a
// function run on the one writer connection. Writes that arrive while a
// transaction is under way queue, and the next transaction runs them all,
// so that concurrent clients share its locking, its WAL frames and its
// commit instead of paying for one each. A write that fails rolls its
// batch back, and each write of it then runs alone, so that every client
// still gets its own answer.
//
// Checkpoints run on a connection of their own, outside the writer, so
// that no client waits for the WAL to be copied into the database and
// synced.

package main

import (
	"context"
	"database/sql/driver"
	"errors"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// maxWriteBatch bounds one transaction: the last write in a batch waits
// for all before it.
const maxWriteBatch = 64

// walRestartFrames is how many WAL frames (pages) make the checkpointer
// restart the WAL, by copying the last frames with the writer held; it
// does so only when at most walHeldFrames are left, so that the writer is
// held briefly.
const (
	walRestartFrames = 1000
	walHeldFrames    = 256
)

// The checkpointer copies committed WAL frames into the database after
// checkpointWrites writes (an update writes about four pages), or
// checkpointPeriod after the last, so that the WAL stays small: every
// page read looks through the WAL's index first.
const (
	checkpointWrites = 256
	checkpointPeriod = 100 * time.Millisecond
)

// backgroundPatience is how many transactions of clients' writes a
// background write waits through at most.
const backgroundPatience = 8

// errStoreClosed answers writes that come after the writer stopped.
var errStoreClosed = errors.New("the session cache database is closed")

// writeFunc runs statements on the writer connection inside the batch's
// transaction. It changes in-memory counts only through tx, so that a
// rollback takes them back.
type writeFunc func(tx *writeTx) error

type writeRequest struct {
	fn         writeFunc
	bare       func() // instead of fn: run outside any transaction
	background bool
	finished   bool // answered: set and read by the leader only
	done       chan writeResult
}

// writeResult answers a waiting write: its error, or that it is now its
// turn to lead.
type writeResult struct {
	err  error
	lead bool
}

// writeTx is what one transaction did to memory: the counter changes to
// take back on rollback and what to do once it committed.
type writeTx struct {
	conn    driver.Conn // the writer's, while the transaction runs
	args    []driver.NamedValue
	deltas  []counterDelta
	commits []func()
	// Sessions this transaction added, and evicted: it evicts no more
	// than one sweep batch beyond what it added.
	inserted, evicted int64
}

type counterDelta struct {
	counter *atomic.Int64
	n       int64
}

// add changes a count now; a rollback takes the change back.
func (tx *writeTx) add(counter *atomic.Int64, n int64) {
	if n != 0 {
		counter.Add(n)
		tx.deltas = append(tx.deltas, counterDelta{counter, n})
	}
}

// onCommit runs f once the transaction has committed.
func (tx *writeTx) onCommit(f func()) { tx.commits = append(tx.commits, f) }

func (tx *writeTx) undo() {
	for i := len(tx.deltas) - 1; i >= 0; i-- {
		tx.deltas[i].counter.Add(-tx.deltas[i].n)
	}
}

func (tx *writeTx) reset(conn driver.Conn) {
	tx.conn = conn
	tx.inserted, tx.evicted = 0, 0
	clear(tx.deltas)
	clear(tx.commits)
	tx.deltas, tx.commits = tx.deltas[:0], tx.commits[:0]
}

// write runs fn in the next transaction and returns when that transaction
// has committed, or fn's error. There is no writer goroutine: the first
// write to find no transaction under way leads, running the writes that
// queued meanwhile in one transaction, until its own has run; then it
// hands the lead to the oldest still waiting. A lone client never waits
// for another goroutine to be scheduled.
func (s *store) write(fn writeFunc) error { return s.lead(&writeRequest{fn: fn}) }

// writeBackground is write for housekeeping (the sweep, checkpoints, the
// counters): such a write runs alone, and only when no client's write is
// waiting or it has waited through backgroundPatience transactions.
func (s *store) writeBackground(fn writeFunc) error {
	return s.lead(&writeRequest{fn: fn, background: true})
}

// whileNoWrites runs f between transactions, with the writer held.
func (s *store) whileNoWrites(f func()) error { return s.lead(&writeRequest{bare: f}) }

func (s *store) lead(req *writeRequest) error {
	if s.beginStmt == nil {
		return errStoreClosed
	}
	req.done = make(chan writeResult, 1)
	s.queueMu.Lock()
	if s.writesStopped {
		s.queueMu.Unlock()
		return errStoreClosed
	}
	s.queue = append(s.queue, req)
	if s.leading {
		s.queueMu.Unlock()
		if r := <-req.done; !r.lead {
			return r.err
		}
		s.queueMu.Lock()
	}
	s.leading = true
	for !req.finished {
		batch := s.nextBatch()
		s.queueMu.Unlock()
		s.run(batch)
		s.queueMu.Lock()
	}
	if len(s.queue) > 0 {
		s.queue[0].done <- writeResult{lead: true}
	} else {
		s.leading = false
		s.idle.Broadcast()
	}
	s.queueMu.Unlock()
	return (<-req.done).err
}

// nextBatch takes the writes of the next transaction from the queue; the
// caller holds queueMu and the lead. Clients' writes go first, in order;
// one run with the writer held goes alone; a background write goes alone
// when no client's write waits, or once it has waited long enough.
func (s *store) nextBatch() []*writeRequest {
	batch := s.batch[:0]
	oldestBackground, clients := -1, 0
	for i, r := range s.queue {
		switch {
		case !r.background:
			clients++
		case oldestBackground < 0:
			oldestBackground = i
		}
	}
	if oldestBackground >= 0 {
		if clients == 0 || s.backgroundWaited >= backgroundPatience {
			s.backgroundWaited = 0
			batch = append(batch, s.queue[oldestBackground])
			s.queue = slices.Delete(s.queue, oldestBackground, oldestBackground+1)
			return batch
		}
		s.backgroundWaited++
	}
	waiting := s.queue[:0]
	for _, r := range s.queue {
		if !r.background && len(batch) < maxWriteBatch && (len(batch) == 0 || r.bare == nil && batch[0].bare == nil) {
			batch = append(batch, r)
		} else {
			waiting = append(waiting, r)
		}
	}
	clear(s.queue[len(waiting):])
	s.queue = waiting
	return batch
}

// run runs one batch and answers each of its writes.
func (s *store) run(batch []*writeRequest) {
	if f := batch[0].bare; f != nil {
		f()
		s.answer(batch[0], nil)
	} else if err := s.commit(&s.tx, batch); err != nil && len(batch) > 1 {
		for _, r := range batch { // find whose write failed
			s.answer(r, s.commit(&s.tx, []*writeRequest{r}))
		}
	} else {
		for _, r := range batch {
			s.answer(r, err)
		}
	}
	clear(batch)
	s.batch = batch[:0]
}

func (s *store) answer(r *writeRequest, err error) {
	r.finished = true
	r.done <- writeResult{err: err}
}

// startWriter turns automatic checkpoints off on the writer connection and
// starts the checkpointer; stopWriter refuses new writes, waits for the
// transaction under way, and stops the checkpointer.
func (s *store) startWriter() error {
	if _, err := s.writer.Exec("PRAGMA wal_autocheckpoint = 0"); err != nil { // the checkpointer does it
		return err
	}
	s.idle = sync.NewCond(&s.queueMu)
	s.stopCheckpoints = make(chan struct{})
	s.checkpointNow = make(chan struct{})
	s.checkpointerDone = make(chan struct{})
	go s.runCheckpointer()
	return nil
}

func (s *store) stopWriter() {
	if s.idle == nil {
		return
	}
	s.queueMu.Lock()
	s.writesStopped = true
	for s.leading {
		s.idle.Wait()
	}
	s.queueMu.Unlock()
	close(s.stopCheckpoints)
	<-s.checkpointerDone
}

// commit runs writes in one transaction; on any error nothing of it stays,
// in the database or in memory. It runs on the writer's one connection at
// the driver level: database/sql's pool, argument conversion and row
// wrappers cost more than SQLite's own work on this path.
func (s *store) commit(tx *writeTx, batch []*writeRequest) error {
	conn, err := s.writer.Conn(context.Background())
	if err != nil {
		return err
	}
	defer conn.Close() // back to the pool: the connection stays open
	return conn.Raw(func(dc any) error {
		tx.reset(dc.(driver.Conn))
		if err := tx.exec(s.beginStmt); err != nil {
			return err
		}
		for _, req := range batch {
			if err := req.fn(tx); err != nil {
				s.rollback(tx)
				return err
			}
		}
		if err := tx.exec(s.commitStmt); err != nil {
			s.rollback(tx)
			return err
		}
		if s.committed.Add(int64(len(batch))) >= checkpointWrites {
			select {
			case s.checkpointNow <- struct{}{}:
			default: // one is under way
			}
		}
		for _, f := range tx.commits {
			f()
		}
		return nil
	})
}

func (s *store) rollback(tx *writeTx) {
	tx.exec(s.rollbackStmt) // fails only when SQLite already rolled back
	tx.undo()
}

// exec runs one of the writer's prepared statements.
func (tx *writeTx) exec(stmt driver.Stmt, args ...any) error {
	named, err := tx.bind(args)
	if err != nil {
		return err
	}
	_, err = stmt.(driver.StmtExecContext).ExecContext(context.Background(), named)
	return err
}

// query runs one of the writer's prepared statements and calls row for
// each row it returns.
func (tx *writeTx) query(stmt driver.Stmt, row func([]driver.Value), args ...any) error {
	named, err := tx.bind(args)
	if err != nil {
		return err
	}
	rows, err := stmt.(driver.StmtQueryContext).QueryContext(context.Background(), named)
	if err != nil {
		return err
	}
	defer rows.Close()
	values := make([]driver.Value, len(rows.Columns()))
	for {
		switch err := rows.Next(values); {
		case err == io.EOF:
			return nil
		case err != nil:
			return err
		}
		row(values)
	}
}

// execSQL runs SQL text in the transaction, for writes off the hot path.
func (tx *writeTx) execSQL(query string, args ...any) error {
	stmt, err := tx.conn.(driver.ConnPrepareContext).PrepareContext(context.Background(), query)
	if err != nil {
		return err
	}
	defer stmt.Close()
	return tx.exec(stmt, args...)
}

func (tx *writeTx) bind(args []any) ([]driver.NamedValue, error) {
	tx.args = tx.args[:0]
	for i, a := range args {
		v, err := driver.DefaultParameterConverter.ConvertValue(a)
		if err != nil {
			return nil, err
		}
		tx.args = append(tx.args, driver.NamedValue{Ordinal: i + 1, Value: v})
	}
	return tx.args, nil
}

// runCheckpointer copies what the writer committed into the database file
// every checkpointPeriod, on its own connection, beside the writer: a
// PASSIVE checkpoint never waits for the writer nor makes it wait. Frames
// committed while it ran are left; the WAL starts again from its beginning
// only when a transaction begins with every frame copied. So when the WAL
// has grown past walRestartFrames, the checkpointer copies the few frames
// left with the writer held, and the next transaction restarts the WAL.
func (s *store) runCheckpointer() {
	defer logPanic()
	defer close(s.checkpointerDone)
	tick := time.NewTicker(checkpointPeriod)
	defer tick.Stop()
	for {
		select {
		case <-s.stopCheckpoints:
			return
		case <-tick.C:
		case <-s.checkpointNow:
		}
		if s.committed.Swap(0) == 0 {
			continue
		}
		frames, left, err := s.checkpoint()
		for tries := 0; err == nil && left > walHeldFrames && tries < 3; tries++ {
			frames, left, err = s.checkpoint() // the writer added more meanwhile
		}
		if err == nil && frames > walRestartFrames && left <= walHeldFrames {
			err = s.restartWAL()
		}
		if err != nil {
			msg.warnLimited("cache write", "session cache database %s: checkpoint: %v", s.path, err)
		}
	}
}

// restartWAL copies the WAL's last frames into the database with the
// writer held, as a background write, so that the next transaction writes
// the WAL from its beginning again.
func (s *store) restartWAL() (err error) {
	s.lead(&writeRequest{bare: func() { _, _, err = s.checkpoint() }, background: true})
	return err
}

// checkpoint copies committed WAL frames into the database; it returns
// how many frames the WAL holds and how many of them are left to copy.
func (s *store) checkpoint() (frames, left int, err error) {
	var busy, copied int
	err = s.checkpointer.QueryRow("PRAGMA wal_checkpoint(PASSIVE)").Scan(&busy, &frames, &copied)
	return frames, frames - copied, err
}

// prepareWriter prepares what the writer runs for every transaction.
func (s *store) prepareWriter() error {
	for _, p := range []struct {
		stmt *driver.Stmt
		sql  string
	}{{&s.beginStmt, "BEGIN IMMEDIATE"}, {&s.commitStmt, "COMMIT"}, {&s.rollbackStmt, "ROLLBACK"}} {
		if err := s.prepareWrite(p.stmt, p.sql); err != nil {
			return err
		}
	}
	return nil
}

// prepareWrite prepares a statement on the writer's connection at the
// driver level; closeWriteStmts closes them all.
func (s *store) prepareWrite(stmt *driver.Stmt, query string) error {
	conn, err := s.writer.Conn(context.Background())
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Raw(func(dc any) error {
		prepared, err := dc.(driver.ConnPrepareContext).PrepareContext(context.Background(), query)
		if err != nil {
			return err
		}
		_, canExec := prepared.(driver.StmtExecContext)
		_, canQuery := prepared.(driver.StmtQueryContext)
		if !canExec || !canQuery {
			prepared.Close()
			return errors.New("the SQLite driver cannot run a prepared statement with a context")
		}
		*stmt = prepared
		s.writeStmts = append(s.writeStmts, prepared)
		return nil
	})
}

func (s *store) closeWriteStmts() {
	if s.writer == nil {
		return
	}
	conn, err := s.writer.Conn(context.Background())
	if err != nil {
		return
	}
	defer conn.Close()
	conn.Raw(func(any) error {
		for _, stmt := range s.writeStmts {
			stmt.Close()
		}
		return nil
	})
	s.writeStmts = nil
}
