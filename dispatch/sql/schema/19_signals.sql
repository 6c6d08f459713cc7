-- Waiting for a signal without holding a slot. The agent running a task suspends it, saying what
-- it waits for and for how long: the task is `suspended`, its agent's slot free and its lease over
-- (a report on it is 409), though the agent stays named on it. A signal, from the task's
-- requester, its owner, an agent that held it or an admin, puts the payload on the task and the
-- task back to work: straight to the agent that suspended it when that agent may take it now
-- (event assigned, mode resume: its claim returns it first), else into the queue. A wait that runs
-- out fails the attempt (the reapers, dispatch.task_expire: retry rules apply). A signal to a task
-- that is not suspended is UD409.

CREATE FUNCTION dispatch.task_suspend(
    p_task_id uuid, p_agent_id text, p_waiting_for text, p_timeout_seconds integer,
    p_now timestamptz DEFAULT now(), p_lease integer DEFAULT NULL
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    PERFORM dispatch.task_fence(t, p_agent_id, p_lease);
    PERFORM dispatch.task_require_status(t, 'running');
    IF p_waiting_for IS NULL OR btrim(p_waiting_for) = '' OR octet_length(p_waiting_for) > 65536 THEN
        RAISE EXCEPTION 'waiting_for must say what the task waits for (1 byte to 64 KiB)'
            USING ERRCODE = 'UD400', COLUMN = 'waiting_for';
    END IF;
    IF p_timeout_seconds IS NULL OR p_timeout_seconds NOT BETWEEN 1 AND 31536000 THEN
        RAISE EXCEPTION 'timeout_seconds must be between 1 and 31536000 (a year), got %',
            p_timeout_seconds USING ERRCODE = 'UD400', COLUMN = 'timeout_seconds';
    END IF;
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks
    SET status = 'suspended', waiting_for = p_waiting_for, signal = NULL,
        deadline_at = p_now + make_interval(secs => p_timeout_seconds),
        wake_deadline_at = NULL, updated_at = p_now
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'suspended', p_agent_id,
        jsonb_build_object('waiting_for', p_waiting_for, 'deadline_at', t.deadline_at,
                           'assigned_agent', p_agent_id), p_now);
    PERFORM dispatch.fn_leave();
    -- The reapers learn of a deadline nearer than their next tick.
    IF t.deadline_at < p_now + make_interval(
           secs => (SELECT c.tick_interval_ms FROM dispatch.config c) / 1000.0) THEN
        PERFORM pg_notify('dispatch_due', extract(epoch FROM t.deadline_at)::text);
    END IF;
    RETURN t;
END
$$;

CREATE FUNCTION dispatch.task_signal(
    p_task_id uuid, p_actor text, p_payload jsonb DEFAULT NULL, p_admin boolean DEFAULT false,
    p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t     dispatch.tasks := dispatch.task_lock(p_task_id);
    c     dispatch.config;
    a     dispatch.agents;
    slots integer[];
BEGIN
    IF NOT (coalesce(p_admin, false) OR dispatch.task_visible_to(t, p_actor)) THEN
        RAISE EXCEPTION '% may not signal task % (its requester, its owner, its agents or an admin)',
            p_actor, p_task_id USING ERRCODE = 'UD403';
    END IF;
    IF t.status <> 'suspended' THEN
        RAISE EXCEPTION 'task % is not waiting for a signal (it is %)', p_task_id, t.status
            USING ERRCODE = 'UD409';
    END IF;
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks SET signal = coalesce(p_payload, 'null'::jsonb), updated_at = p_now
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'signalled', p_actor,
        jsonb_build_object('payload', p_payload, 'waiting_for', t.waiting_for), p_now);
    -- Back to the agent that suspended it, when it may take it now (flow-controlled tasks go
    -- through the queue, where their keys are counted).
    SELECT * INTO c FROM dispatch.config;
    SELECT * INTO a FROM dispatch.agents ag WHERE ag.agent_id = t.assigned_agent FOR KEY SHARE;
    IF FOUND AND t.concurrency_key IS NULL AND t.rate_key IS NULL
       AND cardinality(dispatch.agent_ineligibility(a, t.required_capabilities, t.owner, c)) = 0 THEN
        slots := dispatch.slots_take(a.agent_id, 1,
                                     coalesce(a.max_concurrent, c.max_concurrent_per_agent));
    END IF;
    IF cardinality(slots) = 1 THEN
        t := (dispatch.tasks_give(ARRAY[t], ARRAY[a], slots, c, 'resume', p_now))[1];
    ELSE
        -- Its agent joins previous_agents, as any agent whose attempt ended: a late report of
        -- the suspended attempt is stale (409).
        UPDATE dispatch.tasks
        SET status = 'pending', assigned_agent = NULL, available_at = p_now,
            previous_agents = CASE WHEN t.assigned_agent IS NULL
                                        OR t.assigned_agent = ANY (t.previous_agents)
                                   THEN t.previous_agents
                                   ELSE t.previous_agents || t.assigned_agent END,
            deadline_at = NULL, wake_deadline_at = NULL, updated_at = p_now
        WHERE task_id = p_task_id
        RETURNING * INTO t;
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;
