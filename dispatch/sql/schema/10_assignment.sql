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

-- Why the agent takes no new work at all now (empty: it may), p_load being its active tasks
-- (NULL leaves its load out).
CREATE FUNCTION dispatch.agent_unavailability(
    a dispatch.agents, c dispatch.config, p_load integer DEFAULT NULL
) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT array_remove(ARRAY[
        CASE WHEN a.drained THEN 'drained' END,
        CASE WHEN a.status NOT IN ('ready', 'sleeping', 'busy') THEN 'status ' || a.status END,
        CASE WHEN p_load >= coalesce(a.max_concurrent, c.max_concurrent_per_agent)
             THEN format('at its limit (%s of %s tasks active)', p_load,
                         coalesce(a.max_concurrent, c.max_concurrent_per_agent)) END
    ], NULL)
$$;

-- Every reason the agent may not take a task that requires p_required and belongs to p_owner (empty:
-- eligible): unavailable, capabilities not a superset of the requirement, or, when the task has an
-- owner and the owner filter is on, not the owner's. A previous agent of the task is eligible;
-- callers prefer the others.
CREATE FUNCTION dispatch.agent_ineligibility(
    a dispatch.agents, p_required text[], p_owner text, c dispatch.config,
    p_load integer DEFAULT NULL
) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT dispatch.agent_unavailability(a, c, p_load) || array_remove(ARRAY[
        CASE WHEN NOT a.capabilities @> p_required
             THEN 'missing capabilities: ' || array_to_string(
                 dispatch.capabilities_missing(a.capabilities, p_required), ', ') END,
        CASE WHEN c.owner_filter_enabled AND p_owner IS NOT NULL
                  AND NOT dispatch.agent_belongs(a.agent_id, a.owner, p_owner)
             THEN dispatch.agent_owner_reason(a.agent_id, a.owner, p_owner) END
    ], NULL)
$$;

-- The walk of the pending queue that the claim, the assigner and the unmatched report share: the
-- pending, available rows in queue order (effective priority, then place in line:
-- 06_queue_order.sql), fetched one at a time through a cursor. A cursor is planned for its first
-- rows, so its natural plan reads tasks_pending_order_idx in order and stops when the caller
-- stops fetching: O(rows looked at), whatever the statistics say. (A single statement with the
-- eligibility rule in its WHERE and a LIMIT invites the planner, whenever its statistics
-- undercount the pending rows, to read all of them and sort.) Rows are not locked by the walk;
-- the caller locks the one it takes, SKIP LOCKED.
-- p_capabilities and p_owners, when given, leave out in the walk's own scan the rows that no
-- agent the caller has in mind could take: those requiring a capability outside p_capabilities,
-- and those with an owner outside p_owners (for the owner filter). A backlog that no agent can
-- take (its capability's agents all gone, or full) then costs a claim or a round well under a
-- microsecond a row, where each row fetched and refused one at a time cost it 50-180 us.
CREATE FUNCTION dispatch.pending_queue(
    p_now timestamptz, p_capabilities text[] DEFAULT NULL, p_owners text[] DEFAULT NULL
) RETURNS TABLE (task_id uuid, required_capabilities text[], owner text, previous_agents text[],
                 concurrency_key text, rate_key text, cost integer)
LANGUAGE sql STABLE AS $$
    SELECT tk.task_id, tk.required_capabilities, tk.owner, tk.previous_agents,
           tk.concurrency_key, tk.rate_key, tk.cost
    FROM dispatch.tasks tk
    WHERE tk.status = 'pending' AND NOT tk.parked AND tk.available_at <= p_now
      AND (p_capabilities IS NULL OR tk.required_capabilities <@ p_capabilities)
      AND (p_owners IS NULL OR tk.owner IS NULL OR tk.owner = ANY (p_owners))
    ORDER BY tk.queue_priority DESC, tk.queue_at
$$;

-- Every owner an agent of p_agents belongs to (its registry owner, its Alexandria devices'), for
-- pending_queue's p_owners; NULL while the owner filter is off (every owner passes).
CREATE FUNCTION dispatch.agents_owners(p_agents dispatch.agents[], c dispatch.config)
RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT c.owner_filter_enabled THEN
        RETURN NULL;
    END IF;
    RETURN ARRAY(SELECT x.owner FROM unnest(p_agents) x WHERE x.owner IS NOT NULL
                 UNION
                 SELECT o.owner FROM dispatch.agent_owners o
                 WHERE o.agent_id = ANY (ARRAY(SELECT x.agent_id FROM unnest(p_agents) x)));
END
$$;

-- A claim notes on its agent's row that the agent was seen now (an agent unknown, stopped or
-- sleeping is ready again: it claims) and when it last got work. The status is decided against
-- the row as it is when written, not as the claim read it: a claim reads the agent FOR KEY SHARE,
-- which does not hold off a heartbeat, and an agent that said `degraded` (shutting down) while
-- its claim was under way stays out of the assigner's choices. Not every claim writes: only when
-- the row says something else or was written over a second ago, and never by waiting (a row
-- another transaction is writing is left to it), so the claims of one agent do not queue on its
-- row. (plpgsql: it keeps the statement's plan, where a SQL function would set up its executor
-- anew at each call, about 80 us.)
CREATE FUNCTION dispatch.agent_note(a dispatch.agents, p_now timestamptz, p_given integer)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE dispatch.agents ag
    SET last_seen_at = p_now,
        status = CASE WHEN ag.status IN ('unknown', 'stopped', 'sleeping')
                      THEN 'ready'::dispatch.agent_status ELSE ag.status END,
        last_assigned_at = CASE WHEN p_given > 0 THEN p_now ELSE ag.last_assigned_at END
    WHERE ag.agent_id = (SELECT x.agent_id FROM dispatch.agents x
                         WHERE x.agent_id = a.agent_id
                           AND (x.status IN ('unknown', 'stopped', 'sleeping')
                                OR x.last_seen_at < p_now - interval '1 second'
                                OR p_given > 0 AND x.last_assigned_at IS NULL
                                OR p_given > 0 AND x.last_assigned_at < p_now - interval '1 second')
                         FOR NO KEY UPDATE SKIP LOCKED);
END
$$;

-- A task's next lease: random in 1 .. 2^31-1 and never its previous one. Not a counter: a
-- counter rewinds with the WAL a failover loses (an async standby promoted 2 s behind hands out
-- lease 1 again, and the agent holding the lost timeline's lease 1 would pass the fence next to
-- the new holder). A random token from the lost timeline matches the new one with odds 1 in 2^31.
-- Leases are only ever compared for equality (task_fence), never ordered.
-- One draw k from 2^31-2 values, counted on from the previous lease around 1 .. 2^31-1: every
-- value but the previous one, uniformly. One expression using each argument once, so the planner
-- inlines it into the assignment's UPDATE (no function call per assignment).
CREATE FUNCTION dispatch.lease_next(p_previous integer) RETURNS integer
LANGUAGE sql VOLATILE AS $$
    SELECT ((p_previous::bigint + floor(random() * 2147483646)::bigint) % 2147483647 + 1)::integer
$$;

-- Moves locked pending tasks to their agents: p_tasks[i] to p_agents[i], into the slot p_slots[i]
-- the caller took for it (the assigner, the pull claim and a signal's resume share it; c is the
-- config row the caller already read; the caller marks the transaction with fn_enter). Each task
-- is one UPDATE by its key (a join of the batch to the table would be planned as a scan of it
-- whenever the statistics undercount it); their events, assigned (and started, with p_start: a
-- claim that starts what it takes writes pending -> running at once), are one INSERT for the
-- batch, in the order given. A call per task and a statement per event cost a claim of ten about
-- a sixth of its backend CPU. Returns the tasks as written, in the order given. A push wakes the
-- claims its agents have waiting on the server (channel dispatch_assigned, payload: the agent).
-- When an attempt's first deadline comes before the reapers' next tick, the earliest one is told
-- to the reapers of every replica (channel dispatch_due, payload: its epoch): a reaper sleeping
-- past it wakes, and looks for the next itself.
CREATE FUNCTION dispatch.tasks_give(
    p_tasks dispatch.tasks[], p_agents dispatch.agents[], p_slots integer[], c dispatch.config,
    p_mode text, p_now timestamptz, p_start boolean DEFAULT false, p_key text DEFAULT NULL
) RETURNS dispatch.tasks[]
LANGUAGE plpgsql AS $$
DECLARE
    r     dispatch.tasks;
    given dispatch.tasks[] := '{}';
    first timestamptz;
BEGIN
    FOR i IN 1 .. cardinality(p_tasks) LOOP
        UPDATE dispatch.tasks
        SET status = CASE WHEN p_start THEN 'running' ELSE 'assigned' END::dispatch.task_status,
            assigned_agent = (p_agents[i]).agent_id, slot = p_slots[i], assigned_at = p_now,
            pushed = p_mode <> 'claim', claim_key = p_key,
            lease = dispatch.lease_next(lease),
            deadline_at = p_now + make_interval(secs => timeout_seconds),
            wake_deadline_at = CASE WHEN (p_agents[i]).status = 'sleeping' AND NOT p_start
                                    THEN p_now + make_interval(secs => c.wake_timeout_ms / 1000.0)
                               END,
            started_at = CASE WHEN p_start THEN p_now END,
            last_progress_at = CASE WHEN p_start THEN p_now END,
            progress = NULL, updated_at = p_now
        WHERE task_id = (p_tasks[i]).task_id
        RETURNING * INTO r;
        IF NOT FOUND THEN  -- the caller holds its lock: never
            RAISE EXCEPTION 'task % to give is gone', (p_tasks[i]).task_id;
        END IF;
        given := given || r;
        first := least(first, r.deadline_at, r.wake_deadline_at,
                       p_now + make_interval(secs => r.heartbeat_seconds));
        IF p_mode <> 'claim' THEN
            PERFORM pg_notify('dispatch_assigned', r.assigned_agent);
        END IF;
    END LOOP;
    INSERT INTO dispatch.task_events (task_id, event, actor, payload, created_at)
    SELECT g.task_id, e.event, e.actor, e.payload, p_now
    FROM unnest(given) WITH ORDINALITY AS g
    CROSS JOIN LATERAL (VALUES
        (1, 'assigned',
         CASE WHEN p_mode = 'claim' THEN g.assigned_agent ELSE 'dispatch' END,
         jsonb_build_object('assigned_agent', g.assigned_agent,
                            'score', dispatch.task_score(p_agents[g.ordinality],
                                                         p_tasks[g.ordinality]),
                            'attempt', g.retry_count + 1, 'lease', g.lease, 'slot', g.slot,
                            'mode', p_mode,
                            'wake', (p_agents[g.ordinality]).status = 'sleeping'
                                    AND NOT p_start)),
        (2, 'started', g.assigned_agent, jsonb_build_object('assigned_agent', g.assigned_agent))
    ) AS e (k, event, actor, payload)
    WHERE e.k = 1 OR p_start
    ORDER BY g.ordinality, e.k;
    -- Only a relay or an open dashboard listens (dispatch.event_write).
    IF cardinality(given) > 0
       AND (SELECT c2.events_notify OR c2.ui_notify_until > now() FROM dispatch.config c2) THEN
        PERFORM pg_notify('dispatch_events', '');
    END IF;
    IF first < p_now + make_interval(secs => c.tick_interval_ms / 1000.0) THEN
        PERFORM pg_notify('dispatch_due', extract(epoch FROM first)::text);
    END IF;
    RETURN given;
END
$$;

-- Pull mode: assign the calling agent the best pending tasks it is eligible for, up to p_max and
-- the room under its limit, or nothing. With p_start they are started in the same transaction
-- (claim-and-start: one round trip instead of two). The agent must be registered (an unknown id
-- is refused: a claim is not a registration). p_capabilities, when given, narrows what the agent
-- takes now to those of its registered capabilities; it never widens them. Flow control: tasks
-- whose concurrency key or rate key holds them back are passed over, and flow_grant decides on
-- the tasks taken, under its locks. p_key (the request's Idempotency-Key): a claim sent again
-- with the same key, its first answer lost on the way (a dropped connection, a replica killed),
-- returns the tasks the first one took that the agent still holds, and takes nothing more; the
-- first one's tasks would otherwise wait for their timeout, the agent never having heard of them.
CREATE FUNCTION dispatch.task_claim(
    p_agent_id text, p_capabilities text[] DEFAULT NULL, p_now timestamptz DEFAULT now(),
    p_max integer DEFAULT 1, p_start boolean DEFAULT false, p_key text DEFAULT NULL
) RETURNS SETOF dispatch.tasks
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    c     dispatch.config;
    a     dispatch.agents;
    owners text[];           -- every owner the agent belongs to (NULL: owner filter off)
    walk NO SCROLL CURSOR FOR
        SELECT * FROM dispatch.pending_queue(p_now, a.capabilities, owners);
    t     dispatch.tasks;
    cand  record;
    room  integer;
    own   integer := 0;      -- the agent's own tasks returned first
    taken dispatch.tasks[] := '{}';
    again uuid[] := '{}';  -- tasks this agent attempted before: taken only when nothing else fits
    keyed boolean := false;  -- some task taken has flow keys
    plan  dispatch.flow_state;  -- the flow limits as the walk sees them, with what it took
    ok    boolean[];         -- flow_grant's verdict on each task taken (NULL: no flow keys)
    later timestamptz;       -- flow_grant's: when a rate limit that held one back refills
    refill timestamptz;      -- when a rate limit that held a task back will have refilled
    fits  text[];            -- the keys and cost the plan last admitted, nothing taken since:
                             -- a task with the same ones (the next in a busy key's line) fits too
    ckeys text[] := '{}';    -- the flow fields of the tasks taken, for flow_grant
    rkeys text[] := '{}';
    costs integer[] := '{}';
    park  uuid[] := '{}';    -- tasks passed over because their concurrency key is at its cap
    slots integer[];         -- the agent's slots this claim took for new tasks
    given integer := 0;      -- new tasks given
BEGIN
    IF p_max IS NULL OR p_max NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'max_tasks must be between 1 and 100 (got %)', p_max
            USING ERRCODE = 'UD400', COLUMN = 'max_tasks';
    END IF;
    SELECT * INTO c FROM dispatch.config;
    -- Shared with the agent's other claims and the assigner (its slots keep them apart), exclusive
    -- of whoever changes what it may take (drain, registration, removal).
    SELECT * INTO a FROM dispatch.agents ag WHERE ag.agent_id = p_agent_id
    FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % is not registered: register it first (PUT /api/v1/agents/%, or dispatch.agent_upsert)',
            p_agent_id, p_agent_id USING ERRCODE = 'UD404';
    END IF;
    IF p_key IS NOT NULL THEN
        -- The first claim under this key may still be running, its answer lost with the server
        -- that ran it (killed mid-request): its transaction ends all the same, committed or not.
        -- Wait for it, so that this one sees what it took (each statement here reads anew) and
        -- does not take other tasks while the first one's stay with an agent that never heard.
        PERFORM pg_advisory_xact_lock(hashtextextended(p_key, hashtext(p_agent_id)));
        FOR t IN
            SELECT tk.* FROM dispatch.tasks tk
            WHERE tk.assigned_agent = p_agent_id AND tk.status IN ('assigned', 'running')
              AND tk.claim_key = p_key
            ORDER BY tk.assigned_at, tk.queue_priority DESC, tk.queue_at
        LOOP
            own := own + 1;
            RETURN NEXT t;
        END LOOP;
        IF own > 0 THEN
            RETURN;
        END IF;
    END IF;
    -- Its own tasks first: those the assigner gave it that it has not started, oldest first
    -- (not those a claim already handed it: it has them). They hold their slots already, so an
    -- agent that only claims never waits behind a task pushed to it, even when it is full.
    FOR t IN
        SELECT tk.* FROM dispatch.tasks tk
        WHERE tk.assigned_agent = p_agent_id AND tk.status = 'assigned'
          AND tk.pushed
        ORDER BY tk.assigned_at, tk.queue_priority DESC, tk.queue_at  -- a round's: queue order
        LIMIT p_max
        FOR NO KEY UPDATE OF tk SKIP LOCKED
    LOOP
        IF p_start THEN  -- under the claim's key: a retry of this claim answers it too
            t := dispatch.task_start(t.task_id, p_agent_id, p_now, p_claim_key => p_key);
        END IF;
        own := own + 1;
        RETURN NEXT t;
    END LOOP;
    a.status := CASE WHEN a.status IN ('unknown', 'stopped', 'sleeping')
                     THEN 'ready'::dispatch.agent_status ELSE a.status END;
    IF own = p_max OR cardinality(dispatch.agent_unavailability(a, c)) > 0 THEN
        PERFORM dispatch.agent_note(a, p_now, 0);
        RETURN;
    END IF;
    slots := dispatch.slots_take(p_agent_id, p_max - own,
                                 coalesce(a.max_concurrent, c.max_concurrent_per_agent));
    room := cardinality(slots);
    IF room = 0 THEN
        PERFORM dispatch.agent_note(a, p_now, 0);
        RETURN;
    END IF;
    IF c.aging_ms > 0 AND dispatch.queue_aging_due(p_now) THEN
        PERFORM dispatch.queue_age(p_now, 10);
    END IF;
    IF p_capabilities IS NOT NULL THEN
        a.capabilities := ARRAY(
            SELECT x FROM unnest(dispatch.normalize_capabilities(p_capabilities)) x
            WHERE x = ANY (a.capabilities));
    END IF;
    owners := dispatch.agents_owners(ARRAY[a], c);
    OPEN walk;
    WHILE cardinality(taken) < room LOOP
        FETCH walk INTO cand;
        EXIT WHEN NOT FOUND;
        CONTINUE WHEN cardinality(dispatch.agent_ineligibility(
            a, cand.required_capabilities, cand.owner, c)) > 0;
        IF p_agent_id = ANY (cand.previous_agents) THEN
            again := again || cand.task_id;
            CONTINUE;
        END IF;
        IF (cand.concurrency_key IS NOT NULL OR cand.rate_key IS NOT NULL)
           AND fits IS DISTINCT FROM ARRAY[cand.concurrency_key, cand.rate_key, cand.cost::text]
        THEN
            plan := dispatch.flow_admit(plan, cand.concurrency_key, cand.rate_key, cand.cost,
                                        p_now, false);
            IF plan.reason IS NOT NULL THEN
                refill := least(refill, plan.until);
                IF plan.capped AND cardinality(park) < 1000 THEN
                    park := park || cand.task_id;
                END IF;
                CONTINUE;
            END IF;
            fits := ARRAY[cand.concurrency_key, cand.rate_key, cand.cost::text];
        END IF;
        -- By its primary key: the status is compared as text so that no partial index of
        -- pending rows matches the WHERE. Otherwise a session that planned this while the
        -- table held a task or two keeps a plan that scans such an index for the id, reading
        -- the line up to the task at each lock (tasks_pending_tenant_idx, where a priority-5 task
        -- comes after every priority-0 one of its tenant).
        SELECT * INTO t FROM dispatch.tasks tk
        WHERE tk.task_id = cand.task_id AND tk.status::text = 'pending'
        FOR NO KEY UPDATE SKIP LOCKED;
        IF FOUND THEN
            taken := taken || t;
            ckeys := ckeys || t.concurrency_key;
            rkeys := rkeys || t.rate_key;
            costs := costs || t.cost;
            IF t.concurrency_key IS NOT NULL OR t.rate_key IS NOT NULL THEN
                keyed := true;
                fits := NULL;
                IF cardinality(taken) < room THEN  -- counted for the tasks still to come
                    plan := dispatch.flow_admit(plan, t.concurrency_key, t.rate_key, t.cost,
                                                p_now, true);
                END IF;
            END IF;
        END IF;
    END LOOP;
    CLOSE walk;
    IF cardinality(taken) < room AND cardinality(again) > 0 THEN
        taken := taken || ARRAY(
            SELECT tk FROM dispatch.tasks tk
            WHERE tk.task_id = ANY (again) AND tk.status::text = 'pending'  -- by key, as above
            ORDER BY array_position(again, tk.task_id)
            LIMIT room - cardinality(taken)
            FOR NO KEY UPDATE SKIP LOCKED);
        ckeys := ARRAY(SELECT x.concurrency_key FROM unnest(taken) x);
        rkeys := ARRAY(SELECT x.rate_key FROM unnest(taken) x);
        costs := ARRAY(SELECT x.cost FROM unnest(taken) x);
        keyed := keyed OR EXISTS (SELECT 1 FROM unnest(taken) x
                                  WHERE x.concurrency_key IS NOT NULL OR x.rate_key IS NOT NULL);
    END IF;
    IF keyed THEN
        SELECT f.admitted, f.until INTO ok, later
        FROM dispatch.flow_grant(plan, ckeys, rkeys, costs, p_now) f;
        refill := least(refill, later);
    END IF;
    IF ok IS NOT NULL THEN  -- those flow_grant held back stay pending
        taken := ARRAY(SELECT taken[i] FROM generate_subscripts(taken, 1) i
                       WHERE ok[i] IS NOT FALSE ORDER BY i);
    END IF;
    given := cardinality(taken);
    IF given > 0 THEN
        PERFORM dispatch.fn_enter();
        FOREACH t IN ARRAY dispatch.tasks_give(taken, array_fill(a, ARRAY[given]),
                                               slots[1:given], c, 'claim', p_now, p_start,
                                               p_key) LOOP
            RETURN NEXT t;
        END LOOP;
        PERFORM dispatch.fn_leave();
    END IF;
    PERFORM dispatch.agent_note(a, p_now, given);
    IF refill IS NOT NULL THEN
        PERFORM dispatch.flow_wake(refill);
    END IF;
    IF cardinality(park) > 0 THEN
        PERFORM dispatch.flow_park(park);
    END IF;
END
$$;

-- The claim a report asks for (its `next`), inside the report's statement: in a subtransaction, so
-- that should it fail the reports still stand and its error comes back instead of tasks. Rows:
-- ('next', each claimed task, whether this claim assigned it), or one ('error', its message).
-- p_announce false: when it takes nothing, the caller announces the slot the report freed by
-- waking an assigner itself (as dispatch.announce_by_caller), instead of a NOTIFY.
CREATE FUNCTION dispatch.task_claim_next(
    p_agent_id text, p_max integer, p_start boolean, p_now timestamptz,
    p_announce boolean DEFAULT true
) RETURNS TABLE (part text, task jsonb, fresh boolean, error text)
LANGUAGE plpgsql AS $$
DECLARE
    claimed dispatch.tasks[];
    t       dispatch.tasks;
    -- The agent whose slot the report before freed, leaving its announcement to this claim.
    promised text := nullif(current_setting('dispatch.refill', true), '');
BEGIN
    IF promised IS NOT NULL THEN  -- what the claim frees itself is announced as usual
        PERFORM set_config('dispatch.refill', '', true);
    END IF;
    BEGIN
        claimed := ARRAY(SELECT c FROM dispatch.task_claim(p_agent_id, NULL, p_now, p_max,
                                                          p_start) c);
    EXCEPTION WHEN OTHERS THEN
        claimed := '{}';
        GET STACKED DIAGNOSTICS error = MESSAGE_TEXT;
    END;
    -- The slots stay free unless this agent's claim took as many tasks as it asked for (one for
    -- each slot the reports before freed, or more): announced.
    IF promised IS NOT NULL
       AND (promised <> p_agent_id
            OR ((cardinality(claimed) = 0 OR cardinality(claimed) < p_max) AND p_announce)) THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    IF error IS NOT NULL THEN
        part := 'error';
        RETURN NEXT;
        RETURN;
    END IF;
    FOREACH t IN ARRAY claimed LOOP
        part := 'next';
        task := to_jsonb(t);
        fresh := t.assigned_at = p_now;
        RETURN NEXT;
    END LOOP;
END
$$;

-- A report and the agent's claim of its next tasks in one statement, so that a busy agent's
-- request is one round trip: p_done is the task as the report's own function left it (called as
-- this function's argument, so it has run before the claim begins, and its error fails the whole
-- statement). Rows: ('done', the reported task), then dispatch.task_claim_next's (p_announce
-- passed on).
CREATE FUNCTION dispatch.task_then_claim(
    p_done dispatch.tasks, p_agent_id text, p_max integer, p_start boolean, p_now timestamptz,
    p_announce boolean DEFAULT true
) RETURNS TABLE (part text, task jsonb, fresh boolean, error text)
LANGUAGE plpgsql AS $$
BEGIN
    part := 'done';
    task := to_jsonb(p_done);
    RETURN NEXT;
    RETURN QUERY SELECT * FROM dispatch.task_claim_next(p_agent_id, p_max, p_start, p_now,
                                                        p_announce);
END
$$;

-- Several reports of one agent (dispatch.task_report_batch) and, when the one at p_then (its
-- ordinal) was applied, the agent's claim of its next tasks, in one statement. Rows: the batch's,
-- with part 'report', then dispatch.task_claim_next's (ord NULL). The slots its completions and
-- failures free are announced by that claim, and only when it takes fewer tasks than it asks
-- for; when no claim follows, here.
CREATE FUNCTION dispatch.task_report_batch_then_claim(
    p_agent_id text, p_reports jsonb, p_admin boolean, p_now timestamptz,
    p_then integer, p_max integer, p_start boolean
) RETURNS TABLE (ord integer, status integer, error text, field text, task jsonb, part text,
                 fresh boolean)
LANGUAGE plpgsql AS $$
DECLARE
    applied boolean := false;
BEGIN
    FOR ord, status, error, field, task IN
        SELECT * FROM dispatch.task_report_batch(p_agent_id, p_reports, p_admin, p_now, true) b
        ORDER BY b.ord
    LOOP
        part := 'report';
        applied := applied OR (ord = p_then AND status = 200);
        RETURN NEXT;
    END LOOP;
    IF NOT applied THEN
        IF current_setting('dispatch.refill', true) = p_agent_id THEN
            PERFORM dispatch.refill_promise(p_agent_id, false);
            PERFORM pg_notify('dispatch_work', '');
        END IF;
    ELSE
        RETURN QUERY SELECT NULL::integer, NULL::integer, n.error, NULL::text, n.task, n.part,
                            n.fresh
                     FROM dispatch.task_claim_next(p_agent_id, p_max, p_start, p_now) n;
    END IF;
END
$$;

-- The assigner, in two steps. Plan: walk the pending queue and pick each task's best eligible
-- agent from an unlocked snapshot of the agents that have room, with their loads counted now
-- (counting the plan's own picks against their room), locking each picked task (SKIP LOCKED: a
-- claim or another replica has the others). Apply: for each picked agent, in agent_id order, take
-- its row's key-share lock (shared with its claims, exclusive of a drain or a change of what it
-- may take), check it again as it is now, and take free slots for its picks
-- (dispatch.slots_take): each pick with a slot is given, one without stays pending. Claims of the
-- picked agents never wait for a round, nor a round for them: they take different slots.
-- Flow control: the plan passes over tasks whose concurrency key or rate key holds them back
-- (counting its own picks); the apply step, once every pick has its slot, has flow_grant decide
-- on the tasks with flow keys before it gives anything.
-- `more` (the same on every row): whether another round now may give more: the plan stopped at
-- the batch size, or a pick was not given (its agent filled up meanwhile, or changed). False when
-- the walk reached the end of what it could give: the assigner then sleeps until it is woken,
-- without a round that would find nothing.
CREATE FUNCTION dispatch.task_assign(p_batch integer DEFAULT 100, p_now timestamptz DEFAULT now())
RETURNS TABLE (task_id uuid, agent_id text, score real, wake boolean, waited float8,
               capabilities text[], trace_context jsonb, more boolean)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    c     dispatch.config;
    free  dispatch.agents[];
    loads integer[];       -- the active tasks of each agent of free, with the plan's picks
    room  integer;
    caps  text[];          -- every capability of an agent of free
    owners text[];         -- every owner one of them belongs to (NULL: owner filter off)
    walk  NO SCROLL CURSOR FOR SELECT * FROM dispatch.pending_queue(p_now, caps, owners);
    cand  record;
    k     integer;
    a     dispatch.agents;
    held  dispatch.agents;
    t     dispatch.tasks;
    picks uuid[] := '{}';
    pickd text[] := '{}';  -- the agent of each pick
    id    text;
    slots integer[];
    used  integer;
    keyed boolean := false;  -- some pick has flow keys
    plan  dispatch.flow_state;  -- the flow limits as the walk sees them, with what it picked
    gives dispatch.tasks[] := '{}';   -- the picks that pass the check and have a slot
    givers dispatch.agents[] := '{}';  -- and their agents, as checked
    gslots integer[] := '{}';          -- and their slots
    ok    boolean[];         -- flow_grant's verdict on each of them (NULL: no flow keys)
    later timestamptz;       -- flow_grant's: when a rate limit that held one back refills
    refill timestamptz;      -- when a rate limit that held a task back will have refilled
    lost  boolean;           -- a pick not given (its slot held by a claim, or its agent changed)
    park  uuid[] := '{}';    -- tasks passed over because their concurrency key is at its cap
    given text[] := '{}';    -- the agent of each task given
    keep  integer[];         -- the gives flow_grant admitted
BEGIN
    SELECT * INTO c FROM dispatch.config;
    IF c.aging_ms > 0 AND dispatch.queue_aging_due(p_now) THEN
        PERFORM dispatch.queue_age(p_now, greatest(p_batch, 100));
    END IF;
    -- Nothing waiting (the last round of every wake-up): done before the agents are counted.
    -- (Through the walk itself, unfiltered: a cursor reads the order index for its first row,
    -- where an EXISTS may plan to read every pending row and sort them.)
    OPEN walk;
    FETCH walk INTO cand;
    CLOSE walk;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- (Each agent's count written out here, not as dispatch.agent_active: a SQL function with
    -- a FROM is not inlined, and its executor set up anew for every agent cost ~100 us each.)
    SELECT array_agg(a0 ORDER BY a0.agent_id), array_agg(l.n ORDER BY a0.agent_id)
    INTO free, loads
    FROM dispatch.agents a0
    CROSS JOIN LATERAL (SELECT count(*)::integer AS n FROM dispatch.tasks tk
                        WHERE tk.assigned_agent = a0.agent_id
                          AND tk.status IN ('assigned', 'running')) l
    WHERE cardinality(dispatch.agent_unavailability(a0, c, l.n)) = 0;
    SELECT sum(coalesce((free[i]).max_concurrent, c.max_concurrent_per_agent) - loads[i])
    INTO room FROM generate_subscripts(free, 1) i;
    room := least(coalesce(room, 0), p_batch);
    IF room <= 0 THEN
        -- Work is waiting and no agent has room for any of it: said to the caller's statement
        -- (the assigner's round reads it after this), which then leaves the wake-ups of new
        -- tasks alone until something frees room (every such change sends dispatch_work).
        PERFORM set_config('dispatch.assign_full', 'on', true);
        RETURN;
    END IF;
    caps := ARRAY(SELECT DISTINCT x FROM unnest(free) f, unnest(f.capabilities) x);
    owners := dispatch.agents_owners(free, c);
    OPEN walk;
    WHILE cardinality(picks) < room LOOP
        FETCH walk INTO cand;
        EXIT WHEN NOT FOUND;
        IF cand.concurrency_key IS NOT NULL OR cand.rate_key IS NOT NULL THEN
            plan := dispatch.flow_admit(plan, cand.concurrency_key, cand.rate_key, cand.cost,
                                        p_now, false);
            IF plan.reason IS NOT NULL THEN
                refill := least(refill, plan.until);
                IF plan.capped AND cardinality(park) < 1000 THEN
                    park := park || cand.task_id;
                END IF;
                CONTINUE;
            END IF;
        END IF;
        SELECT x.ordinality INTO k FROM unnest(free) WITH ORDINALITY x
        WHERE cardinality(dispatch.agent_ineligibility(
                  free[x.ordinality], cand.required_capabilities, cand.owner, c,
                  loads[x.ordinality])) = 0
        ORDER BY x.agent_id = ANY (cand.previous_agents),
                 dispatch.availability(x.status) DESC,
                 loads[x.ordinality],
                 x.last_assigned_at NULLS FIRST,
                 x.agent_id
        LIMIT 1;
        CONTINUE WHEN NOT FOUND;
        PERFORM 1 FROM dispatch.tasks tk  -- by key (the status as text: see task_claim)
        WHERE tk.task_id = cand.task_id AND tk.status::text = 'pending'
        FOR NO KEY UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        a := free[k];
        picks := picks || cand.task_id;
        pickd := pickd || a.agent_id;
        IF cand.concurrency_key IS NOT NULL OR cand.rate_key IS NOT NULL THEN
            keyed := true;
            plan := dispatch.flow_admit(plan, cand.concurrency_key, cand.rate_key, cand.cost,
                                        p_now, true);
        END IF;
        -- The pick counts against the agent's room in the snapshot, and spreads ties.
        loads[k] := loads[k] + 1;
        a.last_assigned_at := p_now;
        free[k] := a;
    END LOOP;
    CLOSE walk;
    FOR id IN SELECT DISTINCT x FROM unnest(pickd) x ORDER BY x LOOP
        SELECT * INTO held FROM dispatch.agents ag WHERE ag.agent_id = id FOR KEY SHARE;
        CONTINUE WHEN NOT FOUND;
        slots := dispatch.slots_take(id, array_length(array_positions(pickd, id), 1),
                                     coalesce(held.max_concurrent, c.max_concurrent_per_agent));
        used := 0;
        FOR i IN 1 .. cardinality(picks) LOOP
            EXIT WHEN used = cardinality(slots);
            CONTINUE WHEN pickd[i] <> id;
            SELECT * INTO t FROM dispatch.tasks tk WHERE tk.task_id = picks[i];
            CONTINUE WHEN cardinality(dispatch.agent_ineligibility(
                held, t.required_capabilities, t.owner, c)) > 0;
            used := used + 1;
            gives := gives || t;
            givers := givers || held;
            gslots := gslots || slots[used];
        END LOOP;
    END LOOP;
    IF keyed THEN
        SELECT f.admitted, f.until INTO ok, later
        FROM dispatch.flow_grant(plan, ARRAY(SELECT x.concurrency_key FROM unnest(gives) x),
                                 ARRAY(SELECT x.rate_key FROM unnest(gives) x),
                                 ARRAY(SELECT x.cost FROM unnest(gives) x), p_now) f;
        refill := least(refill, later);
    END IF;
    lost := cardinality(gives) < cardinality(picks);
    more := cardinality(picks) >= p_batch OR lost;
    -- Said to the caller's statement as well (the assigner's round reads it after this), for a
    -- round that gives nothing: a pick whose agent's free slot a claim of that agent held at
    -- that moment (dispatch.slots_take) was not given, and the claim, finding that task locked
    -- by this round, may have given nothing either. Once the claim has ended, another round
    -- can give it (Assigner.run_once); nothing else would announce it.
    IF lost THEN
        PERFORM set_config('dispatch.assign_lost', 'on', true);
    END IF;
    IF ok IS NOT NULL THEN  -- those flow_grant held back stay pending
        keep := ARRAY(SELECT i FROM generate_subscripts(gives, 1) i
                      WHERE ok[i] IS NOT FALSE ORDER BY i);
        gives := ARRAY(SELECT gives[i] FROM unnest(keep) WITH ORDINALITY k (i, n) ORDER BY n);
        givers := ARRAY(SELECT givers[i] FROM unnest(keep) WITH ORDINALITY k (i, n) ORDER BY n);
        gslots := ARRAY(SELECT gslots[i] FROM unnest(keep) WITH ORDINALITY k (i, n) ORDER BY n);
    END IF;
    IF cardinality(gives) > 0 THEN
        PERFORM dispatch.fn_enter();
        PERFORM dispatch.tasks_give(gives, givers, gslots, c, 'push', p_now);
        PERFORM dispatch.fn_leave();
    END IF;
    FOR i IN 1 .. cardinality(gives) LOOP
        t := gives[i];
        a := givers[i];
        task_id := t.task_id;
        agent_id := a.agent_id;
        score := dispatch.task_score(a, t);
        wake := a.status = 'sleeping';
        waited := greatest(extract(epoch FROM p_now - greatest(t.created_at, t.available_at)), 0);
        capabilities := t.required_capabilities;
        trace_context := t.trace_context;
        given := given || a.agent_id;
        RETURN NEXT;
    END LOOP;
    -- When the agents got work, for the next rounds' ties; an agent whose row is being written
    -- (by its claim) is left as it is rather than waited for.
    UPDATE dispatch.agents ag SET last_assigned_at = p_now
    WHERE ag.agent_id IN (SELECT x.agent_id FROM dispatch.agents x
                          WHERE x.agent_id = ANY (given)
                          ORDER BY x.agent_id
                          FOR NO KEY UPDATE SKIP LOCKED);
    IF refill IS NOT NULL THEN
        PERFORM dispatch.flow_wake(refill);
    END IF;
    IF cardinality(park) > 0 THEN
        PERFORM dispatch.flow_park(park);
    END IF;
END
$$;

-- Parking what no agent can take. A pending task that no agent of the directory could take,
-- whatever its status and load (none has the capabilities it requires or, with the owner filter
-- on, belongs to its owner), leaves the walk as a capped key's backlog does: the reaper's sweep
-- (task_park_unmatched) parks it with unmatched_at set, and claims and rounds behind such a
-- backlog read none of it. It comes back when an agent that could take it appears: a
-- registration, a capability or owner change, a device's owner (the triggers below, in the
-- transaction of the change), and otherwise at the next sweep, which first looks again at every
-- requirement parked (a change of the owner filter, or of a task's requirement by SQL).
-- A change and a sweep that run together are put in order by an advisory lock, shared by the
-- changes and taken alone by the sweep: a sweep parks only on a directory in which every change
-- that began before it has committed, and a change that began after it waits for it, then sees
-- what it parked.

-- The sweep and the report each look at a bounded number of pending rows per call (p_rows), in
-- queue order, resuming after the row where their last call stopped, and from the front again
-- once a call has reached the end: a backlog of any depth costs a tick O(p_rows), where a walk of
-- the whole line cost 1.5 us a row each (300 ms a tick at 100,000 pending, growing with it). A
-- line shorter than p_rows is walked whole every time, as before.
CREATE TABLE dispatch.unmatched_walks (
    walker         text PRIMARY KEY CHECK (walker IN ('park', 'report')),
    queue_priority integer NOT NULL,
    queue_at       timestamptz NOT NULL
);

-- Up to p_rows of the pending, available, unparked rows after (p_priority, p_at) in queue order
-- (NULL: from the front): two ranges of tasks_pending_order_idx, each read in its order and no
-- further than needed.
CREATE FUNCTION dispatch.pending_queue_after(
    p_now timestamptz, p_priority integer, p_at timestamptz, p_rows integer
) RETURNS TABLE (task_id uuid, required_capabilities text[], owner text,
                 queue_priority integer, queue_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    n integer := 0;
BEGIN
    IF p_priority IS NOT NULL THEN
        RETURN QUERY
            SELECT tk.task_id, tk.required_capabilities, tk.owner, tk.queue_priority, tk.queue_at
            FROM dispatch.tasks tk
            WHERE tk.status = 'pending' AND NOT tk.parked AND tk.available_at <= p_now
              AND tk.queue_priority = p_priority AND tk.queue_at > p_at
            ORDER BY tk.queue_at
            LIMIT p_rows;
        GET DIAGNOSTICS n = ROW_COUNT;
    END IF;
    RETURN QUERY
        SELECT tk.task_id, tk.required_capabilities, tk.owner, tk.queue_priority, tk.queue_at
        FROM dispatch.tasks tk
        WHERE tk.status = 'pending' AND NOT tk.parked AND tk.available_at <= p_now
          AND tk.queue_priority < coalesce(p_priority, 2147483647)
        ORDER BY tk.queue_priority DESC, tk.queue_at
        LIMIT p_rows - n;
END
$$;

-- Where the walker's last call stopped, and (p_done: it reached the end) that the next starts
-- from the front.
CREATE FUNCTION dispatch.unmatched_walk_save(
    p_walker text, p_done boolean, p_priority integer, p_at timestamptz
) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM dispatch.unmatched_walks w WHERE w.walker = p_walker AND p_done;
    INSERT INTO dispatch.unmatched_walks AS w (walker, queue_priority, queue_at)
    SELECT p_walker, p_priority, p_at WHERE NOT p_done
    ON CONFLICT (walker) DO UPDATE SET queue_priority = excluded.queue_priority,
                                       queue_at = excluded.queue_at
$$;

-- Could an agent of the directory (p_agent_id: that one) take a task that requires p_required
-- and belongs to p_owner, its status and load aside? The capability and owner rules of
-- agent_ineligibility.
CREATE FUNCTION dispatch.task_matchable(
    p_required text[], p_owner text, c dispatch.config, p_agent_id text DEFAULT NULL
) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM dispatch.agents a
        WHERE a.capabilities @> p_required
          AND (p_agent_id IS NULL OR a.agent_id = p_agent_id)
          AND (NOT c.owner_filter_enabled OR p_owner IS NULL
               OR dispatch.agent_belongs(a.agent_id, a.owner, p_owner)))
$$;

-- Each requirement that parked tasks have, once: one index probe per requirement.
CREATE FUNCTION dispatch.unmatched_requirements() RETURNS SETOF text[]
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE req AS (
        SELECT (SELECT min(tk.required_capabilities) FROM dispatch.tasks tk
                WHERE tk.status = 'pending' AND tk.unmatched_at IS NOT NULL) AS caps
        UNION ALL
        SELECT (SELECT min(tk.required_capabilities) FROM dispatch.tasks tk
                WHERE tk.status = 'pending' AND tk.unmatched_at IS NOT NULL
                  AND tk.required_capabilities > req.caps)
        FROM req WHERE req.caps IS NOT NULL
    )
    SELECT req.caps FROM req WHERE req.caps IS NOT NULL
$$;

-- Brings back to the walk, in their old place in line, the parked tasks that an agent could now
-- take; how many. A requirement that no agent has costs one index probe and reads none of its
-- tasks. For a change of p_agent_id it waits for a row another transaction holds; for the
-- sweep (NULL) it leaves that row to the next sweep.
CREATE FUNCTION dispatch.unmatched_unpark(p_agent_id text DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    c    dispatch.config;
    need text[];
    m    integer;
    n    integer := 0;
BEGIN
    SELECT * INTO c FROM dispatch.config;
    FOR need IN SELECT * FROM dispatch.unmatched_requirements() LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM dispatch.agents a
                                  WHERE a.capabilities @> need
                                    AND (p_agent_id IS NULL OR a.agent_id = p_agent_id));
        IF p_agent_id IS NULL THEN
            UPDATE dispatch.tasks tk SET parked = false, unmatched_at = NULL
            FROM (SELECT x.task_id FROM dispatch.tasks x
                  WHERE x.status = 'pending' AND x.unmatched_at IS NOT NULL
                    AND x.required_capabilities = need
                    AND dispatch.task_matchable(need, x.owner, c)
                  FOR NO KEY UPDATE SKIP LOCKED) b
            WHERE tk.task_id = b.task_id;
        ELSE
            UPDATE dispatch.tasks tk SET parked = false, unmatched_at = NULL
            WHERE tk.status = 'pending' AND tk.unmatched_at IS NOT NULL
              AND tk.required_capabilities = need
              AND dispatch.task_matchable(need, tk.owner, c, p_agent_id);
        END IF;
        GET DIAGNOSTICS m = ROW_COUNT;
        n := n + m;
    END LOOP;
    PERFORM pg_notify('dispatch_work', '') WHERE n > 0;
    RETURN n;
END
$$;

CREATE FUNCTION dispatch.agents_unpark() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('dispatch.task_park_unmatched'));
    PERFORM dispatch.unmatched_unpark(NEW.agent_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER agents_unpark_new AFTER INSERT ON dispatch.agents
    FOR EACH ROW EXECUTE FUNCTION dispatch.agents_unpark();

CREATE TRIGGER agents_unpark_changed AFTER UPDATE OF capabilities, owner ON dispatch.agents
    FOR EACH ROW WHEN (NEW.capabilities IS DISTINCT FROM OLD.capabilities
                       OR NEW.owner IS DISTINCT FROM OLD.owner)
    EXECUTE FUNCTION dispatch.agents_unpark();

CREATE TRIGGER agent_owners_unpark AFTER INSERT ON dispatch.agent_owners
    FOR EACH ROW EXECUTE FUNCTION dispatch.agents_unpark();

-- When the task was last reported `unmatched`, if it was not assigned since (else NULL).
CREATE FUNCTION dispatch.unmatched_reported_at(p_task_id uuid) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT prev.created_at
    FROM (SELECT e.event, e.created_at FROM dispatch.task_events e
          WHERE e.task_id = p_task_id AND e.event IN ('unmatched', 'assigned')
          ORDER BY e.id DESC LIMIT 1) prev
    WHERE prev.event = 'unmatched'
$$;

-- A task's `unmatched` event.
CREATE FUNCTION dispatch.unmatched_report(
    p_task_id uuid, p_required text[], p_owner text, p_now timestamptz
) RETURNS void
LANGUAGE sql AS $$
    SELECT dispatch.event_write(p_task_id, 'unmatched', 'dispatch',
        jsonb_build_object('required_capabilities', to_jsonb(p_required), 'owner', p_owner), p_now)
$$;

-- The reaper's sweep, once per tick, before the report: brings back the parked tasks an agent
-- could now take, then parks the pending, available tasks that no agent could take (their
-- `unmatched_at` '-infinity': the report has yet to report them); returns how many it parked.
-- The walk judges each requirement and owner once, however many tasks share them. Rows another
-- transaction holds (a claim taking one) are left in the walk. One sweep at a time in the whole
-- database, and none while a directory change is under way (the lock above): a sweep that finds
-- it taken returns 0, and the next tick parks.
CREATE FUNCTION dispatch.task_park_unmatched(
    p_now timestamptz DEFAULT now(), p_rows integer DEFAULT 20000
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    w      dispatch.unmatched_walks;
    seen   integer := 0;
    at_prio integer;         -- the place in line of the last row looked at
    at_time timestamptz;
    c      dispatch.config;
    cand   record;
    sig    text;
    nobody boolean;
    judged jsonb := '{}';  -- requirement and owner -> whether no agent could take them
    park   uuid[] := '{}';
    n      integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('dispatch.task_park_unmatched')) THEN
        RETURN 0;
    END IF;
    SELECT * INTO c FROM dispatch.config;
    PERFORM dispatch.unmatched_unpark();
    SELECT * INTO w FROM dispatch.unmatched_walks x WHERE x.walker = 'park';
    FOR cand IN
        SELECT * FROM dispatch.pending_queue_after(p_now, w.queue_priority, w.queue_at, p_rows)
    LOOP
        seen := seen + 1;
        at_prio := cand.queue_priority;
        at_time := cand.queue_at;
        sig := cand.required_capabilities::text || ' ' || coalesce(cand.owner, '');
        nobody := (judged ->> sig)::boolean;
        IF nobody IS NULL THEN
            nobody := NOT dispatch.task_matchable(cand.required_capabilities, cand.owner, c);
            judged := judged || jsonb_build_object(sig, nobody);
        END IF;
        IF nobody THEN
            park := park || cand.task_id;
        END IF;
    END LOOP;
    PERFORM dispatch.unmatched_walk_save('park', seen < p_rows, at_prio, at_time);
    IF cardinality(park) = 0 THEN
        RETURN 0;
    END IF;
    UPDATE dispatch.tasks tk SET parked = true, unmatched_at = '-infinity'
    FROM (SELECT x.task_id FROM dispatch.tasks x
          WHERE x.task_id = ANY (park) AND x.status::text = 'pending' AND NOT x.parked  -- by key
          FOR NO KEY UPDATE SKIP LOCKED) p
    WHERE tk.task_id = p.task_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Pending tasks that no agent in the directory could take now (capacity aside) get one
-- `unmatched` event, and another only after unmatched_repeat_ms: first those in the walk (their
-- agents stopped, drained or stale), found in their history, then the parked ones, the longest
-- unreported first (their unmatched_at). At most p_limit a call; returns how many.
-- The walk judges each requirement and owner once, however many tasks share them, and takes no
-- row lock on the tasks (the event's foreign key takes KEY SHARE, which a claim's NO KEY UPDATE
-- does not wait for or skip), so it never hides work from a claim. The price: an `unmatched`
-- event is advisory, written without the task's row lock, and may follow an assignment that raced
-- it. One report runs at a time in the whole database (every serve worker and replica runs the
-- reaper): a transaction-level advisory lock, tried without waiting; a report that finds it taken
-- returns 0, and the next one sees the events the other wrote.
CREATE FUNCTION dispatch.task_report_unmatched(
    p_now timestamptz DEFAULT now(), p_limit integer DEFAULT 100, p_rows integer DEFAULT 20000
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    w       dispatch.unmatched_walks;
    walk    NO SCROLL CURSOR FOR
        SELECT * FROM dispatch.pending_queue_after(p_now, w.queue_priority, w.queue_at, p_rows);
    seen    integer := 0;
    at_prio integer;         -- the place in line of the last row looked at
    at_time timestamptz;
    done    boolean := false;
    c       dispatch.config;
    repeat  interval;
    cand    record;
    sig     text;
    served  boolean;
    judged  jsonb := '{}';  -- requirement and owner -> whether an agent could take them now
    need    text[];
    last    timestamptz;
    n       integer := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('dispatch.task_report_unmatched')) THEN
        RETURN 0;
    END IF;
    SELECT * INTO c FROM dispatch.config;
    repeat := make_interval(secs => c.unmatched_repeat_ms / 1000.0);
    SELECT * INTO w FROM dispatch.unmatched_walks x WHERE x.walker = 'report';
    OPEN walk;
    WHILE n < p_limit LOOP
        FETCH walk INTO cand;
        IF NOT FOUND THEN
            done := seen < p_rows;  -- the end of the line, not of this call's share of it
            EXIT;
        END IF;
        seen := seen + 1;
        at_prio := cand.queue_priority;
        at_time := cand.queue_at;
        sig := cand.required_capabilities::text || ' ' || coalesce(cand.owner, '');
        served := (judged ->> sig)::boolean;
        IF served IS NULL THEN
            served := EXISTS (SELECT 1 FROM dispatch.agents ag
                              WHERE cardinality(dispatch.agent_ineligibility(
                                        ag, cand.required_capabilities, cand.owner, c)) = 0);
            judged := judged || jsonb_build_object(sig, served);
        END IF;
        CONTINUE WHEN served;
        -- Reported already, and not assigned since: again only after unmatched_repeat_ms.
        CONTINUE WHEN dispatch.unmatched_reported_at(cand.task_id) > p_now - repeat;
        PERFORM dispatch.unmatched_report(cand.task_id, cand.required_capabilities, cand.owner,
                                          p_now);
        n := n + 1;
    END LOOP;
    CLOSE walk;
    PERFORM dispatch.unmatched_walk_save('report', done OR seen = 0, at_prio, at_time);
    FOR need IN SELECT * FROM dispatch.unmatched_requirements() LOOP
        EXIT WHEN n >= p_limit;
        FOR cand IN
            SELECT x.task_id, x.required_capabilities, x.owner, x.unmatched_at
            FROM dispatch.tasks x
            WHERE x.status = 'pending' AND x.unmatched_at IS NOT NULL
              AND x.required_capabilities = need AND x.unmatched_at <= p_now - repeat
            ORDER BY x.unmatched_at
            LIMIT p_limit - n
            FOR NO KEY UPDATE SKIP LOCKED
        LOOP
            IF cand.unmatched_at = '-infinity' THEN
                -- Just parked: reported already while in the walk, and not assigned since?
                last := dispatch.unmatched_reported_at(cand.task_id);
                IF last > p_now - repeat THEN
                    UPDATE dispatch.tasks SET unmatched_at = last WHERE task_id = cand.task_id;
                    CONTINUE;
                END IF;
            END IF;
            PERFORM dispatch.unmatched_report(cand.task_id, cand.required_capabilities, cand.owner,
                                              p_now);
            UPDATE dispatch.tasks SET unmatched_at = p_now WHERE task_id = cand.task_id;
            n := n + 1;
        END LOOP;
    END LOOP;
    RETURN n;
END
$$;

-- Every agent of the directory as a candidate for the task: the factors of its score, whether it is
-- eligible, and every reason it is not. Ordered as the assigner would choose (best first), the
-- excluded ones after, by agent id. A previous agent of the task is eligible only when no other
-- agent is. The agent holding an assigned or running task comes first (`holder`), judged without
-- the task itself in its load: it is not "at its limit" because of the task it holds.
CREATE FUNCTION dispatch.task_explain(p_task_id uuid)
RETURNS TABLE (
    agent_id text, eligible boolean, score real, capability_match real, availability real,
    priority_weight real, active_tasks integer, max_concurrent integer,
    status dispatch.agent_status, drained boolean, owner text, previous_agent boolean,
    reasons text[], holder boolean
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
    WITH h AS (
        SELECT ag, n, ag.agent_id = t.assigned_agent AND t.status IN ('assigned', 'running')
                          AS holds
        FROM dispatch.agents ag, dispatch.agent_active(ag.agent_id) n
    ), r AS (
        SELECT ag, n, holds,
               dispatch.agent_ineligibility(ag, t.required_capabilities, t.owner, c,
                                            n - holds::integer) AS base_reasons,
               (ag).agent_id = ANY (t.previous_agents) AS prev
        FROM h
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
           x.n, coalesce((x.ag).max_concurrent, c.max_concurrent_per_agent),
           (x.ag).status, (x.ag).drained, (x.ag).owner, x.prev,
           x.base_reasons
               || CASE WHEN x.ok AND x.prev AND coalesce(x.others, false)
                       THEN ARRAY['attempted this task before and another agent is eligible']
                       ELSE '{}'::text[] END,
           x.holds
    FROM x
    ORDER BY x.holds DESC,
             x.chosen DESC,
             x.prev,
             dispatch.availability((x.ag).status) DESC,
             x.n,
             (x.ag).last_assigned_at NULLS FIRST,
             (x.ag).agent_id;
END
$$;
