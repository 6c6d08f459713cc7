-- Owner scoping is opt-in per task, a requester or an admin may resolve a task that is still
-- pending, and a new deadline wakes the reapers of every replica.
--
-- owner is NULL unless the creator names one. The owner filter applies only to tasks that have an
-- owner (and still fails closed for them): a task without one may run on any eligible agent.

ALTER TABLE dispatch.tasks ALTER COLUMN owner DROP NOT NULL;

-- Who may cancel, re-prioritise or resolve a task by hand. NULL-safe: a task without an owner is
-- its requester's (and an admin's) alone.
CREATE FUNCTION dispatch.task_is_resolver(t dispatch.tasks, p_actor text, p_admin boolean)
RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(p_admin, false)
        OR coalesce(p_actor = t.requester, false)
        OR coalesce(p_actor = t.owner, false)
$$;

-- The owner filter: a task without an owner is not owner-scoped; a task with one runs only on an
-- agent that belongs to that owner (registry owner or an Alexandria device).
CREATE FUNCTION dispatch.owner_allows(
    p_filter_enabled boolean, p_agent_id text, p_agent_owner text, p_task_owner text
) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT NOT p_filter_enabled
        OR p_task_owner IS NULL
        OR coalesce(dispatch.agent_belongs(p_agent_id, p_agent_owner, p_task_owner), false)
$$;

-- pending -> completed: manual resolution (the requester, the owner or an admin; the original
-- service allowed it and its clients rely on it).
CREATE OR REPLACE FUNCTION dispatch.status_edge_allowed(
    old_status dispatch.task_status, new_status dispatch.task_status
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE old_status
        WHEN 'pending'   THEN new_status IN ('assigned', 'completed', 'cancelled')
        WHEN 'assigned'  THEN new_status IN ('running', 'completed', 'failed', 'timed_out',
                                             'pending', 'cancelled')
        WHEN 'running'   THEN new_status IN ('completed', 'failed', 'timed_out', 'pending',
                                             'cancelled')
        WHEN 'failed'    THEN new_status = 'pending'
        WHEN 'timed_out' THEN new_status = 'pending'
        WHEN 'cancelled' THEN new_status = 'pending'
        ELSE false
    END
$$;

CREATE OR REPLACE FUNCTION dispatch.tasks_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    c dispatch.config;
BEGIN
    IF NEW.status IS DISTINCT FROM 'pending' THEN
        RAISE EXCEPTION 'a new task must be pending, not %', NEW.status
            USING ERRCODE = 'UD400', COLUMN = 'status';
    END IF;
    IF NEW.title IS NULL OR char_length(NEW.title) NOT BETWEEN 1 AND 500 THEN
        RAISE EXCEPTION 'title must be 1 to 500 characters (got %)', coalesce(char_length(NEW.title), 0)
            USING ERRCODE = 'UD400', COLUMN = 'title';
    END IF;
    IF NEW.priority NOT BETWEEN 0 AND 10 THEN
        RAISE EXCEPTION 'priority must be between 0 and 10 (got %)', NEW.priority
            USING ERRCODE = 'UD400', COLUMN = 'priority';
    END IF;
    IF NEW.max_retries NOT BETWEEN 0 AND 100 THEN
        RAISE EXCEPTION 'max_retries must be between 0 and 100 (got %)', NEW.max_retries
            USING ERRCODE = 'UD400', COLUMN = 'max_retries';
    END IF;
    IF NEW.timeout_seconds IS NOT NULL AND NEW.timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'timeout_seconds must be greater than 0 (got %)', NEW.timeout_seconds
            USING ERRCODE = 'UD400', COLUMN = 'timeout_seconds';
    END IF;
    IF NEW.heartbeat_seconds IS NOT NULL AND NEW.heartbeat_seconds <= 0 THEN
        RAISE EXCEPTION 'heartbeat_seconds must be greater than 0 (got %)', NEW.heartbeat_seconds
            USING ERRCODE = 'UD400', COLUMN = 'heartbeat_seconds';
    END IF;
    IF octet_length(NEW.description) > 65536 THEN
        RAISE EXCEPTION 'description must be at most 64 KiB'
            USING ERRCODE = 'UD400', COLUMN = 'description';
    END IF;
    IF jsonb_typeof(NEW.metadata) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'metadata must be a JSON object'
            USING ERRCODE = 'UD400', COLUMN = 'metadata';
    END IF;
    IF NEW.owner IS NOT NULL AND char_length(NEW.owner) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION 'owner must be 1 to 256 characters, or NULL for a task any eligible agent may run'
            USING ERRCODE = 'UD400', COLUMN = 'owner';
    END IF;
    IF NEW.timeout_seconds IS NULL THEN
        SELECT * INTO c FROM dispatch.config;
        NEW.timeout_seconds := c.default_timeout_seconds;
    END IF;
    NEW.required_capabilities := dispatch.normalize_capabilities(NEW.required_capabilities);
    NEW.requester := coalesce(NEW.requester, dispatch.session_actor());
    NEW.source := coalesce(NEW.source, 'sql');
    NEW.assigned_agent := NULL;
    NEW.created_at := coalesce(NEW.created_at, now());
    NEW.updated_at := NEW.created_at;
    NEW.available_at := coalesce(NEW.available_at, NEW.created_at);
    RETURN NEW;
END
$$;

-- Moves a locked pending task to an agent (assigner and pull claim share it), and tells the reapers
-- of every replica the attempt's first deadline (channel dispatch_due, payload: its epoch). A
-- reaper sleeping past it wakes; identical payloads fold, so a batch with one timeout sends one.
CREATE OR REPLACE FUNCTION dispatch.task_give(
    t dispatch.tasks, a dispatch.agents, p_score real, p_mode text, p_now timestamptz
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    c dispatch.config;
    r dispatch.tasks;
BEGIN
    IF a.status = 'sleeping' THEN
        SELECT * INTO c FROM dispatch.config;
    END IF;
    UPDATE dispatch.tasks
    SET status = 'assigned', assigned_agent = a.agent_id, assigned_at = p_now,
        deadline_at = p_now + make_interval(secs => t.timeout_seconds),
        wake_deadline_at = CASE WHEN a.status = 'sleeping'
                                THEN p_now + make_interval(secs => c.wake_timeout_ms / 1000.0) END,
        started_at = NULL, last_progress_at = NULL, progress = NULL, unmatched_at = NULL,
        updated_at = p_now
    WHERE task_id = t.task_id
    RETURNING * INTO r;
    PERFORM dispatch.event_write(t.task_id, 'assigned',
        CASE WHEN p_mode = 'claim' THEN a.agent_id ELSE 'dispatch' END,
        jsonb_build_object('assigned_agent', a.agent_id, 'score', p_score,
                           'attempt', t.retry_count + 1, 'mode', p_mode,
                           'wake', a.status = 'sleeping'), p_now);
    PERFORM pg_notify('dispatch_due', extract(epoch FROM least(
        r.deadline_at, r.wake_deadline_at,
        p_now + make_interval(secs => r.heartbeat_seconds)))::text);
    RETURN r;
END
$$;

-- Completion by the assigned agent, or manual resolution by the requester, the owner or an admin
-- (also of a task still pending; event `completed` with manual: true). An agent never completes a
-- task it does not hold. A repeated complete by the agent that completed it returns the task
-- unchanged.
CREATE OR REPLACE FUNCTION dispatch.task_complete(
    p_task_id uuid, p_actor text, p_result jsonb DEFAULT NULL, p_admin boolean DEFAULT false,
    p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
    manual boolean;
BEGIN
    IF t.status = 'completed' AND p_actor = t.assigned_agent THEN
        RETURN t;
    END IF;
    manual := dispatch.task_is_resolver(t, p_actor, p_admin)
              AND p_actor IS DISTINCT FROM t.assigned_agent;
    IF manual THEN
        PERFORM dispatch.task_require_status(t, 'pending', 'assigned', 'running');
    ELSE
        PERFORM dispatch.task_fence(t, p_actor);
        PERFORM dispatch.task_require_status(t, 'assigned', 'running');
    END IF;
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks
    SET status = 'completed', result = p_result, completed_at = p_now, updated_at = p_now,
        deadline_at = NULL, wake_deadline_at = NULL
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'completed', p_actor,
        jsonb_build_object('assigned_agent', t.assigned_agent, 'result', p_result)
        || CASE WHEN manual THEN '{"manual": true}'::jsonb ELSE '{}'::jsonb END, p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

CREATE OR REPLACE FUNCTION dispatch.task_cancel(
    p_task_id uuid, p_actor text, p_reason text DEFAULT NULL, p_admin boolean DEFAULT false,
    p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    IF NOT dispatch.task_is_resolver(t, p_actor, p_admin) THEN
        RAISE EXCEPTION '% may not cancel task % (only its requester, its owner or an admin)',
            p_actor, p_task_id USING ERRCODE = 'UD403';
    END IF;
    PERFORM dispatch.task_require_status(t, 'pending', 'assigned', 'running');
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks
    SET status = 'cancelled', completed_at = p_now, updated_at = p_now,
        deadline_at = NULL, wake_deadline_at = NULL
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'cancelled', p_actor,
        jsonb_build_object('reason', p_reason, 'assigned_agent', t.assigned_agent), p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

CREATE OR REPLACE FUNCTION dispatch.task_update(
    p_task_id uuid, p_actor text, p_metadata_patch jsonb DEFAULT NULL, p_priority integer DEFAULT NULL,
    p_admin boolean DEFAULT false, p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    IF NOT dispatch.task_is_resolver(t, p_actor, p_admin) THEN
        RAISE EXCEPTION '% may not change task % (only its requester, its owner or an admin)',
            p_actor, p_task_id USING ERRCODE = 'UD403';
    END IF;
    IF p_metadata_patch IS NOT NULL AND jsonb_typeof(p_metadata_patch) <> 'object' THEN
        RAISE EXCEPTION 'metadata must be a JSON object' USING ERRCODE = 'UD400', COLUMN = 'metadata';
    END IF;
    IF p_priority IS NOT NULL THEN
        IF p_priority NOT BETWEEN 0 AND 10 THEN
            RAISE EXCEPTION 'priority must be between 0 and 10 (got %)', p_priority
                USING ERRCODE = 'UD400', COLUMN = 'priority';
        END IF;
        IF t.status <> 'pending' THEN
            RAISE EXCEPTION 'the priority of task % can only change while it is pending (it is %)',
                p_task_id, t.status USING ERRCODE = 'UD409';
        END IF;
    END IF;
    UPDATE dispatch.tasks
    SET metadata = CASE WHEN p_metadata_patch IS NULL THEN metadata
                        ELSE dispatch.jsonb_merge_patch(metadata, p_metadata_patch) END,
        priority = coalesce(p_priority, priority),
        updated_at = p_now
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'updated', p_actor,
        jsonb_strip_nulls(jsonb_build_object('metadata', p_metadata_patch, 'priority', p_priority)),
        p_now);
    RETURN t;
END
$$;

CREATE OR REPLACE FUNCTION dispatch.task_claim(
    p_agent_id text, p_capabilities text[] DEFAULT NULL, p_now timestamptz DEFAULT now()
) RETURNS SETOF dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    c    dispatch.config;
    a    dispatch.agents;
    t    dispatch.tasks;
    caps text[];
BEGIN
    SELECT * INTO c FROM dispatch.config;
    INSERT INTO dispatch.agents (agent_id, capabilities, last_seen_at)
    VALUES (p_agent_id, dispatch.normalize_capabilities(coalesce(p_capabilities, '{}')), p_now)
    ON CONFLICT (agent_id) DO UPDATE
        SET last_seen_at = p_now,
            status = CASE WHEN agents.status IN ('unknown', 'stopped', 'sleeping')
                          THEN 'ready'::dispatch.agent_status ELSE agents.status END
    RETURNING * INTO a;     -- also locks the agent row: it is the semaphore
    caps := CASE WHEN p_capabilities IS NULL THEN a.capabilities
                 ELSE dispatch.normalize_capabilities(p_capabilities) END;
    IF a.drained OR a.status = 'degraded'
       OR a.active_count >= coalesce(a.max_concurrent, c.max_concurrent_per_agent) THEN
        RETURN;
    END IF;
    PERFORM dispatch.fn_enter();
    -- An agent that already failed a task gets it again only when nothing else fits.
    FOR pass IN 1..2 LOOP
        SELECT * INTO t FROM dispatch.tasks tk
        WHERE tk.status = 'pending' AND tk.available_at <= p_now
          AND tk.required_capabilities <@ caps
          AND dispatch.owner_allows(c.owner_filter_enabled, a.agent_id, a.owner, tk.owner)
          AND (pass = 2) = (p_agent_id = ANY (tk.previous_agents))
        ORDER BY tk.priority DESC, tk.created_at
        LIMIT 1
        FOR UPDATE SKIP LOCKED;
        EXIT WHEN FOUND;
    END LOOP;
    IF t.task_id IS NOT NULL THEN
        RETURN NEXT dispatch.task_give(t, a,
            (dispatch.availability(a.status) * (1 + t.priority / 10.0))::real, 'claim', p_now);
    END IF;
    PERFORM dispatch.fn_leave();
END
$$;

CREATE OR REPLACE FUNCTION dispatch.task_assign(p_batch integer DEFAULT 100, p_now timestamptz DEFAULT now())
RETURNS TABLE (task_id uuid, agent_id text, score real, wake boolean)
LANGUAGE plpgsql AS $$
DECLARE
    c      dispatch.config;
    locked text[];
    t      dispatch.tasks;
    a      dispatch.agents;
BEGIN
    SELECT * INTO c FROM dispatch.config;
    locked := ARRAY(
        SELECT ag.agent_id FROM dispatch.agents ag
        WHERE NOT ag.drained AND ag.status IN ('ready', 'sleeping', 'busy')
          AND ag.active_count < coalesce(ag.max_concurrent, c.max_concurrent_per_agent)
        ORDER BY ag.agent_id
        FOR UPDATE SKIP LOCKED);
    IF cardinality(locked) = 0 THEN
        RETURN;
    END IF;
    PERFORM dispatch.fn_enter();
    FOR t IN
        SELECT * FROM dispatch.tasks tk
        WHERE tk.status = 'pending' AND tk.available_at <= p_now
          AND EXISTS (
              SELECT 1 FROM dispatch.agents ag
              WHERE ag.agent_id = ANY (locked)
                AND ag.capabilities @> tk.required_capabilities
                AND dispatch.owner_allows(c.owner_filter_enabled, ag.agent_id, ag.owner, tk.owner))
        ORDER BY tk.priority DESC, tk.created_at
        LIMIT p_batch
        FOR UPDATE OF tk SKIP LOCKED
    LOOP
        SELECT * INTO a FROM dispatch.agents ag
        WHERE ag.agent_id = ANY (locked)
          AND ag.active_count < coalesce(ag.max_concurrent, c.max_concurrent_per_agent)
          AND ag.capabilities @> t.required_capabilities
          AND dispatch.owner_allows(c.owner_filter_enabled, ag.agent_id, ag.owner, t.owner)
        ORDER BY ag.agent_id = ANY (t.previous_agents),
                 dispatch.availability(ag.status) DESC,
                 ag.active_count,
                 ag.last_assigned_at NULLS FIRST,
                 ag.agent_id
        LIMIT 1;
        CONTINUE WHEN NOT FOUND;
        task_id := t.task_id;
        agent_id := a.agent_id;
        score := (dispatch.availability(a.status) * (1 + t.priority / 10.0))::real;
        wake := a.status = 'sleeping';
        PERFORM dispatch.task_give(t, a, score, 'push', p_now);
        RETURN NEXT;
    END LOOP;
    PERFORM dispatch.fn_leave();
END
$$;

CREATE OR REPLACE FUNCTION dispatch.task_report_unmatched(
    p_now timestamptz DEFAULT now(), p_limit integer DEFAULT 100
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    c dispatch.config;
    t dispatch.tasks;
    n integer := 0;
BEGIN
    SELECT * INTO c FROM dispatch.config;
    FOR t IN
        SELECT * FROM dispatch.tasks tk
        WHERE tk.status = 'pending' AND tk.available_at <= p_now
          AND (tk.unmatched_at IS NULL
               OR tk.unmatched_at <= p_now - make_interval(secs => c.unmatched_repeat_ms / 1000.0))
          AND NOT EXISTS (
              SELECT 1 FROM dispatch.agents ag
              WHERE NOT ag.drained AND ag.status IN ('ready', 'sleeping', 'busy')
                AND ag.capabilities @> tk.required_capabilities
                AND dispatch.owner_allows(c.owner_filter_enabled, ag.agent_id, ag.owner, tk.owner))
        ORDER BY tk.priority DESC, tk.created_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    LOOP
        UPDATE dispatch.tasks SET unmatched_at = p_now WHERE task_id = t.task_id;
        PERFORM dispatch.event_write(t.task_id, 'unmatched', 'dispatch',
            jsonb_build_object('required_capabilities', to_jsonb(t.required_capabilities),
                               'owner', t.owner), p_now);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- explain: a task without an owner is not owner-scoped, so ownership excludes nobody.
CREATE OR REPLACE FUNCTION dispatch.task_explain(p_task_id uuid)
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
                   CASE WHEN t.owner IS NULL THEN NULL
                        WHEN c.owner_filter_enabled AND f.belongs IS NULL
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

-- CREATE OR REPLACE resets a function's settings: keep the claim's and the assignment's.
ALTER FUNCTION dispatch.task_claim(text, text[], timestamptz) SET enable_sort = off;
ALTER FUNCTION dispatch.task_assign(integer, timestamptz) SET enable_sort = off;
