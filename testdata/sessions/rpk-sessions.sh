#!/usr/bin/env bash
# Writes the raw-public-key sessions (RFC 7250) with OpenSSL 3.2 or later
# (these came from Debian 13's OpenSSL 3.5.9, in .ci/debian13's root):
#   bash rpk-sessions.sh DIR
# Each NAME.pem is s_client's -sess_out, NAME.txt its `openssl sess_id
# -text`; for a session whose server sent a raw key, NAME.rpk.txt is
# OpenSSL's own reading of field [20] (asn1parse), of the key in it (pkey
# -text) and its SHA-256 (dgst -c), the fingerprint Postfix logs as
# pkey_fingerprint. The server's key is thrown away.
set -euo pipefail
cd "$1"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem -out rpk-cert.pem -days 3650 \
	-subj "/CN=mx.example.org/O=Example Mail/C=DE" 2>/dev/null
openssl pkey -in key.pem -pubout -out rpk-pub.pem
run() { # NAME PORT SERVER-ARGS... -- CLIENT-ARGS...
	local name=$1 port=$2 sargs=() sp off
	shift 2
	while [ "$1" != -- ]; do sargs+=("$1"); shift; done
	shift
	openssl s_server -accept "127.0.0.1:$port" -key key.pem -cert rpk-cert.pem "${sargs[@]}" -naccept 1 -quiet >/dev/null 2>&1 &
	sp=$!
	sleep 0.5
	# A TLS 1.3 ticket comes after the handshake: wait for it before quitting.
	(sleep 1; echo Q) | openssl s_client -connect "127.0.0.1:$port" "$@" -sess_out "$name.pem" >/dev/null 2>&1 || true
	kill "$sp" 2>/dev/null || true
	wait "$sp" 2>/dev/null || true
	openssl sess_id -in "$name.pem" -noout -text > "$name.txt"
	# [20] EXPLICIT OCTET STRING: the OCTET STRING's offset is the line after "cont [ 20 ]".
	off=$(openssl asn1parse -in "$name.pem" | awk '/cont \[ 20 \]/ {getline; sub(":.*", ""); print $1 + 0}')
	[ -n "$off" ] || return 0
	{
		echo "openssl asn1parse, field [20]:"
		openssl asn1parse -in "$name.pem" | grep -A1 'cont \[ 20 \]'
		openssl asn1parse -in "$name.pem" -strparse "$off" -noout -out spki.der
		echo "openssl pkey -pubin -inform DER -text -noout:"
		openssl pkey -pubin -inform DER -in spki.der -text -noout
		echo "openssl dgst -sha256 -c:"
		openssl dgst -sha256 -c spki.der | sed 's/^.*= //' | tr a-f A-F
		echo "the server's key (rpk-pub.pem) is this key: $(openssl pkey -pubin -in rpk-pub.pem -outform DER | cmp -s - spki.der && echo yes || echo NO)"
	} > "$name.rpk.txt"
	rm -f spki.der
}
run tls13-rpk 24431 -enable_server_rpk -- -tls1_3 -servername mx.example.org -enable_server_rpk
run tls12-rpk 24432 -enable_server_rpk -- -tls1_2 -enable_server_rpk
run tls13-rpk-offered 24433 -- -tls1_3 -servername mx.example.org -enable_server_rpk
rm -f key.pem
