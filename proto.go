// The tlsmgr protocol: Postfix's attr0 codec (NUL-terminated name and value
// pairs, a lone NUL ends a list), the "protocol" announcement, and one
// handler per request: seed, policy, lookup, update, delete, tktkey.
//
// SECURITY: everything a client sends is untrusted. Every attribute is
// bounded (maxAttrLen), one deadline (ipc_timeout) covers reading a request
// and writing its reply, buffers grown by a large request are let go
// afterwards, a connection that stalls holds only its own goroutine, and at
// the connection limit the longest-idle client makes room for a new one. A
// malformed request gets a FAIL reply or a closed connection plus a
// warning, never a crash. Ticket keys leave the lock only as copies, and
// are wiped when replaced and at exit.

package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// handshake is sent on every accepted connection (Postfix 3.6 and later).
var handshake = []byte("protocol\x00tlsmgr_protocol\x00\x00")

// maxAttrLen bounds one attribute name or value on input. Postfix 3.7 has
// no bound; real sessions are a few KiB, so 1 MiB costs no client anything.
const maxAttrLen = 1 << 20

// keepBufBytes is how much buffer a connection keeps between requests; a
// larger one, grown by a large session, is released once it is answered.
const keepBufBytes = 64 << 10

type attrType int

const (
	attrStr attrType = iota
	attrInt
	attrData
)

type wantAttr struct {
	name string
	typ  attrType
}

// requestAttrs is the reference's table of requests: the attributes each
// one must carry, in order (postfix-tlsmgr.md §2).
var requestAttrs = map[string][]wantAttr{
	"seed":   {{"size", attrInt}},
	"policy": {{"cache_type", attrStr}},
	"lookup": {{"cache_type", attrStr}, {"cache_id", attrStr}},
	"update": {{"cache_type", attrStr}, {"cache_id", attrStr}, {"session", attrData}},
	"delete": {{"cache_type", attrStr}, {"cache_id", attrStr}},
	"tktkey": {{"keyname", attrData}},
	// Ours: the counters now, for tlsmgr -stats. Postfix never sends it;
	// only root and mail_owner may ask (handleStats).
	"tlsmgr_stats": {},
}

// requestNames interns the request names of requestAttrs.
var requestNames = func() map[string]string {
	m := map[string]string{}
	for name := range requestAttrs {
		m[name] = name
	}
	return m
}()

// errors that end a connection without a reply
var (
	errClientGone = errors.New("client closed the connection")
	errTrigger    = errors.New("master wake-up trigger")
)

// attrReader reads attr0 tokens with Postfix's warnings and a length bound.
type attrReader struct {
	br         *bufio.Reader
	streamName string // "tlsmgr socket", as in Postfix's warnings
	tok        []byte
	req        *request // reused by readRequest when set
}

// token reads one NUL-terminated string. io.EOF before its first byte is
// returned as is; the caller decides whether that is a clean close.
func (r *attrReader) token(context string) ([]byte, error) {
	r.tok = r.tok[:0]
	for {
		chunk, err := r.br.ReadSlice(0)
		if len(r.tok)+len(chunk) > maxAttrLen+1 {
			msg.warn("string length > %d from %s while reading %s", maxAttrLen, r.streamName, context)
			return nil, errClientGone
		}
		r.tok = append(r.tok, chunk...)
		switch {
		case err == nil:
			return r.tok[:len(r.tok)-1], nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case err == io.EOF && len(r.tok) == 0:
			return nil, io.EOF
		case isTimeout(err):
			msg.warn("timeout on %s while reading %s", r.streamName, context)
			return nil, errClientGone
		default:
			msg.warn("premature end-of-input on %s while reading %s", r.streamName, context)
			return nil, errClientGone
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// parseUint mimics sscanf("%u%c"): leading blanks and a sign are allowed,
// the value wraps modulo 2^32, overflow saturates, and trailing bytes or an
// empty string are errors.
func parseUint(b []byte) (uint32, bool) {
	s := string(b)
	i := 0
	for i < len(s) && (s[i] == ' ' || (s[i] >= '\t' && s[i] <= '\r')) {
		i++
	}
	neg := false
	if i < len(s) && (s[i] == '+' || s[i] == '-') {
		neg = s[i] == '-'
		i++
	}
	j := i
	for j < len(s) && s[j] >= '0' && s[j] <= '9' {
		j++
	}
	if j == i || j != len(s) {
		return 0, false
	}
	v, err := strconv.ParseUint(s[i:j], 10, 64)
	if err != nil {
		return 0xFFFFFFFF, true // strtoul's ULONG_MAX, truncated to 32 bits
	}
	if neg {
		v = -v
	}
	return uint32(v), true
}

// decodeBase64 follows Postfix's base64_decode: the length must be a
// multiple of 4, decoding stops at the first '=' in the third or fourth
// position of a quad, and non-zero padding bits are tolerated.
func decodeBase64(b []byte) ([]byte, bool) {
	if len(b)%4 != 0 {
		return nil, false
	}
	// Fast path: well-formed base64, which is what Postfix sends. The
	// standard decoder skips \r and \n, which Postfix refuses, so input
	// with either takes the careful path below.
	if bytes.IndexByte(b, '\n') < 0 && bytes.IndexByte(b, '\r') < 0 {
		out := make([]byte, base64.StdEncoding.DecodedLen(len(b)))
		if n, err := base64.StdEncoding.Decode(out, b); err == nil {
			return out[:n], true
		}
	}
	end := len(b)
	for q := 0; q < len(b); q += 4 {
		for k := 0; k < 4; k++ {
			c := b[q+k]
			if c == '=' {
				if k < 2 {
					return nil, false
				}
				end = q + k
				goto decode
			}
			if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '+' || c == '/') {
				return nil, false
			}
		}
	}
decode:
	out := make([]byte, base64.RawStdEncoding.DecodedLen(end))
	n, err := base64.RawStdEncoding.Decode(out, b[:end])
	if err != nil {
		return nil, false
	}
	return out[:n], true
}

// attrWriter builds one reply in memory; it goes out in one write.
type attrWriter struct{ buf []byte }

func (w *attrWriter) str(name, value string) {
	w.buf = append(append(append(append(w.buf, name...), 0), value...), 0)
}

// int writes a status or count the way attr_print0 does: "%u" of 32 bits.
func (w *attrWriter) int(name string, v int) {
	w.buf = append(append(w.buf, name...), 0)
	w.buf = strconv.AppendUint(w.buf, uint64(uint32(int32(v))), 10)
	w.buf = append(w.buf, 0)
}

func (w *attrWriter) data(name string, v []byte) {
	w.buf = append(append(w.buf, name...), 0)
	w.buf = base64.StdEncoding.AppendEncode(w.buf, v)
	w.buf = append(w.buf, 0)
}

func (w *attrWriter) end() { w.buf = append(w.buf, 0) }

// request is one parsed request; ok is false when its attributes did not
// parse (the handler then answers FAIL with empty payloads).
type request struct {
	name       string
	ok         bool
	strs       [3]string
	num        uint32
	data       []byte
	encodedLen int // of data, in base64: the bytes of the read buffer it took
}

// server holds what every connection shares.
type server struct {
	store        *store
	pool         *pool
	keys         *ticketKeys
	ipcTimeout   time.Duration
	streamName   string
	maxConns     int    // tlsmgr_max_connections; 0 means no limit
	busy, idle   func() // master(8) status records, or nil
	strayArg     string // a non-option argument: fatal at the first request
	firstRequest sync.Once

	mu        sync.Mutex
	conns     map[*clientConn]struct{}
	listeners []net.Listener
	draining  bool           // exit has begun: no new connections or requests
	inFlight  sync.WaitGroup // requests being answered, for an orderly exit
}

// clientStream is a client connection, or stdin and stdout for -S.
type clientStream interface {
	io.ReadWriter
	SetDeadline(time.Time) error
}

// clientConn is one accepted connection and what the connection limit
// needs to know about it.
type clientConn struct {
	net.Conn
	lastActive atomic.Int64 // monoNow of the accept or of the last reply
	inRequest  atomic.Bool  // between reading a request and writing its reply
}

// serveConn runs one client connection until it closes. announce is false
// only for -S (stdin) mode, where Postfix sends no handshake; cc is nil
// there too.
func (s *server) serveConn(rw clientStream, cc *clientConn, announce bool) {
	if announce {
		rw.SetDeadline(time.Now().Add(s.ipcTimeout))
		if _, err := rw.Write(handshake); err != nil {
			return
		}
	}
	r := &attrReader{br: bufio.NewReaderSize(rw, 4096), streamName: s.streamName}
	w := &attrWriter{buf: make([]byte, 0, 512)}
	r.req = new(request) // reused for every request of this connection
	for {
		// One deadline covers reading a request and writing its reply: a
		// client that stops reading loses its connection after ipc_timeout.
		rw.SetDeadline(time.Now().Add(s.ipcTimeout))
		req, err := s.readRequest(r)
		if err != nil {
			if err == errTrigger {
				msg.debug("received master trigger")
			}
			return
		}
		if req == nil {
			continue // a lone NUL: Postfix treats it as a trigger and says nothing
		}
		if !s.beginRequest() {
			return // exiting: the client retries with our successor
		}
		if cc != nil {
			cc.inRequest.Store(true)
		}
		if s.busy != nil {
			s.busy()
		}
		s.firstRequest.Do(func() {
			if s.strayArg != "" {
				msg.fatal("unexpected command-line argument: %s", s.strayArg)
			}
		})
		w.buf = w.buf[:0]
		s.handle(req, w, cc)
		_, werr := rw.Write(w.buf)
		clear(w.buf) // it held a seed, a key or a session: gone once sent
		if req.name == "update" {
			clear(req.data)
			clear(r.tok[:min(req.encodedLen+1, cap(r.tok))]) // the session, base64-encoded
		}
		if werr != nil && isTimeout(werr) {
			msg.warn("timeout on %s while writing a reply: the client does not read; closing the connection", s.streamName)
		}
		if s.idle != nil {
			s.idle()
		}
		if cc != nil {
			cc.inRequest.Store(false)
			cc.lastActive.Store(int64(monoNow()))
		}
		s.inFlight.Done()
		req.data = nil
		if cap(r.tok) > keepBufBytes {
			r.tok = nil
		}
		if cap(w.buf) > keepBufBytes {
			w.buf = make([]byte, 0, 512)
		}
		if werr != nil {
			return
		}
	}
}

// beginRequest counts a request in flight, unless exit has begun.
func (s *server) beginRequest() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return false
	}
	s.inFlight.Add(1)
	return true
}

// drain is the first step of an orderly exit: stop accepting, let the
// requests in flight be answered (for at most limit), close every client
// connection. Only then may the exchange file be saved and the pool wiped.
func (s *server) drain(limit time.Duration) {
	s.mu.Lock()
	s.draining = true
	listeners := s.listeners
	s.mu.Unlock()
	for _, ln := range listeners {
		ln.Close()
	}
	done := make(chan struct{})
	go func() { s.inFlight.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(limit):
		msg.warn("requests still in flight %v after the exit began; exiting anyway", limit)
	}
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
}

// readRequest reads one request list with the semantics of Postfix's
// STRICT scan; see postfix-tlsmgr.md §1.3 and §1.5. A nil request with a
// nil error means "nothing to answer".
func (s *server) readRequest(r *attrReader) (*request, error) {
	first, err := r.token("input attribute name")
	if err == io.EOF {
		return nil, errClientGone
	}
	if err != nil {
		return nil, err
	}
	req := r.req
	if req == nil {
		req = new(request)
	}
	*req = request{}
	fail := func(name string) (*request, error) {
		r.br.Discard(r.br.Buffered()) // Postfix drops what is left of a bad request
		req.name, req.ok = name, false
		return req, nil
	}
	switch {
	case string(first) == "W" && r.br.Buffered() == 0:
		return nil, errTrigger
	case len(first) == 0 && r.br.Buffered() == 0:
		return nil, nil
	case len(first) == 0:
		msg.warn("missing attribute request in input from %s", r.streamName)
		return fail("")
	case string(first) != "request":
		msg.warn("unexpected attribute %s from %s (expecting: request)", first, r.streamName)
		return fail("")
	}
	value, err := r.token("input attribute value")
	if err != nil {
		return nil, errClientGone
	}
	want, known := requestAttrs[string(value)] // no allocation for the lookup
	if !known {
		msg.warn("unknown request %q from %s", value, r.streamName)
		return fail(string(value))
	}
	req.name = requestNames[string(value)] // interned: no allocation per request
	for i, a := range want {
		name, err := r.token("input attribute name")
		if err != nil {
			return nil, errClientGone
		}
		if len(name) == 0 {
			msg.warn("missing attribute %s in input from %s", a.name, r.streamName)
			return req, nil
		}
		if string(name) != a.name {
			msg.warn("unexpected attribute %s from %s (expecting: %s)", name, r.streamName, a.name)
			return fail(req.name)
		}
		v, err := r.token("input attribute value")
		if err != nil {
			return nil, errClientGone
		}
		switch a.typ {
		case attrStr:
			req.strs[i] = string(v)
		case attrInt:
			n, ok := parseUint(v)
			if !ok {
				msg.warn("malformed numerical data from %s while reading input attribute value: %.100s", r.streamName, v)
				return fail(req.name)
			}
			req.num = n
		case attrData:
			req.encodedLen = len(v)
			d, ok := decodeBase64(v)
			if !ok {
				// Never the bytes: a session or a key name may be secret.
				msg.warn("malformed base64 data from %s while reading input attribute value: %s, %d bytes", r.streamName, a.name, len(v))
				return fail(req.name)
			}
			req.data = d
		}
	}
	req.ok = true
	end, err := r.token("input attribute name")
	if err != nil {
		return nil, errClientGone
	}
	if len(end) != 0 {
		// Postfix warns, still executes the request, and drops the rest.
		msg.warn("unexpected attribute %s from %s (expecting: (list terminator))", end, r.streamName)
		r.br.Discard(r.br.Buffered())
	}
	return req, nil
}

// handle answers one request; the reply attributes and their order are
// those of postfix-tlsmgr.md §2.
func (s *server) handle(req *request, w *attrWriter, cc *clientConn) {
	switch req.name {
	case "tlsmgr_stats":
		s.handleStats(w, cc)
	case "seed":
		s.handleSeed(req, w)
	case "policy":
		s.handlePolicy(req, w)
	case "lookup":
		s.handleLookup(req, w)
	case "update":
		w.int("status", s.cacheOp(req, func(c *cache) int { return s.store.update(c, req.strs[1], req.data) }))
	case "delete":
		w.int("status", s.cacheOp(req, func(c *cache) int { return s.store.remove(c, req.strs[1]) }))
	case "tktkey":
		s.handleTktkey(req, w)
	default:
		// A bad first attribute or an unknown request: status only. Postfix
		// sends nothing for an unknown request and the client hangs.
		w.int("status", statFail)
	}
	w.end()
}

// handleStats answers tlsmgr -stats with the counters as they are now, to
// root and to our own user (mail_owner) only, by the peer's credentials on
// the UNIX socket; anyone else gets FAIL, with a warning.
func (s *server) handleStats(w *attrWriter, cc *clientConn) {
	uid, ok := peerUID(cc)
	if !ok || (uid != 0 && uid != os.Geteuid()) {
		msg.warnLimited("stats request", "tlsmgr_stats request from uid %d on %s: only root and mail_owner may ask; refused", uid, s.streamName)
		w.int("status", statFail)
		return
	}
	w.int("status", statOK)
	for _, kv := range s.store.liveStats() {
		w.str(kv[0], kv[1])
	}
}

// peerUID is the uid of the process at the other end of a UNIX socket.
func peerUID(cc *clientConn) (int, bool) {
	if cc == nil {
		return -1, false
	}
	uc, ok := cc.Conn.(*net.UnixConn)
	if !ok {
		return -1, false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return -1, false
	}
	var cred *syscall.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil || cerr != nil {
		return -1, false
	}
	return int(cred.Uid), true
}

func (s *server) handleSeed(req *request, w *attrWriter) {
	if !req.ok {
		w.int("status", statFail)
		w.data("seed", nil)
		return
	}
	size := int32(req.num)
	if size < 1 || size > 255 {
		msg.warn("bogus seed length \"%d\" in \"seed\" request", size)
		w.int("status", statFail)
		w.data("seed", nil)
		return
	}
	var buf [255]byte
	seed := buf[:size]
	if err := s.pool.read(seed); err != nil {
		msg.warn("cannot generate %d seed bytes: %v", size, err)
		w.int("status", statErr)
		w.data("seed", nil)
		return
	}
	s.store.service.seedRequests.Add(1)
	s.store.service.seedBytes.Add(int64(size))
	w.int("status", statOK)
	w.data("seed", seed)
	clear(seed)
}

// cacheFor returns the cache a request names, or a status to answer with.
func (s *server) cacheFor(req *request) (*cache, int) {
	c, known := s.store.caches[req.strs[0]]
	if !known {
		msg.warn("bogus cache type \"%s\" in \"%s\" request", req.strs[0], req.name)
		return nil, statFail
	}
	return c, statOK
}

func (s *server) handlePolicy(req *request, w *attrWriter) {
	status, cachable, timeout := statFail, 0, int64(0)
	if req.ok {
		if c, st := s.cacheFor(req); c != nil {
			status, timeout = statOK, c.timeout
			if c.enabled() {
				cachable = 1
			}
		} else {
			status = st
		}
	}
	w.int("status", status)
	w.int("cachable", cachable)
	w.int("timeout", int(timeout))
}

// cacheOp runs op on an enabled cache; a disabled cache answers FAIL
// without a log line, as in Postfix.
func (s *server) cacheOp(req *request, op func(*cache) int) int {
	if !req.ok {
		return statFail
	}
	c, st := s.cacheFor(req)
	if c == nil {
		return st
	}
	if !c.enabled() {
		return statFail
	}
	if c.shared == nil && !s.store.usable() {
		return statErr // the database is still being opened: not found, not stored
	}
	return op(c)
}

func (s *server) handleLookup(req *request, w *attrWriter) {
	var session []byte
	status := s.cacheOp(req, func(c *cache) int {
		var st int
		session, st = s.store.lookup(c, req.strs[1])
		return st
	})
	w.int("status", status)
	w.data("session", session)
	clear(session) // the driver's copy
}

func (s *server) handleTktkey(req *request, w *attrWriter) {
	noKey := func(status int, keybuf []byte) {
		w.int("status", status)
		w.data("keybuf", keybuf)
	}
	switch {
	case !req.ok:
		noKey(statFail, nil)
		return
	case len(req.data) != 0 && len(req.data) != ticketNameLen:
		msg.warn("invalid session ticket key name length: %d", len(req.data))
		noKey(statFail, nil)
		return
	case s.keys.disabled():
		noKey(statErr, nil)
		return
	}
	var key ticketKey // a copy: the shared keys never leave their lock
	var found bool
	if len(req.data) == 0 {
		var err error
		var made bool
		if key, made, err = s.keys.issue(); err != nil {
			msg.warn("cannot create session ticket key: %v", err)
			noKey(statErr, nil)
			return
		}
		if made {
			s.store.service.keysIssued.Add(1)
		}
	} else if key, found = s.keys.find(req.data); !found {
		s.store.service.keysNotFound.Add(1)
		noKey(statErr, req.data) // Postfix echoes the name it could not find
		return
	} else {
		s.store.service.keysFound.Add(1)
	}
	defer key.wipe()
	buf := key.marshal()
	w.int("status", statOK)
	w.data("keybuf", buf[:])
	clear(buf[:])
}

// serveListener accepts connections until the listener is closed; at
// tlsmgr_max_connections the longest-idle client makes room.
func (s *server) serveListener(ln net.Listener) {
	s.mu.Lock()
	if s.draining {
		s.mu.Unlock()
		ln.Close()
		return
	}
	s.listeners = append(s.listeners, ln)
	s.mu.Unlock()
	var delay time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off, keep serving.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			msg.warnLimited("accept", "accept connection on %s: %v", s.streamName, err)
			time.Sleep(delay)
			continue
		}
		delay = 0
		cc := s.admit(conn)
		if cc == nil {
			conn.Close() // exiting
			continue
		}
		go func() {
			defer logPanic()
			defer s.release(cc)
			s.serveConn(cc, cc, true)
		}()
	}
}

// admit registers a new connection. At the limit it closes the connection
// that has waited longest for its next request, never the new one: idle
// clients must not lock out one that has work (stock tlsmgr, with no
// limit, serves them all).
func (s *server) admit(conn net.Conn) *clientConn {
	cc := &clientConn{Conn: conn}
	cc.lastActive.Store(int64(monoNow()))
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return nil
	}
	if s.conns == nil {
		s.conns = map[*clientConn]struct{}{}
	}
	if s.maxConns > 0 && len(s.conns) >= s.maxConns {
		victim := s.longestIdle()
		delete(s.conns, victim)
		victim.Close()
		idle := (monoNow() - time.Duration(victim.lastActive.Load())).Round(time.Second)
		msg.warnLimited("connection limit", "%s: %d connections, the tlsmgr_max_connections limit: closed the one idle for %v to serve a new one",
			s.streamName, s.maxConns, idle)
	}
	s.conns[cc] = struct{}{}
	return cc
}

// longestIdle picks the connection to close: one between requests before
// one in the middle of a request, then the one quiet for longest.
func (s *server) longestIdle() *clientConn {
	var victim *clientConn
	for c := range s.conns {
		switch {
		case victim == nil:
			victim = c
		case victim.inRequest.Load() != c.inRequest.Load():
			if victim.inRequest.Load() {
				victim = c
			}
		case c.lastActive.Load() < victim.lastActive.Load():
			victim = c
		}
	}
	return victim
}

func (s *server) release(cc *clientConn) {
	s.mu.Lock()
	delete(s.conns, cc)
	s.mu.Unlock()
	cc.Close()
}

// stdio joins stdin and stdout for -S mode, which has no deadline.
type stdio struct{}

func (stdio) Read(p []byte) (int, error)  { return os.Stdin.Read(p) }
func (stdio) Write(p []byte) (int, error) { return os.Stdout.Write(p) }
func (stdio) SetDeadline(time.Time) error { return nil }
