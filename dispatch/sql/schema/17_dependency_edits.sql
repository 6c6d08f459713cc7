-- Dependencies (09_dependencies.sql) edited while the task waits, and read.

-- Edits of a waiting task's edges, by its requester or an admin (p_viewer: who must be able to
-- see the dependency; NULL: anyone may, as for an admin or psql). The task must still wait (pending or blocked): what was
-- assigned has started to run without the dependency.
CREATE FUNCTION dispatch.task_edit_lock(p_task_id uuid, p_actor text, p_admin boolean)
RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    IF NOT (coalesce(p_admin, false) OR p_actor = t.requester) THEN
        RAISE EXCEPTION '% may not change the dependencies of task % (only its requester or an admin)',
            p_actor, p_task_id USING ERRCODE = 'UD403';
    END IF;
    PERFORM dispatch.task_require_status(t, 'pending', 'blocked');
    RETURN t;
END
$$;

-- Adds (or changes) the edge p_task_id -> p_depends_on. A cycle is UD400; a dependency that has
-- already ended without completing, on an edge that would cancel the task, is UD409 (remove it or
-- requeue it first). Event dependency_added; the task is blocked when the dependency has yet to
-- finish.
CREATE FUNCTION dispatch.task_depend(
    p_task_id uuid, p_depends_on uuid, p_actor text, p_on_failure text DEFAULT 'cancel',
    p_admin boolean DEFAULT false, p_viewer text DEFAULT NULL, p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t   dispatch.tasks := dispatch.task_edit_lock(p_task_id, p_actor, p_admin);
    dst dispatch.task_status;
BEGIN
    -- Edges are added one transaction at a time, so that two edits cannot close a cycle that
    -- neither sees. (A create adds edges only from its new task, which nothing can depend on yet.)
    PERFORM pg_advisory_xact_lock(hashtext('dispatch.task_depend'));
    IF p_depends_on = p_task_id OR EXISTS (
        WITH RECURSIVE up (id) AS (
            SELECT dd.depends_on FROM dispatch.task_dependencies dd WHERE dd.task_id = p_depends_on
            UNION
            SELECT dd.depends_on FROM dispatch.task_dependencies dd JOIN up ON dd.task_id = up.id
        )
        SELECT 1 FROM up WHERE up.id = p_task_id
    ) THEN
        RAISE EXCEPTION 'task % depending on % would close a cycle', p_task_id, p_depends_on
            USING ERRCODE = 'UD400', COLUMN = 'depends_on';
    END IF;
    SELECT tk.status INTO dst FROM dispatch.tasks tk WHERE tk.task_id = p_depends_on;
    IF dst IN ('failed', 'timed_out', 'cancelled') AND coalesce(p_on_failure, 'cancel') = 'cancel' THEN
        RAISE EXCEPTION 'task % is %: depending on it would cancel task % (requeue it first, or use on_failure run)',
            p_depends_on, dst, p_task_id USING ERRCODE = 'UD409';
    END IF;
    PERFORM dispatch.fn_enter();
    t := dispatch.task_depend_attach(t, jsonb_build_array(jsonb_build_object(
             'task_id', p_depends_on, 'on_failure', coalesce(p_on_failure, 'cancel'))),
         p_viewer, p_now);
    PERFORM dispatch.event_write(p_task_id, 'dependency_added', p_actor,
        jsonb_build_object('depends_on', p_depends_on, 'on_failure', coalesce(p_on_failure, 'cancel'),
                           'waiting_on', t.waiting_on), p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

-- Removes the edge p_task_id -> p_depends_on (UD404 when there is none); the task is pending when
-- it was the last one it waited for. Event dependency_removed.
CREATE FUNCTION dispatch.task_undepend(
    p_task_id uuid, p_depends_on uuid, p_actor text, p_admin boolean DEFAULT false,
    p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t   dispatch.tasks := dispatch.task_edit_lock(p_task_id, p_actor, p_admin);
    sat boolean;
BEGIN
    DELETE FROM dispatch.task_dependencies dd
    WHERE dd.task_id = p_task_id AND dd.depends_on = p_depends_on
    RETURNING dd.satisfied INTO sat;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task % does not depend on %', p_task_id, p_depends_on
            USING ERRCODE = 'UD404';
    END IF;
    PERFORM dispatch.fn_enter();
    PERFORM dispatch.event_write(p_task_id, 'dependency_removed', p_actor,
        jsonb_build_object('depends_on', p_depends_on), p_now);
    IF NOT sat THEN
        PERFORM dispatch.task_wait_less(p_task_id, p_depends_on, p_actor, p_now);
    END IF;
    PERFORM dispatch.fn_leave();
    RETURN dispatch.task_lock(p_task_id);
END
$$;

-- A task's dependencies with what a dependent needs of them (status, result, error), and its
-- dependents, for the API's one call and for psql.
CREATE VIEW dispatch.dependencies AS
SELECT dd.task_id, dd.depends_on, dd.on_failure, dd.satisfied, dd.created_at,
       tk.title, tk.status, tk.result, tk.error, tk.completed_at
FROM dispatch.task_dependencies dd JOIN dispatch.tasks tk ON tk.task_id = dd.depends_on;
