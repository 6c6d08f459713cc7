-- Backoff for the attempt-th retry: retry_backoff_ms * 2^(attempt-1), capped, +-20 % jitter.
CREATE FUNCTION dispatch.retry_backoff(attempt integer) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT make_interval(secs =>
        least(c.retry_backoff_ms::float8 * power(2, greatest(attempt, 1) - 1),
              c.retry_backoff_max_ms::float8)
        * (0.8 + 0.4 * random()) / 1000.0)
    FROM dispatch.config c
$$;

---------------------------------------------------------------------------------------------------
-- Helpers shared by the transitions
---------------------------------------------------------------------------------------------------
CREATE FUNCTION dispatch.task_lock(p_task_id uuid) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks;
BEGIN
    -- NO KEY UPDATE: exclusive among transitions, yet it lets event rows (whose foreign key takes
    -- KEY SHARE) be written for the task meanwhile.
    SELECT * INTO t FROM dispatch.tasks WHERE task_id = p_task_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task % not found', p_task_id USING ERRCODE = 'UD404';
    END IF;
    RETURN t;
END
$$;

-- Fencing for agent reports: only the current assigned agent may report. An agent that held an
-- earlier attempt gets a conflict (its report is stale); anyone else is refused. A report that
-- names its lease (the assignment it was given) must name the current one: the same agent may have
-- been given the task again since, and its late report of the earlier attempt is stale too.
CREATE FUNCTION dispatch.task_fence(t dispatch.tasks, p_agent_id text, p_lease integer DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_lease IS NOT NULL AND p_lease <> t.lease THEN
        RAISE EXCEPTION 'lease % of task % is stale: the task is on lease % (status %, assigned to %)',
            p_lease, t.task_id, t.lease, t.status, coalesce(t.assigned_agent, 'nobody')
            USING ERRCODE = 'UD409';
    END IF;
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

-- Who may cancel, re-prioritise or resolve a task by hand. NULL-safe: a task without an owner is
-- its requester's (and an admin's) alone.
CREATE FUNCTION dispatch.task_is_resolver(t dispatch.tasks, p_actor text, p_admin boolean)
RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(p_admin, false)
        OR coalesce(p_actor = t.requester, false)
        OR coalesce(p_actor = t.owner, false)
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

-- Takes an active task away from its agent: pending at once, the agent added to previous_agents (its
-- late reports of this attempt are stale), retry_count raised by p_attempts (0 or 1). The caller
-- writes the event. Inside fn_enter.
CREATE FUNCTION dispatch.task_unassign(t dispatch.tasks, p_attempts integer, p_now timestamptz)
RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    r dispatch.tasks;
BEGIN
    UPDATE dispatch.tasks
    SET status = 'pending', retry_count = t.retry_count + p_attempts, available_at = p_now,
        previous_agents = CASE WHEN t.assigned_agent = ANY (t.previous_agents)
                               THEN t.previous_agents
                               ELSE t.previous_agents || t.assigned_agent END,
        assigned_agent = NULL, deadline_at = NULL, wake_deadline_at = NULL, updated_at = p_now
    WHERE task_id = t.task_id
    RETURNING * INTO r;
    PERFORM pg_notify('dispatch_work', '');
    RETURN r;
END
$$;

-- An active task its agent gives back unfinished (a release, or the agent stopping): no attempt
-- counted (retry_count and error unchanged: the work did not fail), event released.
CREATE FUNCTION dispatch.task_give_back(t dispatch.tasks, p_reason text, p_now timestamptz)
RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    r dispatch.tasks := dispatch.task_unassign(t, 0, p_now);
BEGIN
    PERFORM dispatch.event_write(t.task_id, 'released', t.assigned_agent,
        jsonb_build_object('previous_agent', t.assigned_agent, 'reason', p_reason,
                           'retry_count', r.retry_count), p_now);
    RETURN r;
END
$$;

-- Takes an active task away from its agent without blaming a failure on it (wake timeout). It
-- still counts as an attempt, so nothing bounces forever.
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
    r := dispatch.task_unassign(t, 1, p_now);
    PERFORM dispatch.event_write(t.task_id, 'reassigned', 'dispatch',
        jsonb_build_object('previous_agent', t.assigned_agent, 'reason', p_reason), p_now);
    RETURN r;
END
$$;

-- Creation: the one way a task row is made, by the API, NATS and psql (dispatch.create_task).
-- A repeated (requester, idempotency key) returns the task it made first, with created false.
-- Unset arguments take the column defaults' values; the requester defaults to the session's actor.
-- depends_on: the tasks it waits for (a JSON array of ids or {"task_id", "on_failure"} objects),
-- each visible to `viewer` (NULL: no visibility check); it is created blocked while any has yet to
-- complete. trace_context: the W3C trace context of the create (dispatch.tracing), NULL while
-- tracing is off. announce false: the caller wakes an assigner itself once the transaction has
-- committed, so no NOTIFY dispatch_work announces the new tasks of this transaction
-- (dispatch.announce_by_caller).
CREATE FUNCTION dispatch.task_create(
    title text,
    description text DEFAULT '',
    requester text DEFAULT NULL,
    owner text DEFAULT NULL,
    required_capabilities text[] DEFAULT '{}',
    priority integer DEFAULT 0,
    timeout_seconds integer DEFAULT NULL,
    heartbeat_seconds integer DEFAULT NULL,
    max_retries integer DEFAULT 3,
    metadata jsonb DEFAULT '{}',
    parent_task_id uuid DEFAULT NULL,
    available_at timestamptz DEFAULT NULL,
    source text DEFAULT 'sql',
    idempotency_key text DEFAULT NULL,
    concurrency_key text DEFAULT NULL,
    rate_key text DEFAULT NULL,
    cost integer DEFAULT 1,
    depends_on jsonb DEFAULT NULL,
    approval text DEFAULT NULL,
    viewer text DEFAULT NULL,
    trace_context jsonb DEFAULT NULL,
    announce boolean DEFAULT true,
    OUT task dispatch.tasks,
    OUT created boolean
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF NOT task_create.announce THEN
        PERFORM dispatch.announce_by_caller();
    END IF;
    INSERT INTO dispatch.tasks AS tk (title, description, requester, owner, required_capabilities,
                                      priority, timeout_seconds, heartbeat_seconds, max_retries,
                                      metadata, parent_task_id, available_at, source,
                                      idempotency_key, concurrency_key, rate_key, cost, approval,
                                      trace_context)
    VALUES (task_create.title, coalesce(task_create.description, ''), task_create.requester,
            task_create.owner, coalesce(task_create.required_capabilities, '{}'),
            coalesce(task_create.priority, 0), task_create.timeout_seconds,
            task_create.heartbeat_seconds, coalesce(task_create.max_retries, 3),
            coalesce(task_create.metadata, '{}'), task_create.parent_task_id,
            task_create.available_at, task_create.source, task_create.idempotency_key,
            task_create.concurrency_key, task_create.rate_key, task_create.cost,
            task_create.approval, task_create.trace_context)
    ON CONFLICT (requester, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING * INTO task;
    created := task.task_id IS NOT NULL;
    IF NOT created THEN
        SELECT * INTO task FROM dispatch.tasks tk
        WHERE tk.requester = coalesce(task_create.requester, dispatch.session_actor())
          AND tk.idempotency_key = task_create.idempotency_key;
    ELSIF task_create.depends_on IS NOT NULL AND task_create.depends_on <> '[]'::jsonb THEN
        -- The tasks it waits for (09_dependencies.sql), visible to `viewer` (NULL: any task);
        -- its approval is counted with them.
        PERFORM dispatch.fn_enter();
        task := dispatch.task_depend_attach(task, task_create.depends_on, task_create.viewer,
                                            task.created_at);
        PERFORM dispatch.fn_leave();
    ELSIF task.approval IN ('before_start', 'both') THEN
        -- Waits for its approval (18_gates.sql).
        PERFORM dispatch.fn_enter();
        UPDATE dispatch.tasks tk SET status = 'blocked', waiting_on = 1
        WHERE tk.task_id = task.task_id
        RETURNING * INTO task;
        PERFORM dispatch.event_write(task.task_id, 'blocked', task.requester,
            '{"waiting_for": [], "waiting_on": 1, "approval": true}', task.created_at);
        PERFORM dispatch.fn_leave();
    END IF;
END
$$;

-- p_claim_key: the Idempotency-Key of the claim that starts a task pushed to its agent, so that
-- the same claim sent again (its answer lost) answers this task too.
CREATE FUNCTION dispatch.task_start(
    p_task_id uuid, p_agent_id text, p_now timestamptz DEFAULT now(), p_lease integer DEFAULT NULL,
    p_claim_key text DEFAULT NULL
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks;
    checked boolean := false;
BEGIN
    -- The common case first, as in task_complete: the agent starts the task assigned to it (on
    -- the lease it names), and the lock, the fence and the status check are the UPDATE's WHERE.
    -- Otherwise the row is locked and checked (a repeat returns it, a refused start raises), and
    -- the second round's UPDATE starts it under that lock.
    PERFORM dispatch.fn_enter();
    LOOP
        UPDATE dispatch.tasks tk
        SET status = 'running', started_at = p_now, last_progress_at = p_now,
            wake_deadline_at = NULL, claim_key = coalesce(p_claim_key, tk.claim_key),
            updated_at = p_now
        WHERE tk.task_id = p_task_id
          AND (checked OR (tk.assigned_agent = p_agent_id AND tk.status = 'assigned'
                           AND (p_lease IS NULL OR tk.lease = p_lease)))
        RETURNING * INTO t;
        EXIT WHEN FOUND;
        t := dispatch.task_lock(p_task_id);
        PERFORM dispatch.task_fence(t, p_agent_id, p_lease);
        IF t.status = 'running' THEN
            PERFORM dispatch.fn_leave();
            RETURN t;   -- a repeated start changes nothing
        END IF;
        PERFORM dispatch.task_require_status(t, 'assigned');
        checked := true;
    END LOOP;
    PERFORM dispatch.event_write(p_task_id, 'started', p_agent_id,
        jsonb_build_object('assigned_agent', p_agent_id), p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

CREATE FUNCTION dispatch.task_progress(
    p_task_id uuid, p_agent_id text, p_percent float8 DEFAULT NULL, p_message text DEFAULT NULL,
    p_data jsonb DEFAULT NULL, p_now timestamptz DEFAULT now(), p_lease integer DEFAULT NULL
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks;
    p jsonb;
    checked boolean := false;
BEGIN
    IF p_percent IS NOT NULL AND NOT (p_percent BETWEEN 0 AND 100) THEN
        RAISE EXCEPTION 'percent must be between 0 and 100 (got %)', p_percent
            USING ERRCODE = 'UD400', COLUMN = 'percent';
    END IF;
    p := jsonb_strip_nulls(jsonb_build_object('percent', p_percent, 'message', p_message,
                                              'data', p_data));
    -- The common case first, as in task_start: a heartbeat of the running task from its agent
    -- (on the lease it names), the lock, the fence and the status check the UPDATE's WHERE.
    -- Otherwise the row is locked and checked (a refused report raises; a task still assigned is
    -- started first), and the second round's UPDATE writes the progress under that lock.
    PERFORM dispatch.fn_enter();
    LOOP
        -- Only unindexed columns change: a HOT update.
        UPDATE dispatch.tasks tk
        SET progress = p, last_progress_at = p_now, updated_at = p_now
        WHERE tk.task_id = p_task_id
          AND (checked OR (tk.assigned_agent = p_agent_id AND tk.status = 'running'
                           AND (p_lease IS NULL OR tk.lease = p_lease)))
        RETURNING * INTO t;
        EXIT WHEN FOUND;
        t := dispatch.task_lock(p_task_id);
        PERFORM dispatch.task_fence(t, p_agent_id, p_lease);
        PERFORM dispatch.task_require_status(t, 'assigned', 'running');
        IF t.status = 'assigned' THEN
            t := dispatch.task_start(p_task_id, p_agent_id, p_now);
            PERFORM dispatch.fn_enter();  -- task_start left it
        END IF;
        checked := true;
    END LOOP;
    PERFORM dispatch.event_write(p_task_id, 'progress', p_agent_id,
        jsonb_build_object('assigned_agent', p_agent_id, 'percent', p_percent,
                           'message', p_message, 'data', p_data), p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

-- Completion by the assigned agent, or manual resolution by the requester, the owner or an admin
-- (also of a task still pending; event `completed` with manual: true). An agent never completes a
-- task it does not hold. A repeated complete by the agent that completed it returns the task
-- unchanged. A manual resolution takes the task from its agent (it joins previous_agents), so the
-- agent's own complete after it is a conflict, not a repeat.
CREATE FUNCTION dispatch.task_complete(
    p_task_id uuid, p_actor text, p_result jsonb DEFAULT NULL, p_admin boolean DEFAULT false,
    p_now timestamptz DEFAULT now(), p_lease integer DEFAULT NULL, p_refill boolean DEFAULT false
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks;
    holder text;
    manual boolean;
BEGIN
    -- The common case first: the agent completes the task it holds (on the lease it names), and
    -- no review waits. The lock, the fence and the status check are the UPDATE's WHERE, which
    -- Postgres checks again on the row as it is once locked; every other case (a repeat, a
    -- manual resolution, a review, a stale or refused report) takes the path below. The row is
    -- found by its primary key: the status is compared as text so that no partial index of
    -- active rows matches (a session that planned this while the table was tiny read all of
    -- the agent's active rows through tasks_active_agent_idx at each completion).
    PERFORM dispatch.refill_promise(p_actor, p_refill);
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks tk
    SET status = 'completed', result = p_result, completed_at = p_now, updated_at = p_now,
        deadline_at = NULL, wake_deadline_at = NULL
    WHERE tk.task_id = p_task_id AND tk.assigned_agent = p_actor
      AND tk.status::text IN ('assigned', 'running') AND (p_lease IS NULL OR tk.lease = p_lease)
      AND (tk.approval IS NULL OR tk.approval NOT IN ('review', 'both'))
    RETURNING * INTO t;
    IF FOUND THEN
        PERFORM dispatch.event_write(p_task_id, 'completed', p_actor,
            jsonb_build_object('assigned_agent', p_actor, 'result', p_result), p_now);
        PERFORM dispatch.fn_leave();
        RETURN t;
    END IF;
    PERFORM dispatch.fn_leave();
    t := dispatch.task_lock(p_task_id);
    holder := t.assigned_agent;
    IF t.status IN ('completed', 'review') AND p_actor = t.assigned_agent THEN
        PERFORM dispatch.task_fence(t, p_actor, p_lease);
        RETURN t;
    END IF;
    manual := dispatch.task_is_resolver(t, p_actor, p_admin)
              AND p_actor IS DISTINCT FROM t.assigned_agent;
    IF manual THEN
        PERFORM dispatch.task_require_status(t, 'blocked', 'pending', 'assigned', 'running',
                                             'suspended');
    ELSE
        PERFORM dispatch.task_fence(t, p_actor, p_lease);
        PERFORM dispatch.task_require_status(t, 'assigned', 'running');
    END IF;
    PERFORM dispatch.refill_promise(holder, p_refill AND NOT manual);
    PERFORM dispatch.fn_enter();
    IF NOT manual AND t.approval IN ('review', 'both') THEN
        -- The result waits for its review (18_gates.sql); the agent's slot is free.
        UPDATE dispatch.tasks
        SET status = 'review', result = p_result, updated_at = p_now,
            deadline_at = NULL, wake_deadline_at = NULL
        WHERE task_id = p_task_id
        RETURNING * INTO t;
        PERFORM dispatch.event_write(p_task_id, 'in_review', p_actor,
            jsonb_build_object('assigned_agent', holder, 'result', p_result), p_now);
        PERFORM dispatch.fn_leave();
        RETURN t;
    END IF;
    UPDATE dispatch.tasks
    SET status = 'completed', result = p_result, completed_at = p_now, updated_at = p_now,
        deadline_at = NULL, wake_deadline_at = NULL,
        assigned_agent = CASE WHEN manual THEN NULL ELSE assigned_agent END,
        previous_agents = CASE WHEN NOT manual OR holder IS NULL OR holder = ANY (previous_agents)
                               THEN previous_agents ELSE previous_agents || holder END
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'completed', p_actor,
        jsonb_build_object('assigned_agent', holder, 'result', p_result)
        || CASE WHEN manual THEN '{"manual": true}'::jsonb ELSE '{}'::jsonb END, p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

CREATE FUNCTION dispatch.task_fail(
    p_task_id uuid, p_agent_id text, p_error text DEFAULT NULL,
    p_retry_eligible boolean DEFAULT true, p_now timestamptz DEFAULT now(),
    p_lease integer DEFAULT NULL, p_refill boolean DEFAULT false
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    PERFORM dispatch.task_fence(t, p_agent_id, p_lease);
    PERFORM dispatch.task_require_status(t, 'assigned', 'running');
    PERFORM dispatch.refill_promise(p_agent_id, p_refill);
    PERFORM dispatch.fn_enter();
    PERFORM dispatch.event_write(p_task_id, 'failed', p_agent_id,
        jsonb_build_object('assigned_agent', p_agent_id, 'error', p_error,
                           'retry_eligible', coalesce(p_retry_eligible, true)), p_now);
    t := dispatch.task_end_attempt(t, 'failed', p_error, coalesce(p_retry_eligible, true), p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

-- The assigned agent gives its task back unfinished (it is shutting down): pending again at once,
-- not counted as an attempt (retry_count and the error stay as they were), so a task with no
-- retries left is not dead-lettered for work that never got to finish. The agent joins
-- previous_agents like any agent whose attempt ended: its late reports of this attempt are stale
-- (409), it may still read the task, and the assigner prefers another agent for it (this one takes
-- it again when nothing else fits). Bounded like any attempt by the task's timeout meanwhile.
CREATE FUNCTION dispatch.task_release(
    p_task_id uuid, p_agent_id text, p_reason text DEFAULT NULL, p_now timestamptz DEFAULT now(),
    p_lease integer DEFAULT NULL
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    PERFORM dispatch.task_fence(t, p_agent_id, p_lease);
    PERFORM dispatch.task_require_status(t, 'assigned', 'running');
    PERFORM dispatch.fn_enter();
    t := dispatch.task_give_back(t, p_reason, p_now);
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
    -- With the suspended tasks whose signal did not come in time (19_signals.sql): the same
    -- index, in one walk.
    FOR t IN
        SELECT * FROM dispatch.tasks tk
        WHERE tk.status IN ('assigned', 'running', 'suspended')
          AND (tk.deadline_at <= p_now
               OR (tk.status = 'assigned' AND tk.wake_deadline_at <= p_now)
               OR tk.status <> 'suspended' AND tk.heartbeat_seconds IS NOT NULL
                  AND coalesce(tk.last_progress_at, tk.started_at, tk.assigned_at)
                      + make_interval(secs => tk.heartbeat_seconds) <= p_now)
        ORDER BY tk.deadline_at
        LIMIT p_limit
        FOR NO KEY UPDATE SKIP LOCKED
    LOOP
        IF t.status = 'suspended' THEN
            PERFORM dispatch.event_write(t.task_id, 'timeout', 'dispatch',
                jsonb_build_object('assigned_agent', t.assigned_agent,
                                   'timed_out_in_state', t.status, 'reason', 'signal',
                                   'waiting_for', t.waiting_for), p_now);
            r := dispatch.task_end_attempt(t, 'timed_out', 'no signal in time: ' || t.waiting_for,
                                           true, p_now);
            event := 'timeout';
        ELSIF t.status = 'assigned' AND t.wake_deadline_at <= p_now AND t.deadline_at > p_now THEN
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
    -- Flow control's sweep (04_parking.sql): parked tasks whose key has room go back in line.
    PERFORM dispatch.flow_unpark();
END
$$;

-- The next instant at which the reaper has something to do: an active task's deadline, heartbeat
-- or wake timeout; NULL when no task is active. (PL/pgSQL for its cached plan, like those below:
-- a SQL function with a subquery is not inlined and is planned anew on every call, about 0.5 ms,
-- and the loops ask after every round.)
CREATE FUNCTION dispatch.next_deadline() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- A suspended task has its deadline only (the end of its wait).
    RETURN (SELECT min(CASE WHEN tk.status = 'suspended' THEN tk.deadline_at
                            ELSE least(tk.deadline_at,
                                       CASE WHEN tk.status = 'assigned' THEN tk.wake_deadline_at END,
                                       coalesce(tk.last_progress_at, tk.started_at, tk.assigned_at)
                                           + make_interval(secs => tk.heartbeat_seconds))
                       END)
            FROM dispatch.tasks tk WHERE tk.status IN ('assigned', 'running', 'suspended'));
END
$$;

-- The next instant after p_now at which the assigner has something to do: a scheduled or
-- backed-off task becoming available; NULL when none waits.
CREATE FUNCTION dispatch.next_available(p_now timestamptz DEFAULT now()) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT min(tk.available_at) FROM dispatch.tasks tk
            WHERE tk.status = 'pending' AND tk.available_at > tk.created_at
              AND tk.available_at > p_now);
END
$$;

-- The nearer of the two: when the reaper or the assigner has something to do next.
CREATE FUNCTION dispatch.next_due(p_now timestamptz DEFAULT now()) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT least(dispatch.next_deadline(), dispatch.next_available(p_now))
$$;

CREATE FUNCTION dispatch.task_cancel(
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
    PERFORM dispatch.task_require_status(t, 'blocked', 'pending', 'assigned', 'running',
                                         'suspended', 'review');
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

-- Dead-letter requeue (admin): a failed, timed-out or cancelled task starts over; blocked again
-- while it has dependencies yet to complete. One that ended without completing, on an edge that
-- cancels, is UD409: requeue that one first.
CREATE FUNCTION dispatch.task_requeue(
    p_task_id uuid, p_actor text, p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
    previous dispatch.task_status := t.status;
    ended uuid;
    waiting integer := 0;
BEGIN
    PERFORM dispatch.task_require_status(t, 'failed', 'timed_out', 'cancelled');
    IF t.waiting_on > 0 THEN
        SELECT dd.depends_on INTO ended
        FROM dispatch.task_dependencies dd JOIN dispatch.tasks tk ON tk.task_id = dd.depends_on
        WHERE dd.task_id = p_task_id AND NOT dd.satisfied
          AND tk.status IN ('failed', 'timed_out', 'cancelled')
        LIMIT 1;
        IF ended IS NOT NULL THEN
            RAISE EXCEPTION 'task % depends on %, which ended without completing: requeue that one first',
                p_task_id, ended USING ERRCODE = 'UD409';
        END IF;
    END IF;
    waiting := dispatch.task_waits(t);
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks
    SET status = (CASE WHEN waiting > 0 THEN 'blocked' ELSE 'pending' END)::dispatch.task_status,
        waiting_on = waiting,
        retry_count = 0, assigned_agent = NULL, available_at = p_now,
        deadline_at = NULL, wake_deadline_at = NULL, completed_at = NULL,
        updated_at = p_now
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'requeued', p_actor,
        jsonb_build_object('previous_status', previous)
        || CASE WHEN waiting > 0 THEN jsonb_build_object('waiting_on', waiting)
                ELSE '{}'::jsonb END, p_now);
    PERFORM pg_notify('dispatch_work', '');
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

-- RFC 7396 JSON merge patch: objects merge recursively, null removes a key, anything else replaces.
-- plpgsql on purpose: a SQL-language body would be inlined, duplicating the recursive call for
-- every reference to its arguments (exponential in the depth of nested objects).
CREATE FUNCTION dispatch.jsonb_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    result jsonb;
    k      text;
    v      jsonb;
BEGIN
    IF jsonb_typeof(patch) IS DISTINCT FROM 'object' THEN
        RETURN patch;
    END IF;
    result := CASE WHEN jsonb_typeof(target) = 'object' THEN target ELSE '{}' END;
    FOR k, v IN SELECT * FROM jsonb_each(patch) LOOP
        IF v = 'null'::jsonb THEN
            result := result - k;
        ELSE
            result := jsonb_set(result, ARRAY[k], dispatch.jsonb_merge_patch(result -> k, v));
        END IF;
    END LOOP;
    RETURN result;
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

-- Several reports of one agent in one transaction, each fenced and applied on its own: each runs in
-- a subtransaction, so a refused report changes nothing and the others still apply. p_reports is a
-- JSON array of {task_id, action: start|progress|complete|fail, lease?, percent?, message?, data?,
-- result?, error?, retry_eligible?}. One row per report, in order: the HTTP status the single call
-- would give, the error and the field it names, and the task (after the report; on a conflict, as
-- it is now).
-- The common batch, an agent completing tasks it holds, is applied first, each by its key, with one
-- INSERT of their events and one subtransaction for them all (a function call, a subtransaction
-- and an event statement per report cost a batch of ten about a sixth of its backend CPU): each
-- completion of a task the agent holds on the lease it names (or none), with no review waiting,
-- and that task named once in the batch, so that its order among the others does not matter.
-- Every other report, and any of those its UPDATE did not find as expected, then goes through its
-- own function in order, as before; should that step fail, all of them do.
-- p_refill: a claim of the agent follows in the same transaction
-- (dispatch.task_report_batch_then_claim), which announces the slots the reports free
-- (dispatch.refill_promise).
CREATE FUNCTION dispatch.task_report_batch(
    p_agent_id text, p_reports jsonb, p_admin boolean DEFAULT false, p_now timestamptz DEFAULT now(),
    p_refill boolean DEFAULT false
) RETURNS TABLE (ord integer, status integer, error text, field text, task jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    r    jsonb;
    id    uuid;
    lease integer;
    t     dispatch.tasks;
    code  text;
    quick integer[] := '{}';  -- the ordinals of the completions applied together
    done  jsonb[] := '{}';    -- and their tasks
    o     record;
    k     integer;
BEGIN
    IF jsonb_typeof(p_reports) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'reports must be a JSON array' USING ERRCODE = 'UD400', COLUMN = 'reports';
    END IF;
    IF jsonb_array_length(p_reports) > 1 THEN
        BEGIN
            PERFORM dispatch.refill_promise(p_agent_id, p_refill);
            PERFORM dispatch.fn_enter();
            -- Only when every report names its task in the canonical form, so that a task named
            -- twice is seen as such. (Each cast behind its CASE: a malformed lease is left to its
            -- report's own call, which refuses it.)
            FOR o IN
                WITH every AS (
                    SELECT x.n::integer AS n, x.e,
                           count(*) OVER (PARTITION BY lower(x.e ->> 'task_id')) AS times,
                           bool_and(coalesce(x.e ->> 'task_id'
                                             ~* '^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$',
                                             false)) OVER () AS canonical
                    FROM jsonb_array_elements(p_reports) WITH ORDINALITY AS x (e, n)
                )
                SELECT e.n, e.e -> 'result' AS result,
                       CASE WHEN e.canonical THEN (e.e ->> 'task_id')::uuid END AS task_id,
                       CASE WHEN e.e ->> 'lease' ~ '^[0-9]{1,10}$' THEN
                           CASE WHEN (e.e ->> 'lease')::bigint <= 2147483647
                                THEN (e.e ->> 'lease')::integer END END AS lease
                FROM every e
                WHERE e.canonical AND e.times = 1 AND e.e ->> 'action' = 'complete'
                  AND CASE WHEN e.e ->> 'lease' IS NULL THEN true
                           WHEN e.e ->> 'lease' ~ '^[0-9]{1,10}$'
                           THEN (e.e ->> 'lease')::bigint <= 2147483647
                           ELSE false END
                ORDER BY e.n
            LOOP
                -- task_complete's common case, by the task's key (the status as text, as there).
                UPDATE dispatch.tasks tk
                SET status = 'completed', result = o.result, completed_at = p_now,
                    updated_at = p_now, deadline_at = NULL, wake_deadline_at = NULL
                WHERE tk.task_id = o.task_id AND tk.assigned_agent = p_agent_id
                  AND tk.status::text IN ('assigned', 'running')
                  AND (o.lease IS NULL OR tk.lease = o.lease)
                  AND (tk.approval IS NULL OR tk.approval NOT IN ('review', 'both'))
                RETURNING * INTO t;
                CONTINUE WHEN NOT FOUND;
                quick := quick || o.n;
                done := done || to_jsonb(t);
            END LOOP;
            INSERT INTO dispatch.task_events (task_id, event, actor, payload, created_at)
            SELECT (d.task ->> 'task_id')::uuid, 'completed', p_agent_id,
                   jsonb_build_object('assigned_agent', p_agent_id, 'result', d.task -> 'result'),
                   p_now
            FROM unnest(done) WITH ORDINALITY AS d (task, n)
            ORDER BY d.n;
            PERFORM dispatch.fn_leave();
            IF cardinality(quick) > 0
               AND (SELECT c.events_notify OR c.ui_notify_until > now() FROM dispatch.config c) THEN
                PERFORM pg_notify('dispatch_events', '');
            END IF;
        EXCEPTION
            WHEN SQLSTATE 'UD400' OR SQLSTATE 'UD403' OR SQLSTATE 'UD404' OR SQLSTATE 'UD409' THEN
                quick := '{}';
                done := '{}';
        END;
    END IF;
    FOR r, ord IN SELECT x.e, x.n::integer FROM jsonb_array_elements(p_reports)
                  WITH ORDINALITY AS x (e, n) LOOP
        status := 200;
        error := NULL;
        field := NULL;
        task := NULL;
        id := NULL;
        k := array_position(quick, ord);
        IF k IS NOT NULL THEN
            task := done[k];
            RETURN NEXT;
            CONTINUE;
        END IF;
        BEGIN
            id := (r ->> 'task_id')::uuid;
            lease := (r ->> 'lease')::integer;
            CASE r ->> 'action'
                WHEN 'start' THEN
                    t := dispatch.task_start(id, p_agent_id, p_now, lease);
                WHEN 'progress' THEN
                    t := dispatch.task_progress(id, p_agent_id, (r ->> 'percent')::float8,
                                                r ->> 'message', r -> 'data', p_now, lease);
                WHEN 'complete' THEN
                    t := dispatch.task_complete(id, p_agent_id, r -> 'result', p_admin, p_now,
                                                lease, p_refill);
                WHEN 'fail' THEN
                    t := dispatch.task_fail(id, p_agent_id, r ->> 'error',
                                            coalesce((r ->> 'retry_eligible')::boolean, true), p_now,
                                            lease, p_refill);
                ELSE
                    RAISE EXCEPTION 'action must be start, progress, complete or fail'
                        USING ERRCODE = 'UD400', COLUMN = 'action';
            END CASE;
            task := to_jsonb(t);
        EXCEPTION
            WHEN SQLSTATE 'UD400' OR SQLSTATE 'UD403' OR SQLSTATE 'UD404' OR SQLSTATE 'UD409'
                 OR invalid_text_representation OR numeric_value_out_of_range THEN
                GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, error = MESSAGE_TEXT,
                                        field = COLUMN_NAME;
                status := CASE WHEN code LIKE 'UD%' THEN substr(code, 3)::integer ELSE 400 END;
                field := nullif(field, '');
                IF status = 409 THEN
                    task := (SELECT to_jsonb(tk) FROM dispatch.tasks tk WHERE tk.task_id = id);
                END IF;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;
