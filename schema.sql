-- tlsmgr's TLS session caches: one table per Postfix cache type.
--
-- smtpd_cache holds sessions of Postfix's SMTP server (smtpd, tlsproxy as a
-- server), keyed by the cache_id smtpd builds from the session ID;
-- smtp_cache and lmtp_cache hold the client sessions of smtp(8) and lmtp(8),
-- keyed by destination. Every row expires `timeout` seconds after it was
-- stored (the *_tls_session_cache_timeout parameter); tlsmgr deletes
-- expired rows on lookup and in a periodic sweep, and empties all three
-- tables when it starts, as Postfix's tlsmgr does.
--
-- `session` is the client's opaque ASN.1 session blob: secret key material.
-- The views below show everything else, so that a person can look with
--   sqlite3 /var/lib/postfix/tlsmgr.sqlite 'SELECT * FROM sessions'
-- without printing keys.

CREATE TABLE IF NOT EXISTS smtpd_cache (
    id      TEXT PRIMARY KEY,   -- cache_id as the client sent it
    session BLOB NOT NULL,      -- raw session bytes (secret)
    stored  INTEGER NOT NULL,   -- UNIX time of the update
    expires INTEGER NOT NULL    -- stored + timeout; valid while expires >= now
);
CREATE INDEX IF NOT EXISTS smtpd_cache_expires ON smtpd_cache (expires);

CREATE TABLE IF NOT EXISTS smtp_cache (
    id      TEXT PRIMARY KEY,
    session BLOB NOT NULL,
    stored  INTEGER NOT NULL,
    expires INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS smtp_cache_expires ON smtp_cache (expires);

CREATE TABLE IF NOT EXISTS lmtp_cache (
    id      TEXT PRIMARY KEY,
    session BLOB NOT NULL,
    stored  INTEGER NOT NULL,
    expires INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS lmtp_cache_expires ON lmtp_cache (expires);

-- Every cached session, without its key material.
CREATE VIEW IF NOT EXISTS sessions AS
SELECT cache, id, size,
       strftime('%Y-%m-%dT%H:%M:%SZ', stored, 'unixepoch') AS stored,
       strftime('%Y-%m-%dT%H:%M:%SZ', expires, 'unixepoch') AS expires,
       CAST(strftime('%s', 'now') AS INTEGER) - stored AS age
FROM (
    SELECT 'smtpd' AS cache, id, length(session) AS size, stored, expires FROM smtpd_cache
    UNION ALL
    SELECT 'smtp', id, length(session), stored, expires FROM smtp_cache
    UNION ALL
    SELECT 'lmtp', id, length(session), stored, expires FROM lmtp_cache
);

-- One row per cache: how many sessions, how many bytes, oldest and newest.
CREATE VIEW IF NOT EXISTS cache_stats AS
SELECT cache, count(*) AS entries, coalesce(sum(size), 0) AS bytes,
       min(stored) AS oldest, max(stored) AS newest
FROM sessions
GROUP BY cache;
