-- The assignment returns, for each task it assigns, the seconds the task waited to be assigned (since
-- it was created, or became available for a scheduled or retried task): one call, no second
-- statement per assignment.
DROP FUNCTION dispatch.task_assign_timed(integer, timestamptz);
DROP FUNCTION dispatch.task_assign(integer, timestamptz);

CREATE FUNCTION dispatch.task_assign(p_batch integer DEFAULT 100, p_now timestamptz DEFAULT now())
RETURNS TABLE (task_id uuid, agent_id text, score real, wake boolean, waited float8)
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
        waited := greatest(extract(epoch FROM p_now - greatest(t.created_at, t.available_at)), 0);
        PERFORM dispatch.task_give(t, a, score, 'push', p_now);
        RETURN NEXT;
    END LOOP;
    PERFORM dispatch.fn_leave();
END
$$;

ALTER FUNCTION dispatch.task_assign(integer, timestamptz) SET enable_sort = off;
