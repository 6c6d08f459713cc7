-- Who may take what, and how well: the rules of assignment, each written once and called by the
-- assigner (task_assign), the pull claim (task_claim), the unmatched report and explain, so that
-- explain cannot say anything other than what the assigner does.

CREATE FUNCTION dispatch.availability(s dispatch.agent_status) RETURNS real
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE s WHEN 'ready' THEN 1.0 WHEN 'sleeping' THEN 0.8 WHEN 'busy' THEN 0.5
                  ELSE 0.0 END::real
$$;

CREATE FUNCTION dispatch.priority_weight(p_priority integer) RETURNS real
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (1 + p_priority / 10.0)::real
$$;

-- The score of an eligible agent: capability match (1 for every eligible agent) x availability x
-- priority weight. Ties are broken by the candidates' order in task_assign and task_explain.
CREATE FUNCTION dispatch.task_score(a dispatch.agents, t dispatch.tasks) RETURNS real
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT dispatch.availability(a.status) * dispatch.priority_weight(t.priority)
$$;

-- Does the agent belong to the owner (registry owner or an Alexandria device)?
CREATE FUNCTION dispatch.agent_belongs(p_agent_id text, p_agent_owner text, p_task_owner text)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(p_agent_owner = p_task_owner, false)
        OR EXISTS (SELECT 1 FROM dispatch.agent_owners o
                   WHERE o.agent_id = p_agent_id AND o.owner = p_task_owner)
$$;

-- Why an agent that does not belong to the task's owner is excluded: nobody knows whom it belongs
-- to (the filter fails closed), or it belongs to someone else.
CREATE FUNCTION dispatch.agent_owner_reason(p_agent_id text, p_agent_owner text, p_task_owner text)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_agent_owner IS NULL AND devices.owners IS NULL
                THEN format('ownership unknown (owner filter on, task owner %s)', p_task_owner)
                ELSE format('belongs to %s, not to the task owner %s',
                            array_to_string(array_remove(
                                coalesce(devices.owners, '{}') || p_agent_owner, NULL), ', '),
                            p_task_owner) END
    FROM (SELECT array_agg(o.owner ORDER BY o.owner) AS owners FROM dispatch.agent_owners o
          WHERE o.agent_id = p_agent_id) devices
$$;

CREATE FUNCTION dispatch.capabilities_missing(p_have text[], p_need text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(x ORDER BY x), '{}') FROM unnest(p_need) x WHERE NOT x = ANY (p_have)
$$;

-- Why the agent takes no new work at all now (empty: it may). p_capacity false leaves its load out.
CREATE FUNCTION dispatch.agent_unavailability(
    a dispatch.agents, c dispatch.config, p_capacity boolean DEFAULT true
) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT array_remove(ARRAY[
        CASE WHEN a.drained THEN 'drained' END,
        CASE WHEN a.status NOT IN ('ready', 'sleeping', 'busy') THEN 'status ' || a.status END,
        CASE WHEN p_capacity
                  AND a.active_count >= coalesce(a.max_concurrent, c.max_concurrent_per_agent)
             THEN format('at its limit (%s of %s tasks active)', a.active_count,
                         coalesce(a.max_concurrent, c.max_concurrent_per_agent)) END
    ], NULL)
$$;

-- Every reason the agent may not take the task (empty: eligible): unavailable, capabilities not a
-- superset of the requirement, or, when the task has an owner and the owner filter is on, not the
-- owner's. A previous agent of the task is eligible; callers prefer the others.
CREATE FUNCTION dispatch.agent_ineligibility(
    a dispatch.agents, t dispatch.tasks, c dispatch.config, p_capacity boolean DEFAULT true
) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT dispatch.agent_unavailability(a, c, p_capacity) || array_remove(ARRAY[
        CASE WHEN NOT a.capabilities @> t.required_capabilities
             THEN 'missing capabilities: ' || array_to_string(
                 dispatch.capabilities_missing(a.capabilities, t.required_capabilities), ', ') END,
        CASE WHEN c.owner_filter_enabled AND t.owner IS NOT NULL
                  AND NOT dispatch.agent_belongs(a.agent_id, a.owner, t.owner)
             THEN dispatch.agent_owner_reason(a.agent_id, a.owner, t.owner) END
    ], NULL)
$$;

-- Moves a locked pending task to an agent (assigner and pull claim share it), and tells the reapers
-- of every replica the attempt's first deadline (channel dispatch_due, payload: its epoch). A
-- reaper sleeping past it wakes; identical payloads fold, so a batch with one timeout sends one.
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
    PERFORM pg_notify('dispatch_due', extract(epoch FROM least(
        r.deadline_at, r.wake_deadline_at,
        p_now + make_interval(secs => r.heartbeat_seconds)))::text);
    RETURN r;
END
$$;

-- Pull mode: assign the calling agent the best pending task it is eligible for, or nothing.
-- Registers an unknown agent in the built-in registry. p_capabilities, when given, narrows what the
-- agent wants now (and becomes its capabilities if it was unknown).
CREATE FUNCTION dispatch.task_claim(
    p_agent_id text, p_capabilities text[] DEFAULT NULL, p_now timestamptz DEFAULT now()
) RETURNS SETOF dispatch.tasks
LANGUAGE plpgsql
-- The pending rows must be walked in tasks_pending_order_idx order, stopping at the first match.
SET enable_sort = off AS $$
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
    IF cardinality(dispatch.agent_unavailability(a, c)) > 0 THEN
        RETURN;
    END IF;
    a.capabilities := caps;     -- what the agent asks for now decides what it may take
    PERFORM dispatch.fn_enter();
    -- An agent that already failed a task gets it again only when nothing else fits.
    FOR pass IN 1..2 LOOP
        SELECT * INTO t FROM dispatch.tasks tk
        WHERE tk.status = 'pending' AND tk.available_at <= p_now
          AND cardinality(dispatch.agent_ineligibility(a, tk, c, false)) = 0
          AND (pass = 2) = (p_agent_id = ANY (tk.previous_agents))
        ORDER BY tk.priority DESC, tk.created_at
        LIMIT 1
        FOR UPDATE SKIP LOCKED;
        EXIT WHEN FOUND;
    END LOOP;
    IF t.task_id IS NOT NULL THEN
        RETURN NEXT dispatch.task_give(t, a, dispatch.task_score(a, t), 'claim', p_now);
    END IF;
    PERFORM dispatch.fn_leave();
END
$$;

-- The assigner: take up to p_batch assignable pending rows (SKIP LOCKED) in priority order and give
-- each the best eligible agent. Candidate agents are locked once, in agent_id order
-- with SKIP LOCKED, so replicas never deadlock and never push an agent over its limit; active_count
-- rises as the loop assigns, so the limit holds inside the batch too.
CREATE FUNCTION dispatch.task_assign(p_batch integer DEFAULT 100, p_now timestamptz DEFAULT now())
RETURNS TABLE (task_id uuid, agent_id text, score real, wake boolean, waited float8)
LANGUAGE plpgsql
-- The pending rows must be walked in tasks_pending_order_idx order, stopping at p_batch.
SET enable_sort = off AS $$
DECLARE
    c      dispatch.config;
    locked text[];
    t      dispatch.tasks;
    a      dispatch.agents;
BEGIN
    SELECT * INTO c FROM dispatch.config;
    locked := ARRAY(
        SELECT ag.agent_id FROM dispatch.agents ag
        WHERE cardinality(dispatch.agent_unavailability(ag, c)) = 0
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
                AND cardinality(dispatch.agent_ineligibility(ag, tk, c, false)) = 0)
        ORDER BY tk.priority DESC, tk.created_at
        LIMIT p_batch
        FOR UPDATE OF tk SKIP LOCKED
    LOOP
        SELECT * INTO a FROM dispatch.agents ag
        WHERE ag.agent_id = ANY (locked)
          AND cardinality(dispatch.agent_ineligibility(ag, t, c)) = 0
        ORDER BY ag.agent_id = ANY (t.previous_agents),
                 dispatch.availability(ag.status) DESC,
                 ag.active_count,
                 ag.last_assigned_at NULLS FIRST,
                 ag.agent_id
        LIMIT 1;
        CONTINUE WHEN NOT FOUND;
        task_id := t.task_id;
        agent_id := a.agent_id;
        score := dispatch.task_score(a, t);
        wake := a.status = 'sleeping';
        waited := greatest(extract(epoch FROM p_now - greatest(t.created_at, t.available_at)), 0);
        PERFORM dispatch.task_give(t, a, score, 'push', p_now);
        RETURN NEXT;
    END LOOP;
    PERFORM dispatch.fn_leave();
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
              WHERE cardinality(dispatch.agent_ineligibility(ag, tk, c, false)) = 0)
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

-- Every agent of the directory as a candidate for the task: the factors of its score, whether it is
-- eligible, and every reason it is not. Ordered as the assigner would choose (best first), the
-- excluded ones after, by agent id. A previous agent of the task is eligible only when no other
-- agent is.
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
    WITH r AS (
        SELECT ag, dispatch.agent_ineligibility(ag, t, c) AS base_reasons,
               ag.agent_id = ANY (t.previous_agents) AS prev
        FROM dispatch.agents ag
    ), e AS (
        SELECT r.*,
               cardinality(r.base_reasons) = 0 AS ok,
               bool_or(cardinality(r.base_reasons) = 0 AND NOT r.prev) OVER () AS others
        FROM r
    ), x AS (
        SELECT e.*, e.ok AND NOT (e.prev AND coalesce(e.others, false)) AS chosen FROM e
    )
    SELECT (x.ag).agent_id,
           x.chosen,
           CASE WHEN x.chosen THEN dispatch.task_score(x.ag, t) ELSE 0::real END,
           CASE WHEN cardinality(t.required_capabilities) = 0 THEN 1::real
                ELSE (1 - cardinality(dispatch.capabilities_missing((x.ag).capabilities,
                                                                    t.required_capabilities))::real
                          / cardinality(t.required_capabilities))::real
           END,
           dispatch.availability((x.ag).status),
           dispatch.priority_weight(t.priority),
           (x.ag).active_count, coalesce((x.ag).max_concurrent, c.max_concurrent_per_agent),
           (x.ag).status, (x.ag).drained, (x.ag).owner, x.prev,
           x.base_reasons
               || CASE WHEN x.ok AND x.prev AND coalesce(x.others, false)
                       THEN ARRAY['attempted this task before and another agent is eligible']
                       ELSE '{}'::text[] END
    FROM x
    ORDER BY x.chosen DESC,
             x.prev,
             dispatch.availability((x.ag).status) DESC,
             (x.ag).active_count,
             (x.ag).last_assigned_at NULLS FIRST,
             (x.ag).agent_id;
END
$$;
