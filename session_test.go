package main

import (
	"encoding/pem"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The sessions under testdata/sessions were written by OpenSSL itself
// (see the README there); each NAME.txt is what `openssl sess_id -text`
// says about NAME.pem.
const testCertFingerprint = "0B:AC:6E:A6:C5:53:65:30:54:8E:1B:C4:D8:F2:58:5E:D7:C8:35:26:B3:88:07:8C:98:B4:20:85:DC:5E:D8:BD"

// peer says what the peer sent: "cert" (cert.pem), "rpk-cert"
// (rpk-cert.pem, checked against rpk-cert.txt, openssl x509's reading), a
// raw key ("rpk": the fingerprint is the one in NAME.rpk.txt, openssl
// dgst's over field [20]), or nothing ("").
var decodeCases = []struct {
	file, protocol, cipher, sni string
	ticket                      bool
	peer                        string
}{
	{"tls12-ticket-sni", "TLSv1.2", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "mx.example.org", true, "cert"},
	{"tls13-ticket-sni", "TLSv1.3", "TLS_AES_256_GCM_SHA384", "mx.example.org", true, "cert"},
	{"tls12-noticket", "TLSv1.2", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "", false, "cert"},
	{"tls12-anon", "TLSv1.2", "TLS_DH_anon_WITH_AES_256_GCM_SHA384", "", true, ""},
	{"tls13-psk", "TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256", "", true, ""},
	// OpenSSL 3.5 (Debian 13): raw public keys, RFC 7250. Its s_server did
	// not acknowledge the name the client sent: the sessions have no [6]
	// (openssl asn1parse), so no SNI.
	{"tls13-rpk", "TLSv1.3", "TLS_AES_256_GCM_SHA384", "", true, "rpk"},
	{"tls12-rpk", "TLSv1.2", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "", true, "rpk"},
	{"tls13-rpk-offered", "TLSv1.3", "TLS_AES_256_GCM_SHA384", "", true, "rpk-cert"},
}

// oraclePeer is what OpenSSL's own tools say of the peer of a decodeCases
// session, or nil when it had none.
func oraclePeer(t *testing.T, file, peer string) *peerCert {
	t.Helper()
	switch peer {
	case "cert":
		return &peerCert{
			subject:     "CN=mx.example.org,O=Example Mail,C=DE",
			issuer:      "CN=mx.example.org,O=Example Mail,C=DE",
			fingerprint: testCertFingerprint,
			notAfter:    2110861117, // openssl x509 -enddate: Nov 21 06:18:37 2036 GMT
		}
	case "rpk-cert":
		notAfter, err := time.Parse("Jan _2 15:04:05 2006 MST", oracleLine(t, "rpk-cert.txt", "notAfter=", false))
		if err != nil {
			t.Fatal(err)
		}
		return &peerCert{
			subject:     oracleLine(t, "rpk-cert.txt", "subject=", false),
			issuer:      oracleLine(t, "rpk-cert.txt", "issuer=", false),
			fingerprint: oracleLine(t, "rpk-cert.txt", "sha256 Fingerprint=", false),
			notAfter:    notAfter.Unix(),
		}
	case "rpk":
		// Only the key's fingerprint: a raw key has no names and no expiry.
		if !strings.Contains(oracleLine(t, file+".rpk.txt", "the server's key (rpk-pub.pem) is this key: ", false), "yes") {
			t.Fatalf("%s.rpk.txt: field [20] is not the server's key", file)
		}
		return &peerCert{fingerprint: oracleLine(t, file+".rpk.txt", "openssl dgst -sha256 -c:", true)}
	}
	return nil
}

// oracleLine is the line after the one that starts with label in a
// testdata/sessions text file (an oracle), or the rest of the line that
// starts with label when after is false.
func oracleLine(t *testing.T, file, label string, after bool) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata/sessions", file))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(data), "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, label) {
			if !after {
				return strings.TrimPrefix(l, label)
			}
			if i+1 < len(lines) {
				return strings.TrimSpace(lines[i+1])
			}
		}
	}
	t.Fatalf("%s: no line %q", file, label)
	return ""
}

// testSession returns the DER of one committed session.
func testSession(t testing.TB, name string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata/sessions", name+".pem"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "SSL SESSION PARAMETERS" {
		t.Fatalf("%s.pem: no SSL SESSION PARAMETERS block", name)
	}
	return block.Bytes
}

// opensslSays reads one field of openssl sess_id -text's output.
func opensslSays(t *testing.T, text, field string) string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(field) + `\s*: *(\S*)`).FindStringSubmatch(text)
	if m == nil {
		return ""
	}
	return m[1]
}

func TestDecodeOpenSSLSessions(t *testing.T) {
	for _, tc := range decodeCases {
		t.Run(tc.file, func(t *testing.T) {
			text, err := os.ReadFile(filepath.Join("testdata/sessions", tc.file+".txt"))
			if err != nil {
				t.Fatal(err)
			}
			oracle := string(text)
			info, err := decodeSession(testSession(t, tc.file))
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if info.protocol != tc.protocol || info.protocol != opensslSays(t, oracle, "Protocol") {
				t.Errorf("protocol %q, want %q (openssl: %q)", info.protocol, tc.protocol, opensslSays(t, oracle, "Protocol"))
			}
			if info.cipher != tc.cipher {
				t.Errorf("cipher %q, want %q", info.cipher, tc.cipher)
			}
			for _, f := range []struct {
				field string
				got   int64
			}{
				{"Start Time", info.time},
				{"Timeout", info.timeout},
				{"Verify return code", info.verifyResult},
			} {
				if want := opensslSays(t, oracle, f.field); strconv.FormatInt(f.got, 10) != want {
					t.Errorf("%s: %d, openssl says %s", f.field, f.got, want)
				}
			}
			if want := opensslSays(t, oracle, "TLS session ticket lifetime hint"); tc.ticket && strconv.FormatInt(info.ticketLifetime, 10) != want {
				t.Errorf("ticket lifetime %d, openssl says %s", info.ticketLifetime, want)
			}
			if info.sni != tc.sni || info.hasTicket != tc.ticket {
				t.Errorf("sni %q ticket %v, want %q %v", info.sni, info.hasTicket, tc.sni, tc.ticket)
			}
			want := oraclePeer(t, tc.file, tc.peer)
			if want == nil {
				if info.peer != nil || info.rawKey {
					t.Errorf("peer %+v (raw key %v), want none", info.peer, info.rawKey)
				}
				return
			}
			if info.peer == nil || *info.peer != *want {
				t.Errorf("peer %+v, want %+v", info.peer, want)
			}
			if info.rawKey != (tc.peer == "rpk") {
				t.Errorf("raw key %v, want %v", info.rawKey, tc.peer == "rpk")
			}
		})
	}
}

// Truncated, padded and garbage blobs are not sessions; none may panic.
func TestDecodeRejectsWhatIsNotASession(t *testing.T) {
	good := testSession(t, "tls13-ticket-sni")
	for n := range len(good) {
		if _, err := decodeSession(good[:n]); err == nil {
			t.Fatalf("a session cut to %d of %d bytes decoded", n, len(good))
		}
	}
	for name, blob := range map[string][]byte{
		"empty":           {},
		"trailing byte":   append(append([]byte{}, good...), 0),
		"tlsload payload": []byte("TLSLOAD1\x07\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\xd0\x07\x00\x00"),
		"short sequence":  {0x30, 0x05, 0x02, 0x01, 0x01},
		"long sequence":   {0x30, 0x82, 0x00, 0x01, 0x05, 0x00},
		"5-byte length":   {0x30, 0x85, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00},
		"version 2":       {0x30, 0x0b, 0x02, 0x01, 0x02, 0x02, 0x02, 0x03, 0x04, 0x04, 0x02, 0x13, 0x02},
		"3-byte cipher":   {0x30, 0x0c, 0x02, 0x01, 0x01, 0x02, 0x02, 0x03, 0x04, 0x04, 0x03, 0x00, 0x13, 0x02},
	} {
		if info, err := decodeSession(blob); err == nil {
			t.Errorf("%s decoded as %+v", name, info)
		}
	}
}

func FuzzDecodeSession(f *testing.F) {
	for _, tc := range decodeCases {
		f.Add(testSession(f, tc.file))
	}
	f.Fuzz(func(t *testing.T, blob []byte) {
		info, err := decodeSession(blob)
		if err == nil && (info.protocol == "" || info.cipher == "") {
			t.Fatalf("decoded without protocol or cipher: %+v", info)
		}
	})
}
