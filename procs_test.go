package main

import (
	"runtime"
	"testing"
	"time"
)

// One P while two or more clients were active in the last window; Go's
// default again once fewer were. A client is active while in a request,
// or if it was answered within the window; an open, idle connection is not.
func TestProcsFollowActiveClients(t *testing.T) {
	before := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(before) })
	runtime.SetDefaultGOMAXPROCS()
	defaultProcs := runtime.GOMAXPROCS(0)
	if defaultProcs == 1 {
		t.Fatalf("Go's default here is one P (%d CPUs): nothing to switch; CI has two", runtime.NumCPU())
	}
	now := time.Hour // on the monotonic clock (monoNow)
	type client struct {
		answered  time.Duration // this long before now
		inRequest bool
	}
	idle, recent, busy := client{answered: time.Minute}, client{answered: procsWindow / 2}, client{answered: time.Minute, inRequest: true}
	for _, step := range []struct {
		name    string
		clients []client
		want    int
	}{
		{"no clients", nil, defaultProcs},
		{"one client in a request", []client{busy}, defaultProcs},
		{"one active, 15 idle connections", append([]client{recent}, repeat(idle, 15)...), defaultProcs},
		{"two active", []client{recent, busy}, 1},
		{"sixteen active", repeat(recent, 16), 1},
		{"sixteen active, still", repeat(recent, 16), 1},
		{"one active again", []client{recent, idle}, defaultProcs},
		{"two answered just outside the window", repeat(client{answered: procsWindow + time.Millisecond}, 2), defaultProcs},
	} {
		s := &server{conns: map[*clientConn]struct{}{}}
		for _, c := range step.clients {
			cc := &clientConn{}
			cc.lastActive.Store(int64(now - c.answered))
			cc.inRequest.Store(c.inRequest)
			s.conns[cc] = struct{}{}
		}
		s.fitProcs(now)
		if got := runtime.GOMAXPROCS(0); got != step.want {
			t.Errorf("%s: GOMAXPROCS %d, want %d", step.name, got, step.want)
		}
	}
}

func repeat[T any](v T, n int) []T {
	s := make([]T, n)
	for i := range s {
		s[i] = v
	}
	return s
}
