-- tlsmgr's shared store on PostgreSQL (tlsmgr_shared_database): the
-- session-ticket keys of every host of a realm, and the session caches
-- named by tlsmgr_shared_caches. tlsmgr runs this itself (each statement
-- is idempotent) when a table is missing and its role may create tables;
-- an administrator who grants it only the data privileges runs it once:
--   psql -d tlsmgr -f schema_shared.sql
-- then, as the owner of the tables:
--   GRANT SELECT, INSERT, UPDATE, DELETE ON ticket_keys, smtpd_cache, smtp_cache, lmtp_cache TO tlsmgr;
--
-- SECURITY: `sealed` and `session` are AES-256-GCM sealed under a key
-- derived from tlsmgr_shared_secret_file and the realm, and bound to the
-- row (realm, period and slot; cache, id and expiry): a dump, a replica or
-- a DBA's SELECT shows no key material, and a row moved or altered by hand
-- no longer opens. The rest is what the SQLite schema shows in clear.

-- One key per realm, series and slot. A series is H = smtpd_tls_session_cache_timeout/2
-- seconds (`period`): hosts with different timeouts do not share one. Slot k
-- issues tickets from k*H until (k+1)*H and decrypts them for another H.
CREATE TABLE IF NOT EXISTS ticket_keys (
    realm   text   NOT NULL,
    period  bigint NOT NULL,   -- H, seconds
    slot    bigint NOT NULL,   -- issues from slot*period until (slot+1)*period (UNIX time)
    sealed  bytea  NOT NULL,   -- name, cipher key, HMAC key (secret, sealed)
    created timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (realm, period, slot)
);

-- The session caches: the columns of the SQLite schema, plus the realm.
-- A row is found by hash = SHA-256(id)'s first 63 bits, as in SQLite.
CREATE TABLE IF NOT EXISTS smtpd_cache (
    realm   text   NOT NULL,
    hash    bigint NOT NULL,
    id      text   NOT NULL,   -- cache_id as the client sent it
    session bytea  NOT NULL,   -- the session (secret, sealed)
    stored  bigint NOT NULL,   -- UNIX time of the update
    expires bigint NOT NULL,   -- stored + timeout; valid while expires >= now
    protocol text, cipher text, session_time bigint, session_timeout bigint, sni text,
    ticket integer, ticket_lifetime bigint, verify_result bigint,
    peer_subject text, peer_issuer text, peer_fingerprint text, peer_not_after bigint,
    PRIMARY KEY (realm, hash)
);
CREATE INDEX IF NOT EXISTS smtpd_cache_expires ON smtpd_cache (realm, expires);

CREATE TABLE IF NOT EXISTS smtp_cache (LIKE smtpd_cache INCLUDING ALL);
CREATE TABLE IF NOT EXISTS lmtp_cache (LIKE smtpd_cache INCLUDING ALL);

-- Every cached session, without its key material, as the SQLite view shows it.
CREATE OR REPLACE VIEW sessions AS
SELECT realm, cache, id, size,
       to_char(to_timestamp(stored) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS stored,
       to_char(to_timestamp(expires) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS expires,
       extract(epoch FROM now())::bigint - stored AS age,
       protocol, cipher, sni, ticket, ticket_lifetime, verify_result,
       peer_subject, peer_issuer, peer_fingerprint,
       to_char(to_timestamp(peer_not_after) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS peer_not_after
FROM (
    SELECT realm, 'smtpd' AS cache, id, length(session) - 33 AS size, stored, expires, protocol, cipher, sni, ticket,
           ticket_lifetime, verify_result, peer_subject, peer_issuer, peer_fingerprint, peer_not_after
    FROM smtpd_cache
    UNION ALL
    SELECT realm, 'smtp', id, length(session) - 33, stored, expires, protocol, cipher, sni, ticket,
           ticket_lifetime, verify_result, peer_subject, peer_issuer, peer_fingerprint, peer_not_after
    FROM smtp_cache
    UNION ALL
    SELECT realm, 'lmtp', id, length(session) - 33, stored, expires, protocol, cipher, sni, ticket,
           ticket_lifetime, verify_result, peer_subject, peer_issuer, peer_fingerprint, peer_not_after
    FROM lmtp_cache
) AS s;

-- One row per realm and cache: how many sessions, how many bytes, oldest and newest.
CREATE OR REPLACE VIEW cache_stats AS
SELECT realm, cache, count(*) AS entries, sum(size) AS bytes, min(stored) AS oldest, max(stored) AS newest
FROM sessions GROUP BY realm, cache;

-- The ticket keys without their secrets.
CREATE OR REPLACE VIEW ticket_key_names AS
SELECT realm, period, slot,
       to_char(to_timestamp(slot * period) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS issues_from,
       to_char(to_timestamp((slot + 1) * period) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS issues_until,
       created
FROM ticket_keys;
