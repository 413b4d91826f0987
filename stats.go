// Statistics: what the caches, the ticket keys and the seed requests did,
// in the spirit of Apache mod_ssl's shmcb status page. Counted in memory
// with atomics (the request path takes no lock for them), written to the
// counters table every few seconds and at exit, shown by the
// cache_counters and statistics views, by `tlsmgr -stats`, and, when
// tlsmgr_statistics_log_period is set, by a periodic log line.

package main

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"text/tabwriter"
	"time"
)

// statsWritePeriod is how often the counters reach the database.
const statsWritePeriod = 5 * time.Second

// cacheCounters belong to one cache; the names are the counters table's.
type cacheCounters struct {
	lookups, hits, misses, expiredAtLookup, expiredBySweep atomic.Int64
	stores, replaced, deletes, evictions, storeFailures    atomic.Int64
}

func (c *cacheCounters) named() []namedCounter {
	return []namedCounter{
		{"lookups", &c.lookups}, {"hits", &c.hits}, {"misses", &c.misses},
		{"expired_at_lookup", &c.expiredAtLookup}, {"expired_by_sweep", &c.expiredBySweep},
		{"stores", &c.stores}, {"replaced", &c.replaced}, {"deletes", &c.deletes},
		{"evictions", &c.evictions}, {"store_failures", &c.storeFailures},
	}
}

// serviceCounters are those of tktkey and seed requests.
type serviceCounters struct {
	keysIssued, keysFound, keysNotFound atomic.Int64
	seedRequests, seedBytes             atomic.Int64
}

type namedCounter struct {
	name  string
	value *atomic.Int64
}

// allCounters lists every counter by scope and name, caches first.
func (s *store) allCounters() map[string][]namedCounter {
	all := map[string][]namedCounter{
		"tktkey": {{"keys_issued", &s.service.keysIssued}, {"found", &s.service.keysFound}, {"not_found", &s.service.keysNotFound}},
		"seed":   {{"requests", &s.service.seedRequests}, {"bytes", &s.service.seedBytes}},
	}
	for label, c := range s.caches {
		all[label] = c.count.named()
	}
	return all
}

// loadCounters continues the counts of a kept database.
func (s *store) loadCounters(ctx context.Context) error {
	all := s.allCounters()
	rows, err := s.writer.QueryContext(ctx, "SELECT scope, name, value FROM counters")
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var scope, name string
		var value int64
		if err := rows.Scan(&scope, &name, &value); err != nil {
			return err
		}
		for _, c := range all[scope] {
			if c.name == name {
				c.value.Store(value)
			}
		}
	}
	if err := rows.Err(); err != nil {
		return err
	}
	var since int64
	switch err := s.writer.QueryRowContext(ctx, "SELECT since FROM counters_period").Scan(&since); err {
	case nil:
		s.since = since
	case sql.ErrNoRows:
	default:
		return err
	}
	return nil
}

// saveCounters writes every counter in one transaction.
func (s *store) saveCounters() error {
	return s.writeBackground(func(tx *writeTx) error {
		for scope, counters := range s.allCounters() {
			for _, c := range counters {
				if err := tx.execSQL("INSERT INTO counters (scope, name, value) VALUES (?, ?, ?)"+
					" ON CONFLICT (scope, name) DO UPDATE SET value = excluded.value", scope, c.name, c.value.Load()); err != nil {
					return err
				}
			}
		}
		return tx.execSQL("INSERT INTO counters_period (one, since, updated) VALUES (1, ?, ?)"+
			" ON CONFLICT (one) DO UPDATE SET since = excluded.since, updated = excluded.updated", s.since, s.now().Unix())
	})
}

// runStatistics writes the counters every statsWritePeriod and logs them
// every logPeriod (0: never) until stop is closed.
func (s *store) runStatistics(logPeriod time.Duration, stop <-chan struct{}, done func()) {
	defer logPanic()
	defer done()
	write := time.NewTicker(statsWritePeriod)
	defer write.Stop()
	var logTick <-chan time.Time
	if logPeriod > 0 {
		t := time.NewTicker(logPeriod)
		defer t.Stop()
		logTick = t.C
	}
	for {
		select {
		case <-stop:
			return
		case <-write.C:
			if err := s.saveCounters(); err != nil {
				msg.warnLimited("statistics", "session cache database %s: cannot write statistics: %v", s.path, err)
			}
		case <-logTick:
			s.logStatistics()
		}
	}
}

// logStatistics is the periodic log line, one per cache that is on and
// one for keys and seeds, like anvil(8)'s statistics lines.
func (s *store) logStatistics() {
	for _, label := range cacheLabels {
		c := s.caches[label]
		if c == nil || !c.enabled() {
			continue
		}
		n := &c.count
		msg.info("statistics: %s cache: %d entries, %d bytes; %d lookups, %d hits (%s), %d misses, %d expired; %d stores, %d replaced, %d deletes, %d evictions, %d store failures",
			label, c.entries.Load(), c.bytes.Load(), n.lookups.Load(), n.hits.Load(), percent(n.hits.Load(), n.lookups.Load()),
			n.misses.Load(), n.expiredAtLookup.Load()+n.expiredBySweep.Load(), n.stores.Load(), n.replaced.Load(),
			n.deletes.Load(), n.evictions.Load(), n.storeFailures.Load())
	}
	v := &s.service
	msg.info("statistics: ticket keys: %d issued, %d found, %d not found; seed: %d requests, %d bytes",
		v.keysIssued.Load(), v.keysFound.Load(), v.keysNotFound.Load(), v.seedRequests.Load(), v.seedBytes.Load())
}

func percent(part, whole int64) string {
	if whole == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", 100*float64(part)/float64(whole))
}

// printStatistics is `tlsmgr -stats`: the caches' sizes and the counters,
// as a table, so that an administrator needs no sqlite3 to read them. It
// reads only our tables, never a view (a file of someone else's could
// define one to run anything), and every value as a number: nothing it
// prints is text from the file, so nothing from the file reaches the
// terminal as it is.
func printStatistics(w io.Writer, db *sql.DB) error {
	var since, updated sql.NullInt64
	err := db.QueryRow("SELECT CAST(since AS INTEGER), CAST(updated AS INTEGER) FROM counters_period").Scan(&since, &updated)
	if err != nil && err != sql.ErrNoRows {
		return err
	}
	fmt.Fprintf(w, "tlsmgr statistics since %s, written %s\n\n", unixOrDash(since), unixOrDash(updated))

	counters := map[string]int64{}
	rows, err := db.Query("SELECT scope, name, CAST(value AS INTEGER) FROM counters WHERE typeof(scope) = 'text' AND typeof(name) = 'text'")
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var scope, name string
		var value int64
		if err := rows.Scan(&scope, &name, &value); err != nil {
			return err
		}
		counters[scope+"."+name] = value // looked up by our names only
	}
	if err := rows.Err(); err != nil {
		return err
	}

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "cache\tentries\tbytes\tlookups\thits\tmisses\thit ratio\texpired\tstores\treplaced\tdeletes\tevictions\tfailures\t")
	for _, label := range cacheLabels {
		var entries, bytes int64
		if err := db.QueryRow("SELECT count(*), coalesce(sum(length(session)), 0) FROM "+label+"_cache").Scan(&entries, &bytes); err != nil {
			return err
		}
		n := func(name string) int64 { return counters[label+"."+name] }
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t\n", label, entries, bytes,
			n("lookups"), n("hits"), n("misses"), percent(n("hits"), n("lookups")), n("expired_at_lookup")+n("expired_by_sweep"),
			n("stores"), n("replaced"), n("deletes"), n("evictions"), n("store_failures"))
	}
	tw.Flush()

	fmt.Fprintf(w, "\nticket keys: %d issued, %d found by name, %d not found\n",
		counters["tktkey.keys_issued"], counters["tktkey.found"], counters["tktkey.not_found"])
	fmt.Fprintf(w, "seed: %d requests, %d bytes\n", counters["seed.requests"], counters["seed.bytes"])
	var keys []string
	krows, err := db.Query("SELECT CAST(slot AS INTEGER), substr(CAST(name AS BLOB), 1, 16), CAST(tout AS INTEGER) FROM ticket_keys ORDER BY slot LIMIT 2") // never the key bits
	if err != nil {
		return err
	}
	defer krows.Close()
	for krows.Next() {
		var slot, tout int64
		var name []byte
		if err := krows.Scan(&slot, &name, &tout); err != nil {
			return err
		}
		which := "current"
		if slot != 0 {
			which = "previous"
		}
		keys = append(keys, fmt.Sprintf("%s %X, issues until %s", which, name, unixOrDash(sql.NullInt64{Int64: tout, Valid: true})))
	}
	if len(keys) > 0 {
		fmt.Fprintf(w, "kept ticket keys: %s\n", strings.Join(keys, "; "))
	}
	return krows.Err()
}

func unixOrDash(t sql.NullInt64) string {
	if !t.Valid {
		return "-"
	}
	return time.Unix(t.Int64, 0).UTC().Format("2006-01-02T15:04:05Z")
}
