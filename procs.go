// How many threads run Go code: one while several clients are active,
// Go's default (one per CPU) while one client or none is.
//
// Postfix's clients ask for short things: a lookup, an update, a seed, a
// ticket key, each answered in tens of µs. With several clients at once,
// one P (GOMAXPROCS=1) answers them back to back on one thread, as stock
// tlsmgr's single process does; with a P per CPU, Go wakes a second
// thread for each request that arrives while the first runs, and our
// threads then wait for the CPUs that the clients themselves need. On two
// CPUs, with a client whose every connection has a thread of its own
// (bench/compare), our threads' run-queue wait per CPU second at 16
// connections was 1.1-1.8 with two Ps, and 0.02-0.38 with one, stock's
// range; the p99 followed it (bench/results/20261125-004556-*). A lone
// client is the other way round: between its requests the CPU it waits on
// halts, and with one P nothing keeps a second one awake, so one P halved
// the throughput of one connection there. Hence the switch.

package main

import (
	"os"
	"runtime"
	"time"
)

// procsWindow is how often the clients are counted, and how recent a
// request must be for its client to count as active.
const procsWindow = 100 * time.Millisecond

// adaptProcs fits the Ps to the clients every procsWindow, until the
// process ends. GOMAXPROCS in the environment is the administrator's
// choice: then, or when Go's default is one P anyway, it does nothing.
func (s *server) adaptProcs() {
	defer logPanic()
	if os.Getenv("GOMAXPROCS") != "" || runtime.GOMAXPROCS(0) == 1 {
		return
	}
	for range time.Tick(procsWindow) {
		s.fitProcs(monoNow())
	}
}

// fitProcs sets one P when two or more clients were active in the last
// window, and Go's default when fewer were.
func (s *server) fitProcs(now time.Duration) {
	one := runtime.GOMAXPROCS(0) == 1
	switch busy := s.activeClients(now-procsWindow) >= 2; {
	case busy && !one:
		runtime.GOMAXPROCS(1)
	case !busy && one:
		runtime.SetDefaultGOMAXPROCS()
	}
}

// activeClients counts the connections that are in a request, or were
// answered after since (monoNow).
func (s *server) activeClients(since time.Duration) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for cc := range s.conns {
		if cc.inRequest.Load() || cc.lastActive.Load() >= int64(since) {
			n++
		}
	}
	return n
}
