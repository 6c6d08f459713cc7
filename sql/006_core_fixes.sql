-- Fixes to the lifecycle functions of 002, forward-only.

-- The SQL-language version of jsonb_merge_patch was inlined by the planner, which duplicated its
-- recursive call for every reference to its arguments: the cost grew exponentially with the depth of
-- nested objects (8 levels took seconds). plpgsql is never inlined: one recursive call per key.
CREATE OR REPLACE FUNCTION dispatch.jsonb_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
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

-- Lock the agent's tasks before the agent row, in the order every transition takes them (task
-- first, then the agent through the status trigger), so a stop racing a completion cannot deadlock.
CREATE OR REPLACE FUNCTION dispatch.agent_stop(p_agent_id text, p_now timestamptz DEFAULT now())
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
        PERFORM dispatch.task_reassign(t, 'agent_stopped', p_now);
        n := n + 1;
    END LOOP;
    PERFORM dispatch.fn_leave();
    UPDATE dispatch.agents SET status = 'stopped', updated_at = p_now, last_seen_at = p_now
    WHERE agent_id = p_agent_id;
    RETURN n;
END
$$;
