package main

import (
	"fmt"
	"strings"
	"testing"
)

// benchCase is one request type: the attributes of its i-th request.
type benchCase struct {
	name string
	req  func(i int) []string
}

// benchServer starts a server with 1000 smtpd sessions stored and returns
// it with the request types the benchmarks send.
func benchServer(b *testing.B) (*testServer, []benchCase) {
	s := startServer(b, allCaches(3600))
	session := b64(strings.Repeat("s", 2000))                  // opaque: the columns stay NULL
	openssl := b64(string(testSession(b, "tls12-ticket-sni"))) // decoded, peer certificate and all
	c := dial(b, s.sock)
	for i := range 1000 {
		if got := c.req("request", "update", "cache_type", "smtpd", "cache_id", fmt.Sprintf("id%d", i), "session", session); got != "status=0" {
			b.Fatalf("prefill: %s", got)
		}
	}
	return s, []benchCase{
		{"seed32", func(int) []string { return []string{"request", "seed", "size", "32"} }},
		{"tktkey", func(int) []string { return []string{"request", "tktkey", "keyname", ""} }},
		{"policy", func(int) []string { return []string{"request", "policy", "cache_type", "smtpd"} }},
		{"lookup2000", func(i int) []string {
			return []string{"request", "lookup", "cache_type", "smtpd", "cache_id", fmt.Sprintf("id%d", i%1000)}
		}},
		{"update2000", func(i int) []string {
			return []string{"request", "update", "cache_type", "smtpd", "cache_id", fmt.Sprintf("id%d", i%1000), "session", session}
		}},
		{"updateOpenSSL", func(i int) []string {
			return []string{"request", "update", "cache_type", "smtp", "cache_id", fmt.Sprintf("id%d", i%1000), "session", openssl}
		}},
	}
}

// BenchmarkRequests measures one request and its reply over a UNIX socket
// to an in-process server, for each request type. Socket, codec, PRNG and
// SQLite are all in the path; master(8) is not. Compare releases with
// benchstat; compare with Postfix's own tlsmgr with ../shared/bench/tlsload.
func BenchmarkRequests(b *testing.B) {
	s, cases := benchServer(b)
	c := dial(b, s.sock)
	for _, bc := range cases {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				if got := c.req(bc.req(i)...); !strings.HasPrefix(got, "status=0") {
					b.Fatalf("%s: %.60s", bc.name, got)
				}
			}
		})
	}
}

// BenchmarkDecodeBase64 is the update path's decoding of a 2000-byte session.
func BenchmarkDecodeBase64(b *testing.B) {
	in := []byte(b64(strings.Repeat("s", 2000)))
	b.ReportAllocs()
	b.SetBytes(int64(len(in)))
	for b.Loop() {
		if _, ok := decodeBase64(in); !ok {
			b.Fatal("not decoded")
		}
	}
}

// BenchmarkSeedBytes is the seed request's own work: 32 bytes from the
// pool, with the time stirred in (Hash_DRBG generate with additional
// input), under the pool's lock.
func BenchmarkSeedBytes(b *testing.B) {
	p, err := newPool()
	if err != nil {
		b.Fatal(err)
	}
	var out [32]byte
	b.ReportAllocs()
	for b.Loop() {
		if err := p.read(out[:]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeSession is the update path's reading of a session's
// columns: an OpenSSL session with its peer certificate, and an opaque
// blob such as tlsload sends, which is turned away.
func BenchmarkDecodeSession(b *testing.B) {
	for name, blob := range map[string][]byte{
		"openssl": testSession(b, "tls12-ticket-sni"),
		"opaque":  []byte("TLSLOAD1" + strings.Repeat("s", 1992)),
	} {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				decodedValues(blob)
			}
		})
	}
}

// BenchmarkParallelRequests is BenchmarkRequests with sixteen clients at
// once, as tlsload -conns 16: contention (the PRNG lock, the writer, the
// lookup connections, the scheduler) shows here and not with one client.
func BenchmarkParallelRequests(b *testing.B) {
	s, cases := benchServer(b)
	for _, bc := range cases {
		if bc.name == "policy" || bc.name == "updateOpenSSL" {
			continue // no lock or I/O of their own beside the others
		}
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetParallelism(8) // 16 clients on two CPUs
			b.RunParallel(func(pb *testing.PB) {
				c := dial(b, s.sock)
				for i := 0; pb.Next(); i++ {
					if got := c.req(bc.req(i)...); !strings.HasPrefix(got, "status=0") {
						b.Errorf("%s: %.60s", bc.name, got)
						return
					}
				}
			})
		})
	}
}
