// Decoding the session blobs that Postfix stores, for the readable columns
// of the cache tables.
//
// smtpd, smtp and lmtp send the output of OpenSSL's i2d_SSL_SESSION: the
// DER encoding of
//
//	SSL_SESSION_ASN1 ::= SEQUENCE {
//	    version            INTEGER (1),
//	    ssl_version        INTEGER,            -- 0x0303 TLS 1.2, 0x0304 TLS 1.3
//	    cipher             OCTET STRING,       -- the 2-byte IANA cipher suite number
//	    session_id         OCTET STRING,
//	    master_key         OCTET STRING,       -- secret
//	    key_arg        [0] IMPLICIT OCTET STRING OPTIONAL,   -- OpenSSL 1.0 only
//	    time           [1] EXPLICIT INTEGER OPTIONAL,
//	    timeout        [2] EXPLICIT INTEGER OPTIONAL,
//	    peer           [3] EXPLICIT Certificate OPTIONAL,
//	    session_id_ctx [4] EXPLICIT OCTET STRING OPTIONAL,
//	    verify_result  [5] EXPLICIT INTEGER OPTIONAL,       -- absent = 0, X509_V_OK
//	    hostname       [6] EXPLICIT OCTET STRING OPTIONAL,  -- SNI
//	    psk_identity_hint [7], psk_identity [8]   OPTIONAL,  -- secret enough
//	    ticket_lifetime_hint [9] EXPLICIT INTEGER OPTIONAL,
//	    ticket        [10] EXPLICIT OCTET STRING OPTIONAL,  -- secret
//	    comp_id [11], srp_username [12], flags [13], ticket_age_add [14],
//	    max_early_data [15], alpn_selected [16], max_fragment_len_mode [17],
//	    ticket_appdata [18], kex_group [19]                  -- skipped
//	    peer_rpk      [20] EXPLICIT OCTET STRING OPTIONAL,  -- OpenSSL 3.2+: the
//	                                 -- peer's raw public key (RFC 7250), a DER SubjectPublicKeyInfo
//	}
//
// (OpenSSL's ssl/ssl_asn1.c). The blob stays opaque to the protocol: it is
// stored exactly as it came, and a blob that does not decode only leaves
// the columns NULL. SECURITY: only what is not secret is taken out (never
// the master key, the ticket, PSK identities or resumption secrets),
// decoding errors are never logged with the bytes that caused them, and
// the text a peer chose (SNI, certificate subject and issuer) is stored
// with its control characters escaped, so that no reader of the sessions
// view gets a terminal escape sequence from a remote server.

package main

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
)

// sessionInfo is what the readable columns hold for one session.
type sessionInfo struct {
	protocol       string // TLSv1.2, TLSv1.3, ...
	cipher         string // IANA name, or 0xXXXX when we do not know it
	time, timeout  int64  // when the session was made, and OpenSSL's lifetime for it
	sni            string // the server name the client asked for; "" = none
	hasTicket      bool   // it resumes by RFC 5077 / TLS 1.3 ticket
	ticketLifetime int64  // the server's lifetime hint, seconds
	verifyResult   int64  // OpenSSL's X509_V_* result of the peer's certificate or raw key
	peer           *peerCert
	// rawKey: the peer authenticated with a raw public key (RFC 7250,
	// Postfix 3.10's *_tls_enable_rpk), not a certificate; peer then has
	// only its fingerprint, the SHA-256 of the SubjectPublicKeyInfo.
	rawKey bool
}

// peerCert is the part of the peer's certificate an administrator asks for.
type peerCert struct {
	subject, issuer string // RFC 2253, as openssl x509 -nameopt RFC2253 prints them; controls as \HH
	fingerprint     string // SHA-256 of the DER (a raw key's: of its SubjectPublicKeyInfo), colon-separated upper-case hex, as Postfix logs it
	notAfter        int64  // UNIX time; 0 when the validity does not parse
}

// sslSessionASN1 mirrors OpenSSL's SSL_SESSION_ASN1. Secret fields are
// RawValues: encoding/asn1 copies []byte fields, and the secrets must not
// be copied anywhere.
type sslSessionASN1 struct {
	Version      int64
	SSLVersion   int64
	Cipher       []byte
	SessionID    asn1.RawValue
	MasterKey    asn1.RawValue
	KeyArg       asn1.RawValue `asn1:"optional,tag:0"`
	Time         int64         `asn1:"optional,explicit,tag:1"`
	Timeout      int64         `asn1:"optional,explicit,tag:2"`
	Peer         asn1.RawValue `asn1:"optional,explicit,tag:3"`
	SessionIDCtx asn1.RawValue `asn1:"optional,explicit,tag:4"`
	VerifyResult int64         `asn1:"optional,explicit,tag:5"`
	Hostname     []byte        `asn1:"optional,explicit,tag:6"`
	PSKHint      asn1.RawValue `asn1:"optional,explicit,tag:7"`
	PSKIdentity  asn1.RawValue `asn1:"optional,explicit,tag:8"`
	TickLifetime int64         `asn1:"optional,explicit,tag:9"`
	Ticket       asn1.RawValue `asn1:"optional,explicit,tag:10"`
	// [11]..[19] are only stepped over: encoding/asn1 tries each field at
	// the next element and ignores what follows the last field, so [20]
	// is reached only when every field before it may take its element.
	CompID        asn1.RawValue `asn1:"optional,explicit,tag:11"`
	SRPUsername   asn1.RawValue `asn1:"optional,explicit,tag:12"`
	Flags         asn1.RawValue `asn1:"optional,explicit,tag:13"`
	TickAgeAdd    asn1.RawValue `asn1:"optional,explicit,tag:14"`
	MaxEarlyData  asn1.RawValue `asn1:"optional,explicit,tag:15"`
	ALPN          asn1.RawValue `asn1:"optional,explicit,tag:16"`
	MaxFragLen    asn1.RawValue `asn1:"optional,explicit,tag:17"`
	TicketAppData asn1.RawValue `asn1:"optional,explicit,tag:18"`
	KexGroup      asn1.RawValue `asn1:"optional,explicit,tag:19"`
	PeerRPK       asn1.RawValue `asn1:"optional,explicit,tag:20"`
}

var errNotSession = errors.New("not an OpenSSL SSL_SESSION")

// decodeSession reads the non-secret parts of an i2d_SSL_SESSION blob.
func decodeSession(blob []byte) (*sessionInfo, error) {
	if !isOneDERSequence(blob) {
		return nil, errNotSession
	}
	var s sslSessionASN1
	rest, err := asn1.Unmarshal(blob, &s)
	if err != nil || len(rest) != 0 || s.Version != 1 || len(s.Cipher) != 2 {
		return nil, errNotSession
	}
	info := &sessionInfo{
		protocol:       protocolName(s.SSLVersion),
		cipher:         cipherName(uint16(s.Cipher[0])<<8 | uint16(s.Cipher[1])),
		time:           s.Time,
		timeout:        s.Timeout,
		sni:            peerText(s.Hostname),
		hasTicket:      len(s.Ticket.Bytes) > 0,
		ticketLifetime: s.TickLifetime,
		verifyResult:   s.VerifyResult,
	}
	if info.protocol == "" {
		return nil, errNotSession
	}
	if len(s.Peer.Bytes) > 0 { // an explicit tag: Bytes is the Certificate inside it
		info.peer = peerCerts.get(s.Peer.Bytes)
	} else if spki := rawPublicKey(s.PeerRPK.Bytes); spki != nil {
		sum := sha256.Sum256(spki)
		info.peer, info.rawKey = &peerCert{fingerprint: colonHex(sum[:])}, true
	}
	return info, nil
}

// rawPublicKey is the SubjectPublicKeyInfo in field [20]'s OCTET STRING
// (Bytes of the explicit tag), or nil when there is none or it is not one
// DER SEQUENCE. The fingerprint is taken over these bytes, as Postfix's
// tls_pkey_fprint digests i2d_PUBKEY's output, which OpenSSL stored here.
func rawPublicKey(field []byte) []byte {
	if len(field) == 0 {
		return nil
	}
	var octets asn1.RawValue
	if rest, err := asn1.Unmarshal(field, &octets); err != nil || len(rest) != 0 ||
		octets.Class != asn1.ClassUniversal || octets.Tag != asn1.TagOctetString || octets.IsCompound {
		return nil
	}
	if !isOneDERSequence(octets.Bytes) {
		return nil
	}
	return octets.Bytes
}

// isOneDERSequence reports whether blob is a single DER SEQUENCE, as
// i2d_SSL_SESSION writes. Other blobs skip encoding/asn1, whose error
// for them is formatted by reflection: 1.5 µs of each update of an
// opaque 2,000-byte blob (BenchmarkDecodeSession), about 2 % of the
// server's CPU on tlsload's update-heavy mix. It only turns blobs away;
// asn1.Unmarshal still checks the rest.
func isOneDERSequence(blob []byte) bool {
	if len(blob) < 2 || blob[0] != 0x30 {
		return false
	}
	length, header := int(blob[1]), 2
	if length&0x80 != 0 { // long form: the low bits count the length's bytes
		octets := length & 0x7f
		if octets == 0 || octets > 4 || len(blob) < 2+octets {
			return false
		}
		length, header = 0, 2+octets
		for _, b := range blob[2:header] {
			length = length<<8 | int(b)
		}
	}
	return length == len(blob)-header
}

func protocolName(v int64) string {
	switch v {
	case 0x0300:
		return "SSLv3"
	case 0x0301:
		return "TLSv1"
	case 0x0302:
		return "TLSv1.1"
	case 0x0303:
		return "TLSv1.2"
	case 0x0304:
		return "TLSv1.3"
	case 0xfeff:
		return "DTLSv1"
	case 0xfefd:
		return "DTLSv1.2"
	}
	return ""
}

// moreCipherNames are IANA names that crypto/tls does not know (it names
// only what it implements) but OpenSSL may negotiate.
var moreCipherNames = map[uint16]string{
	0x0033: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA",
	0x0039: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA",
	0x0067: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA256",
	0x006B: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA256",
	0x009E: "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
	0x009F: "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
	0x00A6: "TLS_DH_anon_WITH_AES_128_GCM_SHA256",
	0x00A7: "TLS_DH_anon_WITH_AES_256_GCM_SHA384",
	0x00AA: "TLS_DHE_PSK_WITH_AES_128_GCM_SHA256",
	0x00AB: "TLS_DHE_PSK_WITH_AES_256_GCM_SHA384",
	0x1304: "TLS_AES_128_CCM_SHA256",
	0x1305: "TLS_AES_128_CCM_8_SHA256",
	0xC024: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
	0xC028: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
	0xC0AC: "TLS_ECDHE_ECDSA_WITH_AES_128_CCM",
	0xC0AD: "TLS_ECDHE_ECDSA_WITH_AES_256_CCM",
	0xCCAA: "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
	0xCCAB: "TLS_PSK_WITH_CHACHA20_POLY1305_SHA256",
	0xCCAC: "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256",
	0xCCAD: "TLS_DHE_PSK_WITH_CHACHA20_POLY1305_SHA256",
}

func cipherName(id uint16) string {
	if name, ok := moreCipherNames[id]; ok {
		return name
	}
	return tls.CipherSuiteName(id) // "0x%04X" for an id it does not know
}

// peerText is a name the peer chose (its SNI), bounded, with every
// control character and invalid byte escaped as \xHH (escapeText): it is
// shown by the sessions view and printed by recipes on terminals.
func peerText(s []byte) string {
	if len(s) > 255 {
		s = s[:255]
	}
	return escapeText(string(s))
}

// peerCertCache remembers the certificates it has parsed: a client cache
// holds a few peers, each stored again and again, and parsing is the
// costly part of decoding.
type peerCertCache struct {
	mu   sync.Mutex
	seen map[[sha256.Size]byte]*peerCert
}

const peerCertCacheSize = 256

var peerCerts = &peerCertCache{}

func (c *peerCertCache) get(der []byte) *peerCert {
	sum := sha256.Sum256(der)
	c.mu.Lock()
	p, ok := c.seen[sum]
	c.mu.Unlock()
	if ok {
		return p
	}
	p = parsePeerCert(der, sum)
	c.mu.Lock()
	if c.seen == nil || len(c.seen) >= peerCertCacheSize {
		c.seen = map[[sha256.Size]byte]*peerCert{}
	}
	c.seen[sum] = p
	c.mu.Unlock()
	return p
}

// certificateASN1 is as much of RFC 5280's Certificate as we show; the
// fields after subject are left unparsed.
type certificateASN1 struct {
	TBS struct {
		Version  int `asn1:"optional,explicit,default:0,tag:0"`
		Serial   asn1.RawValue
		SigAlg   asn1.RawValue
		Issuer   asn1.RawValue
		Validity struct{ NotBefore, NotAfter time.Time }
		Subject  asn1.RawValue
	}
}

// parsePeerCert always returns the fingerprint; the names and the expiry
// are left empty when the certificate does not parse.
func parsePeerCert(der []byte, sum [sha256.Size]byte) *peerCert {
	p := &peerCert{fingerprint: colonHex(sum[:])}
	var c certificateASN1
	if _, err := asn1.Unmarshal(der, &c); err != nil {
		return p
	}
	p.subject, p.issuer = rdnString(c.TBS.Subject.FullBytes), rdnString(c.TBS.Issuer.FullBytes)
	if !c.TBS.Validity.NotAfter.IsZero() {
		p.notAfter = c.TBS.Validity.NotAfter.Unix()
	}
	return p
}

func rdnString(der []byte) string {
	var rdns pkix.RDNSequence
	if rest, err := asn1.Unmarshal(der, &rdns); err != nil || len(rest) != 0 {
		return ""
	}
	// In the certificate's own order, reversed as RFC 2253 wants, with
	// control characters escaped as RFC 4514's \HH: the peer chose them.
	return escapeDN(rdns.String())
}

func colonHex(b []byte) string {
	var sb strings.Builder
	for i, c := range b {
		if i > 0 {
			sb.WriteByte(':')
		}
		fmt.Fprintf(&sb, "%02X", c)
	}
	return sb.String()
}
