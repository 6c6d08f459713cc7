-- Dashboard sign-ins (/ui). The cookie holds a random session id and an HMAC of it keyed by the
-- admin token; this table holds the id's SHA-256. A signed cookie alone cannot be taken back, a
-- row can: sign-out deletes it, and every replica checks the row on each request, so a copied
-- cookie stops working everywhere at once. A copy of the table signs nobody in.
CREATE TABLE dispatch.ui_sessions (
    session_hash bytea PRIMARY KEY CHECK (octet_length(session_hash) = 32),
    -- Which admin token the session was signed with (a digest of the session key, never of the
    -- token): a replica started with another token ends the sessions of the old one.
    key_id       text NOT NULL CHECK (char_length(key_id) BETWEEN 1 AND 64),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    CONSTRAINT ui_sessions_times_range CHECK (
        dispatch.time_in_range(created_at) AND dispatch.time_in_range(expires_at))
);

-- A sign-in: the new session's row (and the expired ones go, so the table stays as small as the
-- number of live sign-ins).
CREATE FUNCTION dispatch.ui_session_start(
    p_hash bytea, p_key_id text, p_seconds integer, p_now timestamptz DEFAULT now()
) RETURNS timestamptz
LANGUAGE sql AS $$
    DELETE FROM dispatch.ui_sessions WHERE expires_at <= p_now;
    INSERT INTO dispatch.ui_sessions (session_hash, key_id, created_at, expires_at)
    VALUES (p_hash, p_key_id, p_now, p_now + make_interval(secs => p_seconds))
    RETURNING expires_at;
$$;

-- Sign-out: true when the session was live.
CREATE FUNCTION dispatch.ui_session_end(p_hash bytea) RETURNS boolean
LANGUAGE sql AS $$
    WITH gone AS (DELETE FROM dispatch.ui_sessions WHERE session_hash = p_hash RETURNING 1)
    SELECT count(*) > 0 FROM gone;
$$;

-- Which of these sessions are live under this key: one query per request, or per refresh of the
-- open dashboards for all their streams.
CREATE FUNCTION dispatch.ui_sessions_live(
    p_hashes bytea[], p_key_id text, p_now timestamptz DEFAULT now()
) RETURNS SETOF bytea
LANGUAGE sql STABLE AS $$
    SELECT s.session_hash FROM dispatch.ui_sessions s
    WHERE s.session_hash = ANY (p_hashes) AND s.key_id = p_key_id AND s.expires_at > p_now;
$$;

-- A replica starts with this key: the sessions signed with any other admin token end (also on
-- the replicas still running with the old token). Returns how many ended.
CREATE FUNCTION dispatch.ui_sessions_retire(p_key_id text) RETURNS integer
LANGUAGE sql AS $$
    WITH gone AS (DELETE FROM dispatch.ui_sessions WHERE key_id <> p_key_id RETURNING 1)
    SELECT count(*)::integer FROM gone;
$$;
