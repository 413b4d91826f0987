-- tlsmgr's TLS session caches: one table per Postfix cache type.
--
-- smtpd_cache holds sessions of Postfix's SMTP server (smtpd, tlsproxy as a
-- server), keyed by the cache_id smtpd builds from the session ID;
-- smtp_cache and lmtp_cache hold the client sessions of smtp(8) and lmtp(8),
-- keyed by destination. Every row expires `timeout` seconds after it was
-- stored (the *_tls_session_cache_timeout parameter); tlsmgr deletes
-- expired rows on lookup and in a periodic sweep. When a cache reaches
-- tlsmgr_<cache>_session_cache_entry_limit rows or _size_limit bytes, the
-- oldest rows are evicted. At start tlsmgr empties everything, as Postfix's
-- tlsmgr does, unless tlsmgr_keep_sessions / tlsmgr_keep_ticket_keys say
-- to keep sessions or ticket keys across restarts.
--
-- `session` is the client's opaque ASN.1 session blob (OpenSSL's
-- i2d_SSL_SESSION) and `ticket_keys` holds RFC 5077 keys: both are secret
-- key material. The views show everything else, so that a person can look
-- with
--   sqlite3 -header -column /var/lib/postfix/tlsmgr.sqlite 'SELECT * FROM sessions'
-- without printing keys. The file is mode 0600, owned by mail_owner: read
-- it as root or as that user.
--
-- A row is found by `hash`, the first 63 bits of SHA-256(id), which is its
-- rowid: one b-tree to search and write instead of a table and an index of
-- ids. Two ids with one hash cannot both be kept; the later replaces the
-- earlier, as a cache may. To find a row by hand, `WHERE id = '...'` works
-- (it reads the whole table).
PRAGMA user_version = 4; -- the schema's version: a kept database of another version, or whose schema differs from this file's in any way, is emptied

CREATE TABLE IF NOT EXISTS smtpd_cache (
    hash    INTEGER PRIMARY KEY, -- SHA-256(id)'s first 63 bits: the rowid
    id      TEXT NOT NULL,      -- cache_id as the client sent it
    session BLOB NOT NULL,      -- raw session bytes (secret)
    stored  INTEGER NOT NULL,   -- UNIX time of the update
    expires INTEGER NOT NULL,   -- stored + timeout; valid while expires >= now
    -- Decoded from `session` when it is stored; all NULL when it is not an
    -- OpenSSL session. None of them is secret.
    protocol         TEXT,      -- TLSv1.2, TLSv1.3, ...
    cipher           TEXT,      -- IANA cipher suite name (TLS_AES_256_GCM_SHA384), or 0xXXXX
    session_time     INTEGER,   -- when OpenSSL made the session (UNIX time)
    session_timeout  INTEGER,   -- OpenSSL's lifetime for it, seconds
    sni              TEXT,      -- server name (SNI) the server acknowledged; NULL = none; escaped as below
    ticket           INTEGER,   -- 1: resumes by session ticket (all of TLS 1.3), 0: by session ID
    ticket_lifetime  INTEGER,   -- the server's ticket lifetime hint, seconds
    verify_result    INTEGER,   -- OpenSSL's verification of the peer certificate: 0 = ok, else X509_V_ERR_*
    peer_subject     TEXT,      -- the peer certificate's subject, RFC 2253 (CN=...,O=...); escaped as below
    peer_issuer      TEXT,      -- its issuer, RFC 2253; escaped as below
    peer_fingerprint TEXT,      -- SHA-256 of its DER, AB:CD:... as Postfix logs fingerprints
    peer_not_after   INTEGER    -- when it expires (UNIX time)
    -- The remote peer chose sni, peer_subject and peer_issuer: they never
    -- hold a control character, so that printing them (sqlite3, tlsmgr
    -- -stats, the README's recipes) cannot send escape sequences to a
    -- terminal. In sni every byte of a control character (C0, DEL, C1), of
    -- a Unicode bidirectional control or of invalid UTF-8 is written \xHH
    -- and a backslash \\; in the two names, which RFC 4514 escapes already
    -- (a backslash is \\ there), each such byte is RFC 4514's \HH: ESC is
    -- \x1b in sni and \1b in a name.
);
CREATE INDEX IF NOT EXISTS smtpd_cache_expires ON smtpd_cache (expires);

CREATE TABLE IF NOT EXISTS smtp_cache (
    hash INTEGER PRIMARY KEY, id TEXT NOT NULL, session BLOB NOT NULL, stored INTEGER NOT NULL, expires INTEGER NOT NULL,
    protocol TEXT, cipher TEXT, session_time INTEGER, session_timeout INTEGER, sni TEXT,
    ticket INTEGER, ticket_lifetime INTEGER, verify_result INTEGER,
    peer_subject TEXT, peer_issuer TEXT, peer_fingerprint TEXT, peer_not_after INTEGER
);
CREATE INDEX IF NOT EXISTS smtp_cache_expires ON smtp_cache (expires);

CREATE TABLE IF NOT EXISTS lmtp_cache (
    hash INTEGER PRIMARY KEY, id TEXT NOT NULL, session BLOB NOT NULL, stored INTEGER NOT NULL, expires INTEGER NOT NULL,
    protocol TEXT, cipher TEXT, session_time INTEGER, session_timeout INTEGER, sni TEXT,
    ticket INTEGER, ticket_lifetime INTEGER, verify_result INTEGER,
    peer_subject TEXT, peer_issuer TEXT, peer_fingerprint TEXT, peer_not_after INTEGER
);
CREATE INDEX IF NOT EXISTS lmtp_cache_expires ON lmtp_cache (expires);

-- Every cached session, without its key material.
CREATE VIEW IF NOT EXISTS sessions AS
SELECT cache, id, size,
       strftime('%Y-%m-%dT%H:%M:%SZ', stored, 'unixepoch') AS stored,
       strftime('%Y-%m-%dT%H:%M:%SZ', expires, 'unixepoch') AS expires,
       CAST(strftime('%s', 'now') AS INTEGER) - stored AS age,
       protocol, cipher, sni, ticket, ticket_lifetime, verify_result,
       peer_subject, peer_issuer, peer_fingerprint,
       strftime('%Y-%m-%dT%H:%M:%SZ', peer_not_after, 'unixepoch') AS peer_not_after
FROM (
    SELECT 'smtpd' AS cache, id, length(session) AS size, stored, expires, protocol, cipher, sni, ticket,
           ticket_lifetime, verify_result, peer_subject, peer_issuer, peer_fingerprint, peer_not_after
    FROM smtpd_cache
    UNION ALL
    SELECT 'smtp', id, length(session), stored, expires, protocol, cipher, sni, ticket,
           ticket_lifetime, verify_result, peer_subject, peer_issuer, peer_fingerprint, peer_not_after
    FROM smtp_cache
    UNION ALL
    SELECT 'lmtp', id, length(session), stored, expires, protocol, cipher, sni, ticket,
           ticket_lifetime, verify_result, peer_subject, peer_issuer, peer_fingerprint, peer_not_after
    FROM lmtp_cache
);

-- One row per cache, empty ones included: how many sessions, how many
-- bytes of session, oldest and newest.
CREATE VIEW IF NOT EXISTS cache_stats AS
SELECT c.cache, count(s.id) AS entries, coalesce(sum(s.size), 0) AS bytes,
       min(s.stored) AS oldest, max(s.stored) AS newest
FROM (SELECT 'smtpd' AS cache UNION ALL SELECT 'smtp' UNION ALL SELECT 'lmtp') AS c
LEFT JOIN sessions AS s ON s.cache = c.cache
GROUP BY c.cache;

-- Statistics, counted in memory and written here every few seconds and at
-- exit. scope is smtpd, smtp or lmtp (the caches), tktkey or seed.
--   caches: lookups, hits, misses, expired_at_lookup, expired_by_sweep,
--           stores (new entries), replaced (an update over an entry),
--           deletes, evictions (the cache was full), store_failures
--   tktkey: keys_issued (new keys made), found (by name), not_found
--   seed:   requests, bytes
CREATE TABLE IF NOT EXISTS counters (
    scope TEXT NOT NULL,
    name  TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (scope, name)
) WITHOUT ROWID;

-- When counting began (the start of the process, or of the first process
-- that kept its sessions) and when the counters were last written.
CREATE TABLE IF NOT EXISTS counters_period (
    one     INTEGER PRIMARY KEY CHECK (one = 1),
    since   INTEGER NOT NULL,
    updated INTEGER NOT NULL
);

-- Every counter, with its period.
CREATE VIEW IF NOT EXISTS statistics AS
SELECT scope, name, value,
       strftime('%Y-%m-%dT%H:%M:%SZ', p.since, 'unixepoch') AS since,
       strftime('%Y-%m-%dT%H:%M:%SZ', p.updated, 'unixepoch') AS updated
FROM counters, counters_period AS p;

-- One row per cache: what lookups found, and what happened to entries.
-- hit_ratio = hits / lookups (NULL before the first lookup).
CREATE VIEW IF NOT EXISTS cache_counters AS
SELECT c.cache,
       coalesce(sum(value) FILTER (WHERE name = 'lookups'), 0) AS lookups,
       coalesce(sum(value) FILTER (WHERE name = 'hits'), 0) AS hits,
       coalesce(sum(value) FILTER (WHERE name = 'misses'), 0) AS misses,
       round(1.0 * sum(value) FILTER (WHERE name = 'hits') / nullif(sum(value) FILTER (WHERE name = 'lookups'), 0), 3) AS hit_ratio,
       coalesce(sum(value) FILTER (WHERE name IN ('expired_at_lookup', 'expired_by_sweep')), 0) AS expired,
       coalesce(sum(value) FILTER (WHERE name = 'stores'), 0) AS stores,
       coalesce(sum(value) FILTER (WHERE name = 'replaced'), 0) AS replaced,
       coalesce(sum(value) FILTER (WHERE name = 'deletes'), 0) AS deletes,
       coalesce(sum(value) FILTER (WHERE name = 'evictions'), 0) AS evictions,
       coalesce(sum(value) FILTER (WHERE name = 'store_failures'), 0) AS store_failures,
       (SELECT strftime('%Y-%m-%dT%H:%M:%SZ', since, 'unixepoch') FROM counters_period) AS since
FROM (SELECT 'smtpd' AS cache UNION ALL SELECT 'smtp' UNION ALL SELECT 'lmtp') AS c
LEFT JOIN counters AS n ON n.scope = c.cache
GROUP BY c.cache;

-- RFC 5077 session-ticket keys, kept only with tlsmgr_keep_ticket_keys =
-- yes (otherwise empty): the current key (slot 0) and the previous one.
CREATE TABLE IF NOT EXISTS ticket_keys (
    slot       INTEGER PRIMARY KEY CHECK (slot IN (0, 1)),
    name       BLOB NOT NULL,   -- 16 bytes; public: it travels in every ticket
    cipher_key BLOB NOT NULL,   -- secret
    hmac_key   BLOB NOT NULL,   -- secret
    tout       INTEGER NOT NULL -- issues tickets until this UNIX time
);

-- The ticket keys without their secrets.
CREATE VIEW IF NOT EXISTS ticket_key_names AS
SELECT CASE slot WHEN 0 THEN 'current' ELSE 'previous' END AS key, hex(name) AS name,
       strftime('%Y-%m-%dT%H:%M:%SZ', tout, 'unixepoch') AS issues_until
FROM ticket_keys;
