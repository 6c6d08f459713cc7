-- The assignment engine's SQL: explain (why each agent was or was not a candidate), the directory
-- sync from PromptForge / Warren / Alexandria, and stale marking. Scoring itself lives in
-- dispatch.task_assign (002); task_explain applies the same rules row by row so that what explain
-- says is what the assigner does.

-- An agent that went stale (status unknown) and reports in again without naming a status is ready
-- again: before this, agent_heartbeat / agent_upsert kept `unknown` forever.
CREATE OR REPLACE FUNCTION dispatch.agent_heartbeat(
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

CREATE OR REPLACE FUNCTION dispatch.agent_upsert(
    p_agent_id text, p_capabilities text[] DEFAULT NULL, p_owner text DEFAULT NULL,
    p_max_concurrent integer DEFAULT NULL, p_status dispatch.agent_status DEFAULT NULL,
    p_policy text DEFAULT NULL, p_source text DEFAULT 'registry', p_now timestamptz DEFAULT now()
) RETURNS dispatch.agents
LANGUAGE plpgsql AS $$
DECLARE
    a dispatch.agents;
BEGIN
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

---------------------------------------------------------------------------------------------------
-- Explain
---------------------------------------------------------------------------------------------------

-- Every agent of the directory as a candidate for the task: the factors of its score, whether it is
-- eligible, and every reason it is not. Ordered as the assigner would choose (best first), the
-- excluded ones after, by agent id. The rules are those of dispatch.task_assign:
--   not drained; status ready/sleeping/busy; capabilities a superset of the requirement; active
--   tasks below the limit (in every status); with the owner filter on, the agent belongs to the
--   task's owner, and an agent whose ownership is unknown is excluded (fail closed); a previous
--   agent of the task only when no other agent is eligible.
CREATE FUNCTION dispatch.task_explain(p_task_id uuid)
RETURNS TABLE (
    agent_id text, eligible boolean, score real, capability_match real, availability real,
    priority_weight real, active_tasks integer, max_concurrent integer,
    status dispatch.agent_status, drained boolean, owner text, previous_agent boolean,
    reasons text[]
)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    c dispatch.config;
    t dispatch.tasks;
BEGIN
    SELECT * INTO c FROM dispatch.config;
    SELECT * INTO t FROM dispatch.tasks tk WHERE tk.task_id = p_task_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task % not found', p_task_id USING ERRCODE = 'UD404';
    END IF;
    RETURN QUERY
    WITH f AS (
        SELECT ag.agent_id, ag.status, ag.drained, ag.owner, ag.active_count, ag.last_assigned_at,
               coalesce(ag.max_concurrent, c.max_concurrent_per_agent) AS lim,
               ARRAY(SELECT x FROM unnest(t.required_capabilities) x
                     WHERE NOT x = ANY (ag.capabilities)) AS missing,
               -- NULL: nothing is known about whom this agent belongs to.
               CASE WHEN ag.owner = t.owner
                         OR EXISTS (SELECT 1 FROM dispatch.agent_owners o
                                    WHERE o.agent_id = ag.agent_id AND o.owner = t.owner)
                    THEN true
                    WHEN ag.owner IS NULL
                         AND NOT EXISTS (SELECT 1 FROM dispatch.agent_owners o
                                         WHERE o.agent_id = ag.agent_id)
                    THEN NULL
                    ELSE false END AS belongs,
               ag.agent_id = ANY (t.previous_agents) AS prev,
               (SELECT array_agg(o.owner ORDER BY o.owner) FROM dispatch.agent_owners o
                WHERE o.agent_id = ag.agent_id) AS device_owners
        FROM dispatch.agents ag
    ), r AS (
        SELECT f.*,
               array_remove(ARRAY[
                   CASE WHEN f.drained THEN 'drained' END,
                   CASE WHEN f.status NOT IN ('ready', 'sleeping', 'busy')
                        THEN 'status ' || f.status END,
                   CASE WHEN cardinality(f.missing) > 0
                        THEN 'missing capabilities: ' || array_to_string(f.missing, ', ') END,
                   CASE WHEN f.active_count >= f.lim
                        THEN format('at its limit (%s of %s tasks active)', f.active_count, f.lim) END,
                   CASE WHEN c.owner_filter_enabled AND f.belongs IS NULL
                        THEN format('ownership unknown (owner filter on, task owner %s)', t.owner)
                        WHEN c.owner_filter_enabled AND NOT f.belongs
                        THEN format('belongs to %s, not to the task owner %s',
                                    array_to_string(array_remove(
                                        coalesce(f.device_owners, '{}') || f.owner, NULL), ', '),
                                    t.owner) END
               ], NULL) AS base_reasons
        FROM f
    ), e AS (
        SELECT r.*,
               cardinality(r.base_reasons) = 0 AS ok,
               bool_or(cardinality(r.base_reasons) = 0 AND NOT r.prev) OVER () AS others
        FROM r
    )
    SELECT e.agent_id,
           e.ok AND NOT (e.prev AND coalesce(e.others, false)),
           CASE WHEN e.ok AND NOT (e.prev AND coalesce(e.others, false))
                THEN (dispatch.availability(e.status) * (1 + t.priority / 10.0))::real
                ELSE 0::real END,
           CASE WHEN cardinality(t.required_capabilities) = 0 THEN 1::real
                ELSE (1 - cardinality(e.missing)::real / cardinality(t.required_capabilities))::real
           END,
           dispatch.availability(e.status),
           (1 + t.priority / 10.0)::real,
           e.active_count, e.lim, e.status, e.drained, e.owner, e.prev,
           e.base_reasons
               || CASE WHEN e.ok AND e.prev AND coalesce(e.others, false)
                       THEN ARRAY['attempted this task before and another agent is eligible']
                       ELSE '{}'::text[] END
    FROM e
    ORDER BY e.ok AND NOT (e.prev AND coalesce(e.others, false)) DESC,
             e.prev,
             dispatch.availability(e.status) DESC,
             e.active_count,
             e.last_assigned_at NULLS FIRST,
             e.agent_id;
END
$$;

---------------------------------------------------------------------------------------------------
-- The directory: sync from the external services, stale entries
---------------------------------------------------------------------------------------------------

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

---------------------------------------------------------------------------------------------------
-- The assigner's call
---------------------------------------------------------------------------------------------------

-- dispatch.task_assign plus, for each assignment, the seconds its task waited to be assigned (since
-- it was created, or became available for a scheduled or retried task), for the
-- assignment_wait_seconds histogram. The lookup is a statement of its own on purpose: a join in the
-- calling statement would read dispatch.tasks with that statement's snapshot, taken before
-- task_assign ran, and silently drop tasks committed in between (their wake calls with them).
CREATE FUNCTION dispatch.task_assign_timed(
    p_batch integer DEFAULT 100, p_now timestamptz DEFAULT now()
) RETURNS TABLE (task_id uuid, agent_id text, score real, wake boolean, waited float8)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM dispatch.task_assign(p_batch, p_now) LOOP
        task_id := r.task_id;
        agent_id := r.agent_id;
        score := r.score;
        wake := r.wake;
        SELECT greatest(extract(epoch FROM p_now - greatest(tk.created_at, tk.available_at)), 0)
        INTO waited
        FROM dispatch.tasks tk WHERE tk.task_id = r.task_id;
        RETURN NEXT;
    END LOOP;
END
$$;
