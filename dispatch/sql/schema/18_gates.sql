-- Gates: a person's decision inside the lifecycle. A task created with approval before_start (or
-- both) is blocked until its requester, its owner or an admin approves it (the approval counts
-- in waiting_on with its dependencies, 09_dependencies.sql); rejecting it cancels it, with the
-- reason. A task created with approval review (or both) goes to `review` when its agent completes
-- it (task_complete, 09_transitions.sql): the result is kept, the agent's slot is free. Accepting
-- completes it (its dependents may then run); requesting changes sends it back to pending with the
-- reviewer's feedback on the task for the next attempt, which counts as an attempt (with none
-- left it fails for good). Each decision is its own event.

-- Locks the task for a decision by p_actor, who must be its requester, its owner or an admin.
CREATE FUNCTION dispatch.task_decide_lock(p_task_id uuid, p_actor text, p_admin boolean)
RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    IF NOT dispatch.task_is_resolver(t, p_actor, p_admin) THEN
        RAISE EXCEPTION '% may not decide on task % (only its requester, its owner or an admin)',
            p_actor, p_task_id USING ERRCODE = 'UD403';
    END IF;
    RETURN t;
END
$$;

-- Locks the task for approve or reject (as task_decide_lock); UD409 unless it waits for its
-- approval.
CREATE FUNCTION dispatch.task_approval_lock(p_task_id uuid, p_actor text, p_admin boolean)
RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_decide_lock(p_task_id, p_actor, p_admin);
BEGIN
    IF NOT coalesce(t.status = 'blocked' AND t.approval IN ('before_start', 'both')
                    AND t.approved_at IS NULL, false) THEN
        RAISE EXCEPTION 'task % is not waiting for approval (it is %)', p_task_id, t.status
            USING ERRCODE = 'UD409';
    END IF;
    RETURN t;
END
$$;

CREATE FUNCTION dispatch.task_approve(
    p_task_id uuid, p_actor text, p_admin boolean DEFAULT false, p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_approval_lock(p_task_id, p_actor, p_admin);
BEGIN
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks SET approved_by = p_actor, approved_at = p_now, updated_at = p_now
    WHERE task_id = p_task_id;
    PERFORM dispatch.event_write(p_task_id, 'approved', p_actor, '{}', p_now);
    PERFORM dispatch.task_wait_less(p_task_id, NULL, p_actor, p_now);
    PERFORM dispatch.fn_leave();
    RETURN dispatch.task_lock(p_task_id);
END
$$;

CREATE FUNCTION dispatch.task_reject(
    p_task_id uuid, p_actor text, p_reason text DEFAULT NULL, p_admin boolean DEFAULT false,
    p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_approval_lock(p_task_id, p_actor, p_admin);
BEGIN
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks
    SET status = 'cancelled', completed_at = p_now, updated_at = p_now,
        error = format('rejected by %s', p_actor) || coalesce(': ' || p_reason, '')
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'rejected', p_actor,
        jsonb_build_object('reason', p_reason), p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

CREATE FUNCTION dispatch.task_accept(
    p_task_id uuid, p_actor text, p_admin boolean DEFAULT false, p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_decide_lock(p_task_id, p_actor, p_admin);
BEGIN
    PERFORM dispatch.task_require_status(t, 'review');
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks SET status = 'completed', completed_at = p_now, updated_at = p_now
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'accepted', p_actor, '{}', p_now);
    PERFORM dispatch.event_write(p_task_id, 'completed', p_actor,
        jsonb_build_object('assigned_agent', t.assigned_agent, 'result', t.result,
                           'reviewed_by', p_actor), p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

CREATE FUNCTION dispatch.task_request_changes(
    p_task_id uuid, p_actor text, p_feedback text, p_admin boolean DEFAULT false,
    p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_decide_lock(p_task_id, p_actor, p_admin);
BEGIN
    PERFORM dispatch.task_require_status(t, 'review');
    IF p_feedback IS NULL OR btrim(p_feedback) = '' OR octet_length(p_feedback) > 65536 THEN
        RAISE EXCEPTION 'feedback must say what to change (1 byte to 64 KiB)'
            USING ERRCODE = 'UD400', COLUMN = 'feedback';
    END IF;
    PERFORM dispatch.fn_enter();
    PERFORM dispatch.event_write(p_task_id, 'changes_requested', p_actor,
        jsonb_build_object('feedback', p_feedback, 'assigned_agent', t.assigned_agent,
                           'retry_count', t.retry_count, 'max_retries', t.max_retries), p_now);
    UPDATE dispatch.tasks SET feedback = p_feedback WHERE task_id = p_task_id
    RETURNING * INTO t;
    -- The attempt ends as a failure would: another one when retries are left, else failed.
    t := dispatch.task_end_attempt(t, 'failed', 'changes requested: ' || p_feedback, true, p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;
