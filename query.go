// The -query client: one request to a running tlsmgr, the reply printed
// one attribute a line, so that people can see the protocol work.
//
// SECURITY: it prints what the server sends, including session bytes and
// ticket keys when asked for them; it is a tool for the socket's owner.
// The server is not trusted: a reply is bounded, binary values are shown
// in hex, and any other text is escaped (escapeText) before it reaches
// the terminal.

package main

import (
	"bufio"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

// queryForms maps each request to the arguments it takes on the command line.
var queryForms = map[string]string{
	"seed":   "SIZE",
	"policy": "CACHE",
	"lookup": "CACHE ID",
	"update": "CACHE ID SESSION-TEXT",
	"delete": "CACHE ID",
	"tktkey": "[HEX-KEYNAME]",
}

// runQuery sends the request repeat times on one connection. With raw, it
// writes the decoded payload (seed, session or keybuf) to stdout as bytes,
// so that "tlsmgr -query -raw -repeat 65794 seed 255" feeds rngtest.
func runQuery(socket string, args []string, repeat int, raw bool) int {
	w := &attrWriter{}
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "tlsmgr: ERROR: -query needs a request: seed SIZE, policy CACHE, lookup CACHE ID, update CACHE ID TEXT, delete CACHE ID, tktkey [HEXNAME]")
		return 2
	}
	req, rest := args[0], args[1:]
	form, known := queryForms[req]
	if !known {
		fmt.Fprintf(os.Stderr, "tlsmgr: ERROR: unknown request %q; known: seed, policy, lookup, update, delete, tktkey\n", req)
		return 2
	}
	bad := func() int {
		fmt.Fprintf(os.Stderr, "tlsmgr: ERROR: usage: tlsmgr -query %s %s\n", req, form)
		return 2
	}
	w.str("request", req)
	switch req {
	case "seed":
		if len(rest) != 1 {
			return bad()
		}
		w.str("size", rest[0])
	case "policy":
		if len(rest) != 1 {
			return bad()
		}
		w.str("cache_type", rest[0])
	case "lookup", "delete":
		if len(rest) != 2 {
			return bad()
		}
		w.str("cache_type", rest[0])
		w.str("cache_id", rest[1])
	case "update":
		if len(rest) != 3 {
			return bad()
		}
		w.str("cache_type", rest[0])
		w.str("cache_id", rest[1])
		w.data("session", []byte(rest[2]))
	case "tktkey":
		var name []byte
		if len(rest) > 1 {
			return bad()
		}
		if len(rest) == 1 {
			var err error
			if name, err = hex.DecodeString(rest[0]); err != nil {
				return bad()
			}
		}
		w.data("keyname", name)
	}
	w.end()

	conn, err := net.DialTimeout("unix", socket, 5*time.Second)
	if err != nil {
		fmt.Fprintf(os.Stderr, "tlsmgr: ERROR: connect to %s: %v (is tlsmgr -listen %s running?)\n", socket, err, socket)
		return 1
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := &attrReader{br: bufio.NewReader(conn), streamName: socket}
	announce, err := readList(r)
	if err != nil || len(announce) != 1 || announce[0][0] != "protocol" || announce[0][1] != "tlsmgr_protocol" {
		fmt.Fprintf(os.Stderr, "tlsmgr: ERROR: %s did not announce tlsmgr_protocol (%v)\n", socket, err)
		return 1
	}
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for range repeat {
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := conn.Write(w.buf); err != nil {
			fmt.Fprintf(os.Stderr, "tlsmgr: ERROR: send to %s: %v\n", socket, err)
			return 1
		}
		reply, err := readList(r)
		if err != nil {
			fmt.Fprintf(os.Stderr, "tlsmgr: ERROR: read reply from %s: %v\n", socket, err)
			return 1
		}
		for _, kv := range reply {
			switch {
			case !raw:
				fmt.Fprintln(out, describeAttr(req, kv[0], kv[1]))
			case kv[0] == "status" && kv[1] != "0":
				fmt.Fprintf(os.Stderr, "tlsmgr: ERROR: %s\n", describeAttr(req, kv[0], kv[1]))
				return 1
			case kv[0] != "status":
				b, _ := base64.StdEncoding.DecodeString(kv[1])
				out.Write(b)
			}
		}
	}
	return 0
}

// maxReplyAttrs bounds a reply: tlsmgr's have at most three attributes.
const maxReplyAttrs = 16

// readList reads one attr0 list as name/value pairs.
func readList(r *attrReader) ([][2]string, error) { return readListMax(r, maxReplyAttrs) }

// readListMax is readList for a list of at most max attributes.
func readListMax(r *attrReader, max int) ([][2]string, error) {
	var list [][2]string
	for {
		name, err := r.token("reply attribute name")
		if err != nil {
			return nil, err
		}
		if len(name) == 0 {
			return list, nil
		}
		if len(list) == max {
			return nil, fmt.Errorf("more than %d attributes in one reply", max)
		}
		n := string(name)
		value, err := r.token("reply attribute value")
		if err != nil {
			return nil, err
		}
		list = append(list, [2]string{n, string(value)})
	}
}

// statusWords say what a status means for each request.
var statusWords = map[string]map[int32]string{
	"seed":   {statOK: "ok", statErr: "the PRNG failed", statFail: "FAIL: the size must be 1-255"},
	"policy": {statOK: "ok", statFail: "FAIL: unknown cache type"},
	"lookup": {statOK: "found", statErr: "not found: no such entry, or it expired", statFail: "FAIL: unknown cache type, or that cache is off"},
	"update": {statOK: "stored", statErr: "not stored: the server's log says why", statFail: "FAIL: unknown cache type, or that cache is off"},
	"delete": {statOK: "deleted", statErr: "not found", statFail: "FAIL: unknown cache type, or that cache is off"},
	"tktkey": {statOK: "ok", statErr: "no usable key: unknown or expired name, or ticket keys are off (smtpd_tls_session_cache_timeout = 0)", statFail: "FAIL: the key name must be 16 bytes"},
}

// describeAttr prints statuses signed and in words, and binary values in hex.
func describeAttr(req, name, value string) string {
	switch name {
	case "status":
		if n, err := strconv.ParseUint(value, 10, 32); err == nil {
			if words, ok := statusWords[req][int32(n)]; ok {
				return fmt.Sprintf("status=%d (%s)", int32(n), words)
			}
			return fmt.Sprintf("status=%d", int32(n))
		}
	case "seed", "session", "keybuf":
		b, err := base64.StdEncoding.DecodeString(value)
		if err != nil {
			break
		}
		if name == "keybuf" && len(b) == ticketKeyLen {
			tout := int64(binary.LittleEndian.Uint64(b[80:]))
			return fmt.Sprintf("keybuf: name=%x expires=%s (cipher and HMAC keys not shown)",
				b[:16], time.Unix(tout, 0).UTC().Format(time.RFC3339))
		}
		return fmt.Sprintf("%s=%x (%d bytes)", name, b, len(b))
	}
	return escapeText(name) + "=" + escapeText(value) // the server's text: never raw to a terminal
}
