package main

import (
	"bufio"
	"bytes"
	"io"
	"path/filepath"
	"testing"
)

// FuzzRequests feeds arbitrary bytes to the request reader and handlers:
// no input may crash the server, and every reply must be a well-formed
// attr0 list that starts with "status". Its seeds run in every go test;
// explore with: go test -fuzz FuzzRequests -fuzztime 1m
func FuzzRequests(f *testing.F) {
	for _, seed := range []string{
		"request\x00seed\x00size\x0032\x00\x00",
		"request\x00policy\x00cache_type\x00smtpd\x00\x00",
		"request\x00lookup\x00cache_type\x00smtp\x00cache_id\x00x\x00\x00",
		"request\x00update\x00cache_type\x00smtp\x00cache_id\x00x\x00session\x00aGVsbG8=\x00\x00",
		"request\x00delete\x00cache_type\x00smtp\x00cache_id\x00x\x00\x00",
		"request\x00tktkey\x00keyname\x00\x00\x00",
		"request\x00tktkey\x00keyname\x00AAECAwQFBgcICQoLDA0ODw==\x00\x00",
		"request\x00update\x00cache_type\x00smtp\x00cache_id\x00x\x00session\x00a===\x00extra\x00\x00",
		"W\x00", "\x00", "\x00\x00\x00", "request\x00", "frob\x00x\x00\x00", "request\x00seed\x00size\x00-1\x00\x00",
	} {
		f.Add([]byte(seed))
	}
	st, err := openStore(filepath.Join(f.TempDir(), "fuzz.sqlite"), allCaches(3600), 500)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(st.close)
	p, _ := newPool()
	srv := &server{store: st, pool: p, keys: newTicketKeys(3600, p), streamName: "tlsmgr socket"}
	msg.mu.Lock()
	oldOut := msg.out
	msg.out = io.Discard
	msg.mu.Unlock()
	f.Cleanup(func() { msg.mu.Lock(); msg.out = oldOut; msg.mu.Unlock() })

	f.Fuzz(func(t *testing.T, input []byte) {
		r := &attrReader{br: bufio.NewReaderSize(bytes.NewReader(input), 4096), streamName: srv.streamName}
		w := &attrWriter{}
		for i := 0; i <= len(input); i++ { // each request consumes at least one byte
			req, err := srv.readRequest(r)
			if err != nil {
				return
			}
			if req == nil {
				continue
			}
			w.buf = w.buf[:0]
			srv.handle(req, w, nil)
			reply := w.buf
			if !bytes.HasPrefix(reply, []byte("status\x00")) || !bytes.HasSuffix(reply, []byte("\x00\x00")) {
				t.Fatalf("input %q: malformed reply %q", input, reply)
			}
			if n := bytes.Count(reply, []byte{0}); n%2 != 1 {
				t.Fatalf("input %q: reply %q has an odd name/value count", input, reply)
			}
		}
		t.Fatalf("input %q: reader did not finish", input)
	})
}
