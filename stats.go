// Statistics: what the caches, the ticket keys and the seed requests did,
// in the spirit of Apache mod_ssl's shmcb status page. Counted in memory
// with atomics (the request path takes no lock for them), written to the
// counters table every few seconds and at exit, shown by the
// cache_counters and statistics views, by `tlsmgr -stats`, and, when
// tlsmgr_statistics_log_period is set, by a periodic log line.

package main

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
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

// statsSnapshot is what -stats shows: the running daemon's counters (it
// is asked over its socket), or else what it last wrote to the database.
type statsSnapshot struct {
	live           bool  // from the running daemon
	since, updated int64 // UNIX times; updated: when the figures were taken
	entries, bytes map[string]int64
	counters       map[string]int64 // "smtpd.lookups", "tktkey.keys_issued", "seed.bytes", ...
	keptKeys       []string
}

// statsFormats are -format's values.
var statsFormats = map[string]func(io.Writer, *statsSnapshot) error{
	"table": writeStatsTable, "openmetrics": writeOpenMetrics, "json": writeStatsJSON,
}

// counterNames lists every counter as scope.name, in the order shown.
func counterNames() []string {
	var names []string
	var c cacheCounters
	for _, label := range cacheLabels {
		for _, n := range c.named() {
			names = append(names, label+"."+n.name)
		}
	}
	return append(names, "tktkey.keys_issued", "tktkey.found", "tktkey.not_found", "seed.requests", "seed.bytes")
}

// readStatsDB reads a snapshot from the database. It reads only our
// tables, never a view (a file of someone else's could define one to run
// anything), and every value as a number: nothing it prints is text from
// the file, so nothing from the file reaches the terminal as it is.
func readStatsDB(db *sql.DB) (*statsSnapshot, error) {
	snap := &statsSnapshot{entries: map[string]int64{}, bytes: map[string]int64{}, counters: map[string]int64{}}
	var since, updated sql.NullInt64
	err := db.QueryRow("SELECT CAST(since AS INTEGER), CAST(updated AS INTEGER) FROM counters_period").Scan(&since, &updated)
	if err != nil && err != sql.ErrNoRows {
		return nil, err
	}
	snap.since, snap.updated = since.Int64, updated.Int64
	known := map[string]bool{}
	for _, n := range counterNames() {
		known[n] = true
	}
	rows, err := db.Query("SELECT scope, name, CAST(value AS INTEGER) FROM counters WHERE typeof(scope) = 'text' AND typeof(name) = 'text'")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		var scope, name string
		var value int64
		if err := rows.Scan(&scope, &name, &value); err != nil {
			return nil, err
		}
		if known[scope+"."+name] {
			snap.counters[scope+"."+name] = value // looked up by our names only
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for _, label := range cacheLabels {
		var entries, bytes int64
		if err := db.QueryRow("SELECT count(*), coalesce(sum(length(session)), 0) FROM "+label+"_cache").Scan(&entries, &bytes); err != nil {
			return nil, err
		}
		snap.entries[label], snap.bytes[label] = entries, bytes
	}
	krows, err := db.Query("SELECT CAST(slot AS INTEGER), substr(CAST(name AS BLOB), 1, 16), CAST(tout AS INTEGER) FROM ticket_keys ORDER BY slot LIMIT 2") // never the key bits
	if err != nil {
		return nil, err
	}
	defer krows.Close()
	for krows.Next() {
		var slot, tout int64
		var name []byte
		if err := krows.Scan(&slot, &name, &tout); err != nil {
			return nil, err
		}
		which := "current"
		if slot != 0 {
			which = "previous"
		}
		snap.keptKeys = append(snap.keptKeys, fmt.Sprintf("%s %X, issues until %s", which, name, unixOrDash(sql.NullInt64{Int64: tout, Valid: true})))
	}
	return snap, krows.Err()
}

// liveStats is the daemon's answer to a tlsmgr_stats request: the counters
// and cache sizes as they are now, as name, decimal value pairs.
func (s *store) liveStats() [][2]string {
	out := [][2]string{{"since", strconv.FormatInt(s.since, 10)}, {"now", strconv.FormatInt(s.now().Unix(), 10)}}
	for _, label := range cacheLabels {
		c := s.caches[label]
		out = append(out, [2]string{label + ".entries", strconv.FormatInt(c.entries.Load(), 10)},
			[2]string{label + ".bytes", strconv.FormatInt(c.bytes.Load(), 10)})
	}
	all := s.allCounters()
	for _, name := range counterNames() {
		scope, n, _ := strings.Cut(name, ".")
		for _, c := range all[scope] {
			if c.name == n {
				out = append(out, [2]string{name, strconv.FormatInt(c.value.Load(), 10)})
			}
		}
	}
	return out
}

// maxStatsAttrs bounds a tlsmgr_stats reply (it has 43 attributes).
const maxStatsAttrs = 64

// snapshotFromReply reads a tlsmgr_stats reply. The daemon may be another
// user's process: only our names are taken, and only decimal numbers.
func snapshotFromReply(list [][2]string) (*statsSnapshot, error) {
	snap := &statsSnapshot{live: true, entries: map[string]int64{}, bytes: map[string]int64{}, counters: map[string]int64{}}
	known := map[string]bool{}
	for _, n := range counterNames() {
		known[n] = true
	}
	if len(list) == 0 || list[0] != [2]string{"status", "0"} {
		return nil, errors.New("the daemon refused the request")
	}
	for _, kv := range list[1:] {
		v, err := strconv.ParseInt(kv[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("attribute %s: not a number", escapeText(kv[0]))
		}
		label, what, _ := strings.Cut(kv[0], ".")
		switch {
		case kv[0] == "since":
			snap.since = v
		case kv[0] == "now":
			snap.updated = v
		case what == "entries" && slices.Contains(cacheLabels, label):
			snap.entries[label] = v
		case what == "bytes" && slices.Contains(cacheLabels, label):
			snap.bytes[label] = v
		case known[kv[0]]:
			snap.counters[kv[0]] = v
		}
	}
	return snap, nil
}

// askDaemonStats asks a running tlsmgr on socket for its counters. Any
// failure means: read the database instead.
func askDaemonStats(socket string) (*statsSnapshot, error) {
	conn, err := net.DialTimeout("unix", socket, time.Second)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	r := &attrReader{br: bufio.NewReader(conn), streamName: socket}
	announce, err := readListMax(r, 1)
	if err != nil || len(announce) != 1 || announce[0] != [2]string{"protocol", "tlsmgr_protocol"} {
		return nil, errors.New("no tlsmgr_protocol announcement")
	}
	if _, err := conn.Write([]byte("request\x00tlsmgr_stats\x00\x00")); err != nil {
		return nil, err
	}
	reply, err := readListMax(r, maxStatsAttrs)
	if err != nil {
		return nil, err
	}
	return snapshotFromReply(reply)
}

// writeStatsTable is -stats' table, for a person.
func writeStatsTable(w io.Writer, snap *statsSnapshot) error {
	n := func(name string) int64 { return snap.counters[name] }
	from := "written " + unixOrDash(sql.NullInt64{Int64: snap.updated, Valid: snap.updated != 0})
	if snap.live {
		from = "from the running tlsmgr at " + unixOrDash(sql.NullInt64{Int64: snap.updated, Valid: true})
	}
	fmt.Fprintf(w, "tlsmgr statistics since %s, %s\n\n", unixOrDash(sql.NullInt64{Int64: snap.since, Valid: snap.since != 0}), from)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "cache\tentries\tbytes\tlookups\thits\tmisses\thit ratio\texpired\tstores\treplaced\tdeletes\tevictions\tfailures\t")
	for _, label := range cacheLabels {
		c := func(name string) int64 { return n(label + "." + name) }
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t\n", label, snap.entries[label], snap.bytes[label],
			c("lookups"), c("hits"), c("misses"), percent(c("hits"), c("lookups")), c("expired_at_lookup")+c("expired_by_sweep"),
			c("stores"), c("replaced"), c("deletes"), c("evictions"), c("store_failures"))
	}
	tw.Flush()
	fmt.Fprintf(w, "\nticket keys: %d issued, %d found by name, %d not found\n", n("tktkey.keys_issued"), n("tktkey.found"), n("tktkey.not_found"))
	fmt.Fprintf(w, "seed: %d requests, %d bytes\n", n("seed.requests"), n("seed.bytes"))
	if len(snap.keptKeys) > 0 {
		fmt.Fprintf(w, "kept ticket keys: %s\n", strings.Join(snap.keptKeys, "; "))
	}
	return nil
}

// metricHelp describes each counter for HELP lines.
var metricHelp = map[string]string{
	"lookups": "Lookups of the cache.", "hits": "Lookups that found an unexpired session.", "misses": "Lookups that found none.",
	"expired_at_lookup": "Sessions found expired by a lookup, and deleted.", "expired_by_sweep": "Sessions deleted by the expiry sweep.",
	"stores": "Updates that stored a new session.", "replaced": "Updates that replaced a session.", "deletes": "Sessions deleted on request.",
	"evictions": "Sessions evicted because the cache was at a limit.", "store_failures": "Updates that could not be stored.",
	"keys_issued": "Session ticket keys made.", "found": "Session ticket keys asked for by name and found.",
	"not_found": "Session ticket keys asked for by name and not found (unknown or expired).",
	"requests":  "Seed requests answered.", "bytes": "Seed bytes sent.",
}

// writeOpenMetrics writes the Prometheus text format that node_exporter's
// textfile collector reads: HELP and TYPE lines, counters with _total,
// one cache label.
func writeOpenMetrics(w io.Writer, snap *statsSnapshot) error {
	b := bufio.NewWriter(w)
	family := func(name, kind, help string) {
		fmt.Fprintf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, kind)
	}
	family("tlsmgr_cache_entries", "gauge", "Sessions in the cache.")
	for _, label := range cacheLabels {
		fmt.Fprintf(b, "tlsmgr_cache_entries{cache=%q} %d\n", label, snap.entries[label])
	}
	family("tlsmgr_cache_bytes", "gauge", "Bytes of session data in the cache.")
	for _, label := range cacheLabels {
		fmt.Fprintf(b, "tlsmgr_cache_bytes{cache=%q} %d\n", label, snap.bytes[label])
	}
	var c cacheCounters
	for _, nc := range c.named() {
		name := "tlsmgr_cache_" + nc.name + "_total"
		family(name, "counter", metricHelp[nc.name])
		for _, label := range cacheLabels {
			fmt.Fprintf(b, "%s{cache=%q} %d\n", name, label, snap.counters[label+"."+nc.name])
		}
	}
	for _, m := range []struct{ metric, counter string }{
		{"tlsmgr_ticket_keys_issued_total", "tktkey.keys_issued"}, {"tlsmgr_ticket_keys_found_total", "tktkey.found"},
		{"tlsmgr_ticket_keys_not_found_total", "tktkey.not_found"}, {"tlsmgr_seed_requests_total", "seed.requests"},
		{"tlsmgr_seed_bytes_total", "seed.bytes"},
	} {
		_, n, _ := strings.Cut(m.counter, ".")
		family(m.metric, "counter", metricHelp[n])
		fmt.Fprintf(b, "%s %d\n", m.metric, snap.counters[m.counter])
	}
	family("tlsmgr_counters_since_seconds", "gauge", "When counting began (UNIX time).")
	fmt.Fprintf(b, "tlsmgr_counters_since_seconds %d\n", snap.since)
	family("tlsmgr_counters_updated_seconds", "gauge", "When these figures were taken (UNIX time).")
	fmt.Fprintf(b, "tlsmgr_counters_updated_seconds %d\n", snap.updated)
	family("tlsmgr_stats_live", "gauge", "1: asked of the running tlsmgr; 0: read from its database (written every 5 s).")
	fmt.Fprintf(b, "tlsmgr_stats_live %d\n", map[bool]int{true: 1}[snap.live])
	return b.Flush()
}

// writeStatsJSON writes one JSON object.
func writeStatsJSON(w io.Writer, snap *statsSnapshot) error {
	type cacheJSON struct {
		Entries  int64            `json:"entries"`
		Bytes    int64            `json:"bytes"`
		Counters map[string]int64 `json:"counters"`
	}
	out := struct {
		Live       bool                 `json:"live"`
		Since      int64                `json:"since"`
		Updated    int64                `json:"updated"`
		Caches     map[string]cacheJSON `json:"caches"`
		TicketKeys map[string]int64     `json:"ticket_keys"`
		Seed       map[string]int64     `json:"seed"`
	}{Live: snap.live, Since: snap.since, Updated: snap.updated, Caches: map[string]cacheJSON{},
		TicketKeys: map[string]int64{}, Seed: map[string]int64{}}
	for _, label := range cacheLabels {
		out.Caches[label] = cacheJSON{Entries: snap.entries[label], Bytes: snap.bytes[label], Counters: map[string]int64{}}
	}
	for _, name := range counterNames() {
		scope, n, _ := strings.Cut(name, ".")
		switch scope {
		case "tktkey":
			out.TicketKeys[n] = snap.counters[name]
		case "seed":
			out.Seed[n] = snap.counters[name]
		default:
			out.Caches[scope].Counters[n] = snap.counters[name]
		}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

func unixOrDash(t sql.NullInt64) string {
	if !t.Valid {
		return "-"
	}
	return time.Unix(t.Int64, 0).UTC().Format("2006-01-02T15:04:05Z")
}
