-- Registers or updates an agent; NULL arguments keep the current value. The row's exclusive lock
-- waits for the agent's claims and assignments under way (they hold its key-share lock), and
-- those that come later see the change.
CREATE FUNCTION dispatch.agent_upsert(
    p_agent_id text, p_capabilities text[] DEFAULT NULL, p_owner text DEFAULT NULL,
    p_max_concurrent integer DEFAULT NULL, p_status dispatch.agent_status DEFAULT NULL,
    p_policy text DEFAULT NULL, p_source text DEFAULT 'registry', p_now timestamptz DEFAULT now()
) RETURNS dispatch.agents
LANGUAGE plpgsql AS $$
DECLARE
    a dispatch.agents;
BEGIN
    PERFORM 1 FROM dispatch.agents WHERE agent_id = p_agent_id FOR UPDATE;
    INSERT INTO dispatch.agents AS ag (agent_id, capabilities, owner, max_concurrent, status, policy,
                                       source, last_seen_at, created_at, updated_at)
    VALUES (p_agent_id, dispatch.normalize_capabilities(coalesce(p_capabilities, '{}')), p_owner,
            p_max_concurrent, coalesce(p_status, 'ready'), p_policy, coalesce(p_source, 'registry'),
            p_now, p_now, p_now)
    ON CONFLICT (agent_id) DO UPDATE SET
        capabilities = coalesce(dispatch.normalize_capabilities(p_capabilities), ag.capabilities),
        owner = coalesce(p_owner, ag.owner),
        max_concurrent = coalesce(p_max_concurrent, ag.max_concurrent),
        status = coalesce(p_status, CASE WHEN ag.status = 'unknown'
                                         THEN 'ready'::dispatch.agent_status ELSE ag.status END),
        policy = coalesce(p_policy, ag.policy),
        last_seen_at = p_now, updated_at = p_now
    RETURNING * INTO a;
    PERFORM pg_notify('dispatch_work', '');
    RETURN a;
END
$$;

-- An agent heartbeat. One that went stale (status unknown) and reports in again without naming a
-- status is ready again.
CREATE FUNCTION dispatch.agent_heartbeat(
    p_agent_id text, p_status dispatch.agent_status DEFAULT NULL, p_now timestamptz DEFAULT now()
) RETURNS dispatch.agents
LANGUAGE plpgsql AS $$
DECLARE
    a dispatch.agents;
BEGIN
    UPDATE dispatch.agents
    SET status = coalesce(p_status, CASE WHEN status = 'unknown' THEN 'ready'::dispatch.agent_status
                                         ELSE status END),
        last_seen_at = p_now, updated_at = p_now
    WHERE agent_id = p_agent_id
    RETURNING * INTO a;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % not found', p_agent_id USING ERRCODE = 'UD404';
    END IF;
    IF a.status IN ('ready', 'sleeping', 'busy') THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    RETURN a;
END
$$;

-- Drains an agent (no new work) or undrains it. Like a registration, it waits for the claims and
-- assignments of the agent under way: once it returns, the agent gets nothing new.
CREATE FUNCTION dispatch.agent_drain(p_agent_id text, p_drained boolean DEFAULT true,
                                     p_now timestamptz DEFAULT now())
RETURNS dispatch.agents
LANGUAGE plpgsql AS $$
DECLARE
    a dispatch.agents;
BEGIN
    PERFORM 1 FROM dispatch.agents WHERE agent_id = p_agent_id FOR UPDATE;
    UPDATE dispatch.agents SET drained = p_drained, updated_at = p_now
    WHERE agent_id = p_agent_id
    RETURNING * INTO a;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % not found', p_agent_id USING ERRCODE = 'UD404';
    END IF;
    IF NOT p_drained THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    RETURN a;
END
$$;

-- An agent stopping gives its active tasks back (no attempt counted: its own shutdown is no
-- failure of the work). The agent's tasks are locked before its row, in the order a completion
-- that claims the next task takes them, so the two cannot deadlock.
CREATE FUNCTION dispatch.agent_stop(p_agent_id text, p_now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t   dispatch.tasks;
    ids uuid[];
    n   integer := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM dispatch.agents WHERE agent_id = p_agent_id) THEN
        RAISE EXCEPTION 'agent % not found', p_agent_id USING ERRCODE = 'UD404';
    END IF;
    ids := ARRAY(
        SELECT tk.task_id FROM dispatch.tasks tk
        WHERE tk.status IN ('assigned', 'running') AND tk.assigned_agent = p_agent_id
        ORDER BY tk.task_id
        FOR UPDATE);
    PERFORM dispatch.fn_enter();
    FOR t IN
        SELECT * FROM dispatch.tasks tk
        WHERE tk.task_id = ANY (ids) AND tk.status IN ('assigned', 'running')
          AND tk.assigned_agent = p_agent_id
        ORDER BY tk.task_id
    LOOP
        PERFORM dispatch.task_give_back(t, 'agent_stopped', p_now);
        n := n + 1;
    END LOOP;
    PERFORM dispatch.fn_leave();
    UPDATE dispatch.agents SET status = 'stopped', updated_at = p_now, last_seen_at = p_now
    WHERE agent_id = p_agent_id;
    RETURN n;
END
$$;

-- Writes one refresh of the external directory. p_entries is a JSON array of
--   {agent_id, capabilities?, status?, policy?, source, seen}
-- where a missing (null) field keeps what the directory knows (its service did not answer) and
-- `seen` says whether the entry's availability was refreshed now (it resets the stale clock).
-- New agents are created; agents of the built-in registry keep source `registry`. Returns the number
-- of entries written and NOTIFYs the assigner (capabilities or availability may have changed).
CREATE FUNCTION dispatch.agent_sync(p_entries jsonb, p_now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    WITH e AS (
        SELECT x.agent_id,
               CASE WHEN x.capabilities IS NULL THEN NULL
                    ELSE dispatch.normalize_capabilities(
                        ARRAY(SELECT jsonb_array_elements_text(x.capabilities))) END AS caps,
               x.status::dispatch.agent_status AS status, x.policy, x.source,
               coalesce(x.seen, false) AS seen
        FROM jsonb_to_recordset(p_entries)
             AS x (agent_id text, capabilities jsonb, status text, policy text, source text,
                   seen boolean)
        ORDER BY x.agent_id
    ), ins AS (
        INSERT INTO dispatch.agents AS ag (agent_id, capabilities, status, policy, source,
                                           last_seen_at, created_at, updated_at)
        SELECT e.agent_id, coalesce(e.caps, '{}'),
               coalesce(e.status, CASE WHEN e.seen THEN 'ready'
                                       ELSE 'unknown' END::dispatch.agent_status), e.policy,
               e.source, p_now, p_now, p_now
        FROM e
        ORDER BY e.agent_id
        ON CONFLICT (agent_id) DO UPDATE SET
            capabilities = coalesce((SELECT e2.caps FROM e e2 WHERE e2.agent_id = ag.agent_id),
                                    ag.capabilities),
            status = coalesce((SELECT e2.status FROM e e2 WHERE e2.agent_id = ag.agent_id),
                              CASE WHEN ag.status = 'unknown'
                                        AND (SELECT e2.seen FROM e e2 WHERE e2.agent_id = ag.agent_id)
                                   THEN 'ready'::dispatch.agent_status ELSE ag.status END),
            policy = coalesce(EXCLUDED.policy, ag.policy),
            source = CASE WHEN ag.source = 'registry' THEN ag.source ELSE EXCLUDED.source END,
            last_seen_at = CASE WHEN (SELECT e2.seen FROM e e2 WHERE e2.agent_id = ag.agent_id)
                                THEN p_now ELSE ag.last_seen_at END,
            updated_at = p_now
        RETURNING 1
    )
    SELECT count(*) INTO n FROM ins;
    IF n > 0 THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    RETURN n;
END
$$;

-- Replaces the device ownership learned from one source (Alexandria) by p_pairs, a JSON array of
-- {agent_id, owner}. Returns the number of pairs now known.
CREATE FUNCTION dispatch.agent_owners_sync(
    p_pairs jsonb, p_source text DEFAULT 'alexandria', p_now timestamptz DEFAULT now()
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    DELETE FROM dispatch.agent_owners o
    WHERE o.source = p_source
      AND NOT EXISTS (SELECT 1 FROM jsonb_to_recordset(p_pairs) AS x (agent_id text, owner text)
                      WHERE x.agent_id = o.agent_id AND x.owner = o.owner);
    INSERT INTO dispatch.agent_owners AS o (agent_id, owner, source, updated_at)
    SELECT DISTINCT x.agent_id, x.owner, p_source, p_now
    FROM jsonb_to_recordset(p_pairs) AS x (agent_id text, owner text)
    WHERE x.agent_id IS NOT NULL AND x.owner IS NOT NULL
    ORDER BY x.agent_id, x.owner
    ON CONFLICT (agent_id, owner) DO UPDATE SET source = EXCLUDED.source, updated_at = p_now;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pg_notify('dispatch_work', '');
    RETURN n;
END
$$;

-- Entries not refreshed for p_stale_ms become `unknown` (no longer eligible), and device ownership
-- not refreshed for as long is forgotten (the owner filter then fails closed). Agents that stopped
-- stay stopped. Returns the number of agents marked unknown.
CREATE FUNCTION dispatch.agent_mark_stale(p_stale_ms integer, p_now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    horizon timestamptz := p_now - make_interval(secs => p_stale_ms / 1000.0);
BEGIN
    WITH stale AS (
        SELECT ag.agent_id FROM dispatch.agents ag
        WHERE ag.last_seen_at < horizon AND ag.status NOT IN ('unknown', 'stopped')
        ORDER BY ag.agent_id
        FOR UPDATE SKIP LOCKED
    ), marked AS (
        UPDATE dispatch.agents ag SET status = 'unknown', updated_at = p_now
        FROM stale WHERE ag.agent_id = stale.agent_id
        RETURNING 1
    )
    SELECT count(*) INTO n FROM marked;
    DELETE FROM dispatch.agent_owners o WHERE o.updated_at < horizon;
    RETURN n;
END
$$;

-- Per-caller API tokens (auth.mode `tokens`). Only the SHA-256 of a token is stored: the token
-- itself is shown once, to whoever issued it. agent_id is any caller identity (the X-Agent-ID a
-- token is good for), a registered agent or a requester, so there is no foreign key to agents.
CREATE TABLE dispatch.agent_tokens (
    token_hash bytea PRIMARY KEY CONSTRAINT agent_tokens_hash_length
               CHECK (octet_length(token_hash) = 32),
    agent_id   text NOT NULL CONSTRAINT agent_tokens_agent_id_format
               CHECK (dispatch.agent_id_valid(agent_id)),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX agent_tokens_agent_idx ON dispatch.agent_tokens (agent_id);

-- Issues a new token for p_agent_id and returns it; its earlier tokens stay valid. The token is
-- 244 random bits (two version-4 UUIDs, drawn from pg_strong_random) in hex behind a `dsp_` prefix
-- that lets secret scanners recognise it.
CREATE FUNCTION dispatch.agent_token_issue(p_agent_id text, p_now timestamptz DEFAULT now())
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    token text := 'dsp_' || replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
BEGIN
    INSERT INTO dispatch.agent_tokens (token_hash, agent_id, created_at)
    VALUES (sha256(convert_to(token, 'UTF8')), p_agent_id, p_now);
    RETURN token;
END
$$;

-- The identity a token is good for, or NULL when it is unknown or revoked.
CREATE FUNCTION dispatch.agent_token_agent(p_token text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT t.agent_id FROM dispatch.agent_tokens t
    WHERE t.token_hash = sha256(convert_to(p_token, 'UTF8'))
$$;

-- Revokes every token of p_agent_id; returns how many. The NOTIFY (payload: the agent id) makes
-- every replica forget the tokens it verified for that agent at once.
CREATE FUNCTION dispatch.agent_token_revoke(p_agent_id text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    DELETE FROM dispatch.agent_tokens WHERE agent_id = p_agent_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pg_notify('dispatch_auth', p_agent_id);
    RETURN n;
END
$$;

-- Removes an agent registered by mistake (or gone for good) with its tokens. Refused (409, naming
-- them) while it holds assigned or running tasks: stop it first (agent_stop puts them back), or
-- let them end. The agent row's lock keeps any assignment out while this looks. Its tasks' history
-- keeps its name. A directory source that still lists the agent brings it back at its next sync.
CREATE FUNCTION dispatch.agent_delete(p_agent_id text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    active uuid[];
BEGIN
    PERFORM 1 FROM dispatch.agents WHERE agent_id = p_agent_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % not found', p_agent_id USING ERRCODE = 'UD404';
    END IF;
    active := ARRAY(SELECT tk.task_id FROM dispatch.tasks tk
                    WHERE tk.assigned_agent = p_agent_id AND tk.status IN ('assigned', 'running')
                    ORDER BY tk.assigned_at);
    IF cardinality(active) > 0 THEN
        RAISE EXCEPTION 'agent % has % active task(s): %; stop it first or let them end',
            p_agent_id, cardinality(active), array_to_string(active, ', ')
            USING ERRCODE = 'UD409';
    END IF;
    DELETE FROM dispatch.agent_tokens WHERE agent_id = p_agent_id;
    DELETE FROM dispatch.agents WHERE agent_id = p_agent_id;
    PERFORM pg_notify('dispatch_auth', p_agent_id);
END
$$;
