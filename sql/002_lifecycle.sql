-- The lifecycle of SPEC section 3: one function per transition, a trigger that rejects any other
-- status change (from raw SQL too), and the event row + NOTIFY in the transaction of every change.
--
-- Errors raised here carry SQLSTATEs the Python store maps to domain errors:
--   UD400 invalid argument, UD403 actor may not do this, UD404 no such task or agent,
--   UD409 the task is not in a state that allows it (illegal status edges also raise UD409).
--
-- NOTIFY channels carry an empty payload so that Postgres folds them within a transaction:
--   dispatch_work   there may be new assignable work or freed capacity (wakes the assigner)
--   dispatch_events new rows in task_events (wakes the relay)

CREATE FUNCTION dispatch.normalize_capabilities(caps text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(DISTINCT c ORDER BY c), '{}')
    FROM (SELECT lower(btrim(x)) AS c FROM unnest(caps) AS x) s
    WHERE c IS NOT NULL AND c <> ''
$$;

-- Who the session is, for the actor of events written from raw SQL.
CREATE FUNCTION dispatch.session_actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('dispatch.actor', true), ''), session_user::text)
$$;

CREATE FUNCTION dispatch.event_write(
    p_task_id uuid, p_event text, p_actor text, p_payload jsonb, p_now timestamptz
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dispatch.task_events (task_id, event, actor, payload, created_at)
    VALUES (p_task_id, p_event, p_actor, coalesce(p_payload, '{}'), p_now);
    PERFORM pg_notify('dispatch_events', '');
END
$$;

-- Backoff for the attempt-th retry: retry_backoff_ms * 2^(attempt-1), capped, +-20 % jitter.
CREATE FUNCTION dispatch.retry_backoff(attempt integer) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT make_interval(secs =>
        least(c.retry_backoff_ms::float8 * power(2, greatest(attempt, 1) - 1),
              c.retry_backoff_max_ms::float8)
        * (0.8 + 0.4 * random()) / 1000.0)
    FROM dispatch.config c
$$;

-- The edges of SPEC section 3. running -> pending and assigned -> pending are the retry / reassign
-- edges (failed or timed out with retries left, wake timeout, agent stopped).
CREATE FUNCTION dispatch.status_edge_allowed(
    old_status dispatch.task_status, new_status dispatch.task_status
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE old_status
        WHEN 'pending'   THEN new_status IN ('assigned', 'cancelled')
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

-- Does the agent belong to the task's owner (registry owner or an Alexandria device)?
CREATE FUNCTION dispatch.agent_belongs(p_agent_id text, p_agent_owner text, p_task_owner text)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p_agent_owner = p_task_owner
        OR EXISTS (SELECT 1 FROM dispatch.agent_owners o
                   WHERE o.agent_id = p_agent_id AND o.owner = p_task_owner)
$$;

CREATE FUNCTION dispatch.availability(s dispatch.agent_status) RETURNS real
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE s WHEN 'ready' THEN 1.0 WHEN 'sleeping' THEN 0.8 WHEN 'busy' THEN 0.5
                  ELSE 0.0 END::real
$$;

---------------------------------------------------------------------------------------------------
-- Triggers
---------------------------------------------------------------------------------------------------

-- Defaults that depend on other columns or on dispatch.config, and argument checks with messages a
-- psql user can act on. Runs for create_task, the API and a plain INSERT alike.
CREATE FUNCTION dispatch.tasks_before_insert() RETURNS trigger
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
    IF NEW.timeout_seconds IS NULL THEN
        SELECT * INTO c FROM dispatch.config;
        NEW.timeout_seconds := c.default_timeout_seconds;
    END IF;
    NEW.required_capabilities := dispatch.normalize_capabilities(NEW.required_capabilities);
    NEW.requester := coalesce(NEW.requester, dispatch.session_actor());
    NEW.owner := coalesce(NEW.owner, NEW.requester);
    NEW.source := coalesce(NEW.source, 'sql');
    NEW.assigned_agent := NULL;
    NEW.created_at := coalesce(NEW.created_at, now());
    NEW.updated_at := NEW.created_at;
    NEW.available_at := coalesce(NEW.available_at, NEW.created_at);
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_before_insert BEFORE INSERT ON dispatch.tasks
    FOR EACH ROW EXECUTE FUNCTION dispatch.tasks_before_insert();

CREATE FUNCTION dispatch.tasks_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM dispatch.event_write(NEW.task_id, 'created', NEW.requester,
        jsonb_build_object('priority', NEW.priority,
                           'required_capabilities', to_jsonb(NEW.required_capabilities),
                           'owner', NEW.owner, 'source', NEW.source),
        NEW.created_at);
    PERFORM pg_notify('dispatch_work', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_after_insert AFTER INSERT ON dispatch.tasks
    FOR EACH ROW EXECUTE FUNCTION dispatch.tasks_after_insert();

-- Guards every status change and keeps each agent's active_count. Status changes made by raw SQL
-- (not through the functions below, which set dispatch.via) get a generic event so that no change
-- escapes the history.
CREATE FUNCTION dispatch.tasks_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    was_active boolean := OLD.status IN ('assigned', 'running');
    is_active  boolean := NEW.status IN ('assigned', 'running');
    via_sql    boolean := coalesce(current_setting('dispatch.via', true), '') <> 'fn';
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NOT dispatch.status_edge_allowed(OLD.status, NEW.status) THEN
            RAISE EXCEPTION 'illegal task status transition from % to % (task %)',
                OLD.status, NEW.status, OLD.task_id
                USING ERRCODE = 'UD409',
                      HINT = 'see the lifecycle in SPEC section 3; use the dispatch.* functions';
        END IF;
        IF via_sql THEN
            IF NEW.status IN ('completed', 'failed', 'timed_out', 'cancelled') THEN
                NEW.completed_at := coalesce(NEW.completed_at, now());
            END IF;
            IF NEW.status = 'assigned' AND NEW.assigned_agent IS NULL THEN
                RAISE EXCEPTION 'an assigned task needs an assigned_agent'
                    USING ERRCODE = 'UD400', COLUMN = 'assigned_agent';
            END IF;
            PERFORM dispatch.event_write(OLD.task_id,
                CASE NEW.status
                    WHEN 'pending'   THEN CASE WHEN was_active THEN 'reassigned' ELSE 'requeued' END
                    WHEN 'assigned'  THEN 'assigned'
                    WHEN 'running'   THEN 'started'
                    WHEN 'timed_out' THEN 'timeout'
                    ELSE NEW.status::text
                END,
                dispatch.session_actor(),
                jsonb_build_object('from', OLD.status, 'to', NEW.status, 'via', 'sql',
                                   'assigned_agent', NEW.assigned_agent),
                now());
        END IF;
        NEW.updated_at := greatest(NEW.updated_at, OLD.updated_at);
    END IF;
    IF was_active AND (NOT is_active OR NEW.assigned_agent IS DISTINCT FROM OLD.assigned_agent) THEN
        UPDATE dispatch.agents SET active_count = greatest(active_count - 1, 0)
        WHERE agent_id = OLD.assigned_agent;
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    IF is_active AND (NOT was_active OR NEW.assigned_agent IS DISTINCT FROM OLD.assigned_agent) THEN
        UPDATE dispatch.agents
        SET active_count = active_count + 1,
            last_assigned_at = coalesce(NEW.assigned_at, now())
        WHERE agent_id = NEW.assigned_agent;
    END IF;
    IF NEW.status = 'pending' AND OLD.status <> 'pending' AND via_sql THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_before_update BEFORE UPDATE OF status, assigned_agent ON dispatch.tasks
    FOR EACH ROW EXECUTE FUNCTION dispatch.tasks_before_update();

-- Marks the current transaction as inside a lifecycle function (its events are written by the
-- function itself), until dispatch.fn_leave().
CREATE FUNCTION dispatch.fn_enter() RETURNS void
LANGUAGE sql AS $$ SELECT set_config('dispatch.via', 'fn', true) $$;

CREATE FUNCTION dispatch.fn_leave() RETURNS void
LANGUAGE sql AS $$ SELECT set_config('dispatch.via', '', true) $$;

---------------------------------------------------------------------------------------------------
-- Helpers shared by the transitions
---------------------------------------------------------------------------------------------------

CREATE FUNCTION dispatch.task_lock(p_task_id uuid) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks;
BEGIN
    SELECT * INTO t FROM dispatch.tasks WHERE task_id = p_task_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task % not found', p_task_id USING ERRCODE = 'UD404';
    END IF;
    RETURN t;
END
$$;

-- Fencing for agent reports: only the current assigned agent may report. An agent that held an
-- earlier attempt gets a conflict (its report is stale); anyone else is refused.
CREATE FUNCTION dispatch.task_fence(t dispatch.tasks, p_agent_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_agent_id IS NOT DISTINCT FROM t.assigned_agent THEN
        RETURN;
    END IF;
    IF p_agent_id = ANY (t.previous_agents) THEN
        RAISE EXCEPTION 'agent % no longer holds task % (status %, assigned to %)',
            p_agent_id, t.task_id, t.status, coalesce(t.assigned_agent, 'nobody')
            USING ERRCODE = 'UD409';
    END IF;
    RAISE EXCEPTION 'agent % is not assigned to task %', p_agent_id, t.task_id
        USING ERRCODE = 'UD403';
END
$$;

CREATE FUNCTION dispatch.task_require_status(t dispatch.tasks, VARIADIC allowed dispatch.task_status[])
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT t.status = ANY (allowed) THEN
        RAISE EXCEPTION 'task % is %, expected %', t.task_id, t.status, array_to_string(allowed, ' or ')
            USING ERRCODE = 'UD409';
    END IF;
END
$$;

-- Ends the current attempt of an active task after a failure or timeout: back to pending after a
-- backoff when retries are left (event retry), else the terminal status (event dlq).
CREATE FUNCTION dispatch.task_end_attempt(
    t dispatch.tasks, p_terminal dispatch.task_status, p_error text, p_retry boolean,
    p_now timestamptz
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    r dispatch.tasks;
BEGIN
    IF p_retry AND t.retry_count < t.max_retries THEN
        UPDATE dispatch.tasks
        SET status = 'pending',
            retry_count = t.retry_count + 1,
            available_at = p_now + dispatch.retry_backoff(t.retry_count + 1),
            previous_agents = CASE WHEN t.assigned_agent = ANY (t.previous_agents)
                                   THEN t.previous_agents
                                   ELSE t.previous_agents || t.assigned_agent END,
            assigned_agent = NULL, deadline_at = NULL, wake_deadline_at = NULL,
            error = coalesce(p_error, t.error), updated_at = p_now
        WHERE task_id = t.task_id
        RETURNING * INTO r;
        PERFORM dispatch.event_write(t.task_id, 'retry', 'dispatch',
            jsonb_build_object('retry_count', r.retry_count, 'available_at', r.available_at,
                               'previous_agent', t.assigned_agent), p_now);
    ELSE
        UPDATE dispatch.tasks
        SET status = p_terminal, error = coalesce(p_error, t.error),
            deadline_at = NULL, wake_deadline_at = NULL,
            completed_at = p_now, updated_at = p_now
        WHERE task_id = t.task_id
        RETURNING * INTO r;
        PERFORM dispatch.event_write(t.task_id, 'dlq', 'dispatch',
            jsonb_build_object('reason', CASE WHEN p_retry THEN 'retries exhausted'
                                              ELSE 'not retry eligible' END,
                               'retry_count', r.retry_count, 'max_retries', r.max_retries),
            p_now);
    END IF;
    RETURN r;
END
$$;

-- Takes an active task away from its agent without blaming a failure on it (wake timeout, agent
-- stopped). It still counts as an attempt, so nothing bounces forever.
CREATE FUNCTION dispatch.task_reassign(t dispatch.tasks, p_reason text, p_now timestamptz)
RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    r dispatch.tasks;
BEGIN
    IF t.retry_count >= t.max_retries THEN
        PERFORM dispatch.event_write(t.task_id, 'timeout', 'dispatch',
            jsonb_build_object('assigned_agent', t.assigned_agent,
                               'timed_out_in_state', t.status, 'reason', p_reason), p_now);
        RETURN dispatch.task_end_attempt(t, 'timed_out', p_reason, true, p_now);
    END IF;
    UPDATE dispatch.tasks
    SET status = 'pending', retry_count = t.retry_count + 1, available_at = p_now,
        previous_agents = CASE WHEN t.assigned_agent = ANY (t.previous_agents)
                               THEN t.previous_agents
                               ELSE t.previous_agents || t.assigned_agent END,
        assigned_agent = NULL, deadline_at = NULL, wake_deadline_at = NULL, updated_at = p_now
    WHERE task_id = t.task_id
    RETURNING * INTO r;
    PERFORM dispatch.event_write(t.task_id, 'reassigned', 'dispatch',
        jsonb_build_object('previous_agent', t.assigned_agent, 'reason', p_reason), p_now);
    PERFORM pg_notify('dispatch_work', '');
    RETURN r;
END
$$;

-- Moves a locked pending task to an agent (assigner and pull claim share it).
CREATE FUNCTION dispatch.task_give(
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
    RETURN r;
END
$$;

---------------------------------------------------------------------------------------------------
-- Transitions
---------------------------------------------------------------------------------------------------

-- Pull mode: assign the calling agent the best pending task it is eligible for, or nothing.
-- Registers an unknown agent in the built-in registry. p_capabilities, when given, narrows what the
-- agent wants now (and becomes its capabilities if it was unknown).
CREATE FUNCTION dispatch.task_claim(
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
          AND (NOT c.owner_filter_enabled OR dispatch.agent_belongs(a.agent_id, a.owner, tk.owner))
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

-- The assigner: take up to p_batch assignable pending rows (SKIP LOCKED) in priority order and give
-- each the best eligible agent (SPEC section 4). Candidate agents are locked once, in agent_id order
-- with SKIP LOCKED, so replicas never deadlock and never push an agent over its limit; active_count
-- rises as the loop assigns, so the limit holds inside the batch too.
CREATE FUNCTION dispatch.task_assign(p_batch integer DEFAULT 100, p_now timestamptz DEFAULT now())
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
                AND (NOT c.owner_filter_enabled
                     OR dispatch.agent_belongs(ag.agent_id, ag.owner, tk.owner)))
        ORDER BY tk.priority DESC, tk.created_at
        LIMIT p_batch
        FOR UPDATE OF tk SKIP LOCKED
    LOOP
        SELECT * INTO a FROM dispatch.agents ag
        WHERE ag.agent_id = ANY (locked)
          AND ag.active_count < coalesce(ag.max_concurrent, c.max_concurrent_per_agent)
          AND ag.capabilities @> t.required_capabilities
          AND (NOT c.owner_filter_enabled OR dispatch.agent_belongs(ag.agent_id, ag.owner, t.owner))
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

CREATE FUNCTION dispatch.task_start(
    p_task_id uuid, p_agent_id text, p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    PERFORM dispatch.task_fence(t, p_agent_id);
    IF t.status = 'running' THEN
        RETURN t;   -- a repeated start changes nothing
    END IF;
    PERFORM dispatch.task_require_status(t, 'assigned');
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks
    SET status = 'running', started_at = p_now, last_progress_at = p_now,
        wake_deadline_at = NULL, updated_at = p_now
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'started', p_agent_id,
        jsonb_build_object('assigned_agent', p_agent_id), p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

CREATE FUNCTION dispatch.task_progress(
    p_task_id uuid, p_agent_id text, p_percent real DEFAULT NULL, p_message text DEFAULT NULL,
    p_data jsonb DEFAULT NULL, p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
    p jsonb;
BEGIN
    IF p_percent IS NOT NULL AND NOT (p_percent BETWEEN 0 AND 100) THEN
        RAISE EXCEPTION 'percent must be between 0 and 100 (got %)', p_percent
            USING ERRCODE = 'UD400', COLUMN = 'percent';
    END IF;
    PERFORM dispatch.task_fence(t, p_agent_id);
    PERFORM dispatch.task_require_status(t, 'assigned', 'running');
    IF t.status = 'assigned' THEN
        t := dispatch.task_start(p_task_id, p_agent_id, p_now);
    END IF;
    p := jsonb_strip_nulls(jsonb_build_object('percent', p_percent, 'message', p_message,
                                              'data', p_data));
    PERFORM dispatch.fn_enter();
    -- Only unindexed columns change: a HOT update.
    UPDATE dispatch.tasks
    SET progress = p, last_progress_at = p_now, updated_at = p_now
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'progress', p_agent_id,
        jsonb_build_object('assigned_agent', p_agent_id, 'percent', p_percent,
                           'message', p_message, 'data', p_data), p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

-- Completion by the assigned agent, or manual resolution by the requester, the owner or an admin.
-- A repeated complete by the agent that completed it returns the task unchanged.
CREATE FUNCTION dispatch.task_complete(
    p_task_id uuid, p_actor text, p_result jsonb DEFAULT NULL, p_admin boolean DEFAULT false,
    p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
    resolver boolean;
BEGIN
    IF t.status = 'completed' AND p_actor = t.assigned_agent THEN
        RETURN t;
    END IF;
    resolver := p_admin OR p_actor IN (t.requester, t.owner);
    IF NOT resolver OR p_actor = t.assigned_agent THEN
        PERFORM dispatch.task_fence(t, p_actor);
    END IF;
    PERFORM dispatch.task_require_status(t, 'assigned', 'running');
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks
    SET status = 'completed', result = p_result, completed_at = p_now, updated_at = p_now,
        deadline_at = NULL, wake_deadline_at = NULL
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'completed', p_actor,
        jsonb_build_object('assigned_agent', t.assigned_agent, 'result', p_result), p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

CREATE FUNCTION dispatch.task_fail(
    p_task_id uuid, p_agent_id text, p_error text DEFAULT NULL,
    p_retry_eligible boolean DEFAULT true, p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    PERFORM dispatch.task_fence(t, p_agent_id);
    PERFORM dispatch.task_require_status(t, 'assigned', 'running');
    PERFORM dispatch.fn_enter();
    PERFORM dispatch.event_write(p_task_id, 'failed', p_agent_id,
        jsonb_build_object('assigned_agent', p_agent_id, 'error', p_error,
                           'retry_eligible', coalesce(p_retry_eligible, true)), p_now);
    t := dispatch.task_end_attempt(t, 'failed', p_error, coalesce(p_retry_eligible, true), p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

-- The reaper: expire active attempts past their deadline, their heartbeat or their wake timeout.
CREATE FUNCTION dispatch.task_expire(p_now timestamptz DEFAULT now(), p_limit integer DEFAULT 100)
RETURNS TABLE (task_id uuid, event text, status dispatch.task_status)
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks;
    r dispatch.tasks;
BEGIN
    PERFORM dispatch.fn_enter();
    FOR t IN
        SELECT * FROM dispatch.tasks tk
        WHERE tk.status IN ('assigned', 'running')
          AND (tk.deadline_at <= p_now
               OR (tk.status = 'assigned' AND tk.wake_deadline_at <= p_now)
               OR tk.heartbeat_seconds IS NOT NULL
                  AND coalesce(tk.last_progress_at, tk.started_at, tk.assigned_at)
                      + make_interval(secs => tk.heartbeat_seconds) <= p_now)
        ORDER BY tk.deadline_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    LOOP
        IF t.status = 'assigned' AND t.wake_deadline_at <= p_now AND t.deadline_at > p_now THEN
            r := dispatch.task_reassign(t, 'wake_timeout', p_now);
            event := 'reassigned';
        ELSE
            PERFORM dispatch.event_write(t.task_id, 'timeout', 'dispatch',
                jsonb_build_object('assigned_agent', t.assigned_agent,
                                   'timed_out_in_state', t.status,
                                   'reason', CASE WHEN t.deadline_at <= p_now THEN 'deadline'
                                                  ELSE 'heartbeat' END), p_now);
            r := dispatch.task_end_attempt(t, 'timed_out', 'timed out', true, p_now);
            event := 'timeout';
        END IF;
        task_id := r.task_id;
        status := r.status;
        RETURN NEXT;
    END LOOP;
    PERFORM dispatch.fn_leave();
END
$$;

-- The next instant at which the reaper or the assigner has something to do (a deadline, a heartbeat
-- or wake timeout, a scheduled or backed-off task becoming available); NULL when nothing is known.
CREATE FUNCTION dispatch.next_due(p_now timestamptz DEFAULT now()) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT least(
        (SELECT min(least(tk.deadline_at,
                          CASE WHEN tk.status = 'assigned' THEN tk.wake_deadline_at END,
                          coalesce(tk.last_progress_at, tk.started_at, tk.assigned_at)
                              + make_interval(secs => tk.heartbeat_seconds)))
         FROM dispatch.tasks tk WHERE tk.status IN ('assigned', 'running')),
        (SELECT min(tk.available_at) FROM dispatch.tasks tk
         WHERE tk.status = 'pending' AND tk.available_at > p_now))
$$;

CREATE FUNCTION dispatch.task_cancel(
    p_task_id uuid, p_actor text, p_reason text DEFAULT NULL, p_admin boolean DEFAULT false,
    p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    IF NOT (p_admin OR p_actor IN (t.requester, t.owner)) THEN
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

-- Dead-letter requeue (admin): a failed, timed-out or cancelled task starts over.
CREATE FUNCTION dispatch.task_requeue(
    p_task_id uuid, p_actor text, p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
    previous dispatch.task_status := t.status;
BEGIN
    PERFORM dispatch.task_require_status(t, 'failed', 'timed_out', 'cancelled');
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks
    SET status = 'pending', retry_count = 0, assigned_agent = NULL, available_at = p_now,
        deadline_at = NULL, wake_deadline_at = NULL, completed_at = NULL, unmatched_at = NULL,
        updated_at = p_now
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'requeued', p_actor,
        jsonb_build_object('previous_status', previous), p_now);
    PERFORM pg_notify('dispatch_work', '');
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

-- Pending, available tasks that no agent in the directory could take (capacity aside) get one
-- `unmatched` event, and another only after unmatched_repeat_ms.
CREATE FUNCTION dispatch.task_report_unmatched(
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
                AND (NOT c.owner_filter_enabled
                     OR dispatch.agent_belongs(ag.agent_id, ag.owner, tk.owner)))
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

---------------------------------------------------------------------------------------------------
-- The directory
---------------------------------------------------------------------------------------------------

-- Registers or updates an agent; NULL arguments keep the current value.
CREATE FUNCTION dispatch.agent_upsert(
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
        status = coalesce(p_status, ag.status),
        policy = coalesce(p_policy, ag.policy),
        last_seen_at = p_now, updated_at = p_now
    RETURNING * INTO a;
    PERFORM pg_notify('dispatch_work', '');
    RETURN a;
END
$$;

CREATE FUNCTION dispatch.agent_heartbeat(
    p_agent_id text, p_status dispatch.agent_status DEFAULT NULL, p_now timestamptz DEFAULT now()
) RETURNS dispatch.agents
LANGUAGE plpgsql AS $$
DECLARE
    a dispatch.agents;
BEGIN
    UPDATE dispatch.agents
    SET status = coalesce(p_status, status), last_seen_at = p_now, updated_at = p_now
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

CREATE FUNCTION dispatch.agent_drain(p_agent_id text, p_drained boolean DEFAULT true,
                                     p_now timestamptz DEFAULT now())
RETURNS dispatch.agents
LANGUAGE plpgsql AS $$
DECLARE
    a dispatch.agents;
BEGIN
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

-- The agent stopped (NATS swarm.agent.<id>.stopped): its active tasks go back to pending.
CREATE FUNCTION dispatch.agent_stop(p_agent_id text, p_now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks;
    n integer := 0;
BEGIN
    UPDATE dispatch.agents SET status = 'stopped', updated_at = p_now, last_seen_at = p_now
    WHERE agent_id = p_agent_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % not found', p_agent_id USING ERRCODE = 'UD404';
    END IF;
    PERFORM dispatch.fn_enter();
    FOR t IN
        SELECT * FROM dispatch.tasks tk
        WHERE tk.status IN ('assigned', 'running') AND tk.assigned_agent = p_agent_id
        ORDER BY tk.task_id
        FOR UPDATE
    LOOP
        PERFORM dispatch.task_reassign(t, 'agent_stopped', p_now);
        n := n + 1;
    END LOOP;
    PERFORM dispatch.fn_leave();
    RETURN n;
END
$$;

-- Retention: delete terminal tasks finished before p_before (their events go with them).
CREATE FUNCTION dispatch.task_prune(p_before timestamptz, p_limit integer DEFAULT 1000)
RETURNS integer
LANGUAGE sql AS $$
    WITH doomed AS (
        SELECT task_id FROM dispatch.tasks
        WHERE status IN ('completed', 'failed', 'timed_out', 'cancelled')
          AND completed_at < p_before
        ORDER BY completed_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM dispatch.tasks t USING doomed d WHERE t.task_id = d.task_id RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

-- RFC 7396 JSON merge patch: objects merge recursively, null removes a key, anything else replaces.
CREATE FUNCTION dispatch.jsonb_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN jsonb_typeof(patch) IS DISTINCT FROM 'object' THEN patch
        ELSE (
            SELECT coalesce(jsonb_object_agg(k, v), '{}')
            FROM (
                SELECT key AS k,
                       CASE WHEN patch ? key
                            THEN dispatch.jsonb_merge_patch(
                                     CASE WHEN jsonb_typeof(target) = 'object' THEN target -> key END,
                                     patch -> key)
                            ELSE target -> key END AS v
                FROM (SELECT jsonb_object_keys(CASE WHEN jsonb_typeof(target) = 'object'
                                                    THEN target ELSE '{}' END) AS key
                      UNION
                      SELECT jsonb_object_keys(patch)) keys
            ) merged
            WHERE v IS NOT NULL AND v <> 'null'::jsonb
        )
    END
$$;

-- PATCH by the requester, the owner or an admin: merge-patch the metadata; change the priority of a
-- task that is still pending. Event `updated` with what changed.
CREATE FUNCTION dispatch.task_update(
    p_task_id uuid, p_actor text, p_metadata_patch jsonb DEFAULT NULL, p_priority integer DEFAULT NULL,
    p_admin boolean DEFAULT false, p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    IF NOT (p_admin OR p_actor IN (t.requester, t.owner)) THEN
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
