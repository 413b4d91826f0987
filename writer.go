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
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// maxWriteBatch bounds one transaction: the last write in a batch waits
// for all before it.
const maxWriteBatch = 64

// walRestartFrames is how many WAL frames (pages) make the checkpointer
// restart the WAL, by copying the last frames with the writer held.
const walRestartFrames = 1000

// The checkpointer copies committed WAL frames into the database after
// checkpointWrites writes (an update writes about four pages), or
// checkpointPeriod after the last, so that the WAL stays small: every
// page read looks through the WAL's index first.
const (
	checkpointWrites = 256
	checkpointPeriod = 100 * time.Millisecond
)

// errStoreClosed answers writes that come after the writer stopped.
var errStoreClosed = errors.New("the session cache database is closed")

// writeFunc runs statements on the writer connection inside the batch's
// transaction. It changes in-memory counts only through tx, so that a
// rollback takes them back.
type writeFunc func(tx *writeTx) error

type writeRequest struct {
	fn   writeFunc
	bare func() // instead of fn: run outside any transaction
	done chan writeResult
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
	deltas  []counterDelta
	commits []func()
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

func (tx *writeTx) reset() {
	clear(tx.deltas)
	clear(tx.commits)
	tx.deltas, tx.commits = tx.deltas[:0], tx.commits[:0]
}

// write runs fn in the next transaction and returns when that transaction
// has committed, or fn's error. There is no writer goroutine: the first
// write to find no transaction under way leads, running every write that
// queued meanwhile in one transaction, and hands the lead to the oldest
// that queued during it, so that a lone client never waits for another
// goroutine to be scheduled.
func (s *store) write(fn writeFunc) error { return s.lead(&writeRequest{fn: fn}) }

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
	n := 1 // req is the first; a bare one goes alone
	for req.bare == nil && n < min(len(s.queue), maxWriteBatch) && s.queue[n].bare == nil {
		n++
	}
	batch := append(s.batch[:0], s.queue[:n]...)
	s.queue = append(s.queue[:0], s.queue[n:]...)
	s.queueMu.Unlock()

	var err error
	switch {
	case req.bare != nil:
		req.bare()
	default:
		err = s.commit(&s.tx, batch)
		if err != nil && len(batch) > 1 {
			for _, other := range batch[1:] { // find whose write failed
				other.done <- writeResult{err: s.commit(&s.tx, []*writeRequest{other})}
			}
			err = s.commit(&s.tx, batch[:1])
		} else {
			for _, other := range batch[1:] {
				other.done <- writeResult{err: err}
			}
		}
	}
	clear(batch)
	s.batch = batch

	s.queueMu.Lock()
	if len(s.queue) > 0 {
		s.queue[0].done <- writeResult{lead: true}
	} else {
		s.leading = false
		s.idle.Broadcast()
	}
	s.queueMu.Unlock()
	return err
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
// in the database or in memory.
func (s *store) commit(tx *writeTx, batch []*writeRequest) error {
	tx.reset()
	if _, err := s.beginStmt.Exec(); err != nil {
		return err
	}
	for _, req := range batch {
		if err := req.fn(tx); err != nil {
			s.rollback(tx)
			return err
		}
	}
	if _, err := s.commitStmt.Exec(); err != nil {
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
}

func (s *store) rollback(tx *writeTx) {
	s.writer.Exec("ROLLBACK") // fails only when SQLite already rolled back
	tx.undo()
}

// runCheckpointer copies what the writer committed into the database file
// every checkpointPeriod, on its own connection, beside the writer: a
// PASSIVE checkpoint never waits for the writer nor makes it wait. Frames
// committed while it ran are left; the WAL starts again from its beginning
// only when a transaction begins with every frame copied. So when the WAL
// has grown past walRestartFrames, the checkpointer copies the few frames
// left with the writer held, and the next transaction restarts the WAL.
func (s *store) runCheckpointer() {
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
		frames, err := s.checkpoint()
		if err == nil && frames > walRestartFrames {
			s.whileNoWrites(func() { _, err = s.checkpoint() })
		}
		if err != nil {
			msg.warnLimited("cache write", "session cache database %s: checkpoint: %v", s.path, err)
		}
	}
}

// checkpoint copies committed WAL frames into the database; it returns
// how many frames the WAL holds.
func (s *store) checkpoint() (int, error) {
	var busy, frames, copied int
	err := s.checkpointer.QueryRow("PRAGMA wal_checkpoint(PASSIVE)").Scan(&busy, &frames, &copied)
	return frames, err
}

// prepareWriter prepares what the writer runs for every transaction.
func (s *store) prepareWriter() (err error) {
	if s.beginStmt, err = s.writer.Prepare("BEGIN IMMEDIATE"); err != nil {
		return err
	}
	s.commitStmt, err = s.writer.Prepare("COMMIT")
	return err
}
