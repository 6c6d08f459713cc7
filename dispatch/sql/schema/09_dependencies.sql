-- Dependencies: a task may wait for other tasks. While any of them has not let it run, it is
-- `blocked`, out of the queue (no pending index holds it, no claim or assignment sees it); it
-- becomes pending in the transaction that completes the last one. A dependency that ends without
-- completing (failed for good, timed out for good, cancelled) cancels its dependents with a reason
-- naming it, unless their edge says `on_failure = 'run'`, in which case its end lets them run as a
-- completion would. Everything here runs inside the transitions, from the API, NATS and psql
-- alike: the trigger below settles a task's dependents whenever it ends, however it ended.
-- task_create (09_transitions.sql) adds a new task's edges; 17_dependency_edits.sql changes them
-- while the task waits.

-- The edges a create or an edit asks for, from JSON: an array whose items are task ids or objects
-- {"task_id": ..., "on_failure": "cancel" | "run"}. Bad shapes are UD400, naming the item.
CREATE FUNCTION dispatch.dependency_edges(p_deps jsonb)
RETURNS TABLE (depends_on uuid, on_failure text)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    item jsonb;
    i    integer := 0;
    id   text;
    mode text;
BEGIN
    IF p_deps IS NULL OR p_deps = 'null'::jsonb THEN
        RETURN;
    END IF;
    IF jsonb_typeof(p_deps) <> 'array' THEN
        RAISE EXCEPTION 'depends_on must be an array of task ids or {"task_id", "on_failure"} objects'
            USING ERRCODE = 'UD400', COLUMN = 'depends_on';
    END IF;
    IF jsonb_array_length(p_deps) > 1000 THEN
        RAISE EXCEPTION 'depends_on names % tasks; at most 1000', jsonb_array_length(p_deps)
            USING ERRCODE = 'UD400', COLUMN = 'depends_on';
    END IF;
    FOR item IN SELECT x FROM jsonb_array_elements(p_deps) x LOOP
        CASE jsonb_typeof(item)
            WHEN 'string' THEN
                id := item #>> '{}';
                mode := 'cancel';
            WHEN 'object' THEN
                IF EXISTS (SELECT 1 FROM jsonb_object_keys(item) k
                           WHERE k NOT IN ('task_id', 'on_failure')) THEN
                    RAISE EXCEPTION 'depends_on[%]: only task_id and on_failure may be given', i
                        USING ERRCODE = 'UD400', COLUMN = 'depends_on';
                END IF;
                id := item ->> 'task_id';
                mode := coalesce(item ->> 'on_failure', 'cancel');
            ELSE
                id := NULL;
        END CASE;
        IF id IS NULL OR id !~* '^[0-9a-f]{8}-?([0-9a-f]{4}-?){3}[0-9a-f]{12}$' THEN
            RAISE EXCEPTION 'depends_on[%]: % is not a task id', i, left(item::text, 80)
                USING ERRCODE = 'UD400', COLUMN = 'depends_on';
        END IF;
        IF mode NOT IN ('cancel', 'run') THEN
            RAISE EXCEPTION 'depends_on[%]: on_failure must be cancel or run (got %)', i, left(mode, 80)
                USING ERRCODE = 'UD400', COLUMN = 'depends_on';
        END IF;
        depends_on := id::uuid;
        on_failure := mode;
        RETURN NEXT;
        i := i + 1;
    END LOOP;
END
$$;

-- Whether p_viewer may see the task (NULL: sees every task, as an admin or psql does): its
-- requester, its owner, its agent and the agents that held it before.
CREATE FUNCTION dispatch.task_visible_to(t dispatch.tasks, p_viewer text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_viewer IS NULL OR coalesce(p_viewer = t.requester OR p_viewer = t.owner
        OR p_viewer = t.assigned_agent OR p_viewer = ANY (t.previous_agents), false)
$$;

-- What a task waits for before it may run: its dependencies yet to let it, and its approval
-- (18_gates.sql) while it has none.
CREATE FUNCTION dispatch.task_waits(t dispatch.tasks) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT count(*) FROM dispatch.task_dependencies dd
            WHERE dd.task_id = t.task_id AND NOT dd.satisfied)::integer
        + coalesce(t.approval IN ('before_start', 'both') AND t.approved_at IS NULL, false)::integer;
END
$$;

-- Cancels a dependent whose dependency ended without completing (inside fn_enter).
CREATE FUNCTION dispatch.task_cancel_for(
    p_task_id uuid, p_dependency uuid, p_dependency_status dispatch.task_status, p_now timestamptz
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks;
    why text := format('dependency %s %s', p_dependency,
                       CASE p_dependency_status WHEN 'timed_out' THEN 'timed out'
                                                ELSE p_dependency_status::text END);
BEGIN
    UPDATE dispatch.tasks
    SET status = 'cancelled', error = why, completed_at = p_now, updated_at = p_now
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'cancelled', 'dispatch',
        jsonb_build_object('reason', why, 'dependency', p_dependency,
                           'dependency_status', p_dependency_status), p_now);
    RETURN t;
END
$$;

-- Adds the edges p_deps (dependency_edges' JSON) to the task t, locked by the caller, which is
-- pending or blocked: each dependency must exist and be visible to p_viewer (else UD400, the same
-- answer for both, so ids do not leak). A dependency already completed (or ended, with
-- on_failure run) lets it run at once; one that ended otherwise, with on_failure cancel, cancels
-- it; any other keeps it blocked until it ends. An edge that exists already takes the new
-- on_failure. Returns the task as it is now. Inside fn_enter.
CREATE FUNCTION dispatch.task_depend_attach(
    t dispatch.tasks, p_deps jsonb, p_viewer text, p_now timestamptz
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    ids        uuid[];
    modes      text[];
    n          integer;
    found      integer := 0;
    d          record;
    sat        boolean;
    waiting    uuid[] := '{}';
    doomed     uuid;
    doomed_how dispatch.task_status;
    was        dispatch.task_status := t.status;
BEGIN
    SELECT array_agg(e.depends_on), array_agg(e.on_failure), count(*)
    INTO ids, modes, n FROM dispatch.dependency_edges(p_deps) e;
    IF n = 0 THEN
        RETURN t;
    END IF;
    IF (SELECT count(DISTINCT x) FROM unnest(ids) x) < n THEN
        RAISE EXCEPTION 'depends_on names a task more than once'
            USING ERRCODE = 'UD400', COLUMN = 'depends_on';
    END IF;
    IF t.task_id = ANY (ids) THEN
        RAISE EXCEPTION 'task % cannot depend on itself', t.task_id
            USING ERRCODE = 'UD400', COLUMN = 'depends_on';
    END IF;
    -- The dependencies, locked in one order (no two creates deadlock), so that none ends between
    -- the look at its status and the edge: its end then finds the edge.
    FOR d IN
        SELECT tk.task_id, tk.status, w.on_failure,
               dispatch.task_visible_to(tk, p_viewer) AS visible
        FROM unnest(ids, modes) AS w (depends_on, on_failure)
        JOIN dispatch.tasks tk ON tk.task_id = w.depends_on
        ORDER BY tk.task_id
        FOR NO KEY UPDATE OF tk
    LOOP
        EXIT WHEN NOT d.visible;
        found := found + 1;
        INSERT INTO dispatch.task_dependencies AS dd
            (task_id, depends_on, on_failure, satisfied, created_at)
        VALUES (t.task_id, d.task_id, d.on_failure,
                d.status = 'completed'
                OR (d.status IN ('failed', 'timed_out', 'cancelled') AND d.on_failure = 'run'),
                p_now)
        ON CONFLICT (task_id, depends_on) DO UPDATE
            SET on_failure = EXCLUDED.on_failure, satisfied = dd.satisfied OR EXCLUDED.satisfied
        RETURNING dd.satisfied INTO sat;
        IF NOT sat THEN
            waiting := waiting || d.task_id;
            IF doomed IS NULL AND d.status IN ('failed', 'timed_out', 'cancelled') THEN
                doomed := d.task_id;
                doomed_how := d.status;
            END IF;
        END IF;
    END LOOP;
    IF found < n THEN
        RAISE EXCEPTION 'depends_on: % of the tasks named do not exist (or are not yours to see)',
            n - found USING ERRCODE = 'UD400', COLUMN = 'depends_on';
    END IF;
    UPDATE dispatch.tasks SET has_dependents = true WHERE task_id = ANY (ids) AND NOT has_dependents;
    -- What still holds it, counted from its edges (an edit may have changed one it had).
    n := dispatch.task_waits(t);
    UPDATE dispatch.tasks
    SET waiting_on = n,
        status = CASE WHEN doomed IS NOT NULL THEN status
                      WHEN n > 0 THEN 'blocked' ELSE 'pending' END,
        updated_at = p_now
    WHERE task_id = t.task_id
    RETURNING * INTO t;
    IF doomed IS NOT NULL THEN
        RETURN dispatch.task_cancel_for(t.task_id, doomed, doomed_how, p_now);
    END IF;
    IF t.status = 'blocked' AND was <> 'blocked' THEN
        PERFORM dispatch.event_write(t.task_id, 'blocked', dispatch.session_actor(),
            jsonb_build_object('waiting_for', to_jsonb(waiting), 'waiting_on', n)
            || CASE WHEN n > cardinality(waiting) THEN '{"approval": true}'::jsonb
                    ELSE '{}'::jsonb END, p_now);
    END IF;
    RETURN t;
END
$$;

-- A waiting task lost a reason to wait (an edge satisfied or removed, p_by the dependency; or its
-- approval, p_by NULL): one less, and pending when none is left (event unblocked). The task is
-- locked here. Inside fn_enter.
CREATE FUNCTION dispatch.task_wait_less(
    p_task_id uuid, p_by uuid, p_actor text, p_now timestamptz
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    st        dispatch.task_status;
    remaining integer;
BEGIN
    SELECT tk.status, tk.waiting_on INTO st, remaining
    FROM dispatch.tasks tk WHERE tk.task_id = p_task_id FOR NO KEY UPDATE;
    IF st = 'blocked' AND remaining <= 1 THEN
        UPDATE dispatch.tasks SET waiting_on = 0, status = 'pending', updated_at = p_now
        WHERE task_id = p_task_id;
        PERFORM dispatch.event_write(p_task_id, 'unblocked', p_actor,
            jsonb_strip_nulls(jsonb_build_object('last_dependency', p_by)), p_now);
        PERFORM pg_notify('dispatch_work', '');
    ELSE
        UPDATE dispatch.tasks SET waiting_on = greatest(remaining - 1, 0) WHERE task_id = p_task_id;
    END IF;
END
$$;

-- A task with dependents ended: settles them. Completion (or an end their edge runs after) counts
-- down each dependent, the last one making it pending; any other end cancels those whose edge
-- says cancel, and their own dependents in turn. The cascade is a loop here, not one trigger
-- inside another, so a long chain cannot exhaust the stack: the updates it makes find
-- dispatch.settling set and leave their dependents to it. Dependents are locked in task id order,
-- so two settlements that share dependents do not deadlock.
CREATE FUNCTION dispatch.tasks_dependents_settle() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    via    text := coalesce(current_setting('dispatch.via', true), '');
    now_at timestamptz := coalesce(NEW.completed_at, now());
    actor  text := dispatch.session_actor();
    todo   uuid[] := ARRAY[NEW.task_id];
    ends   dispatch.task_status[] := ARRAY[NEW.status];
    cur    uuid;
    st     dispatch.task_status;
    freed  uuid[];
    dep    uuid;
    c      dispatch.tasks;
BEGIN
    IF current_setting('dispatch.settling', true) = 'on' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('dispatch.settling', 'on', true), dispatch.fn_enter();
    WHILE cardinality(todo) > 0 LOOP
        cur := todo[1];
        st := ends[1];
        todo := todo[2:];
        ends := ends[2:];
        WITH s AS (
            UPDATE dispatch.task_dependencies dd SET satisfied = true
            WHERE dd.depends_on = cur AND NOT dd.satisfied
              AND (st = 'completed' OR dd.on_failure = 'run')
            RETURNING dd.task_id
        )
        SELECT coalesce(array_agg(s.task_id ORDER BY s.task_id), '{}') INTO freed FROM s;
        FOREACH dep IN ARRAY freed LOOP
            PERFORM dispatch.task_wait_less(dep, cur, actor, now_at);
        END LOOP;
        CONTINUE WHEN st = 'completed';
        FOR dep IN
            SELECT dd.task_id FROM dispatch.task_dependencies dd
            WHERE dd.depends_on = cur AND NOT dd.satisfied AND dd.on_failure = 'cancel'
            ORDER BY dd.task_id
        LOOP
            SELECT * INTO c FROM dispatch.tasks WHERE task_id = dep FOR NO KEY UPDATE;
            CONTINUE WHEN c.status <> 'blocked';
            c := dispatch.task_cancel_for(dep, cur, st, now_at);
            IF c.has_dependents THEN
                todo := todo || c.task_id;
                ends := ends || 'cancelled'::dispatch.task_status;
            END IF;
        END LOOP;
    END LOOP;
    PERFORM set_config('dispatch.settling', '', true), set_config('dispatch.via', via, true);
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_dependents_settle AFTER UPDATE OF status ON dispatch.tasks
    FOR EACH ROW WHEN (NEW.has_dependents AND NEW.status IS DISTINCT FROM OLD.status
                       AND NEW.status IN ('completed', 'failed', 'timed_out', 'cancelled'))
    EXECUTE FUNCTION dispatch.tasks_dependents_settle();


-- A deleted task's edges go with it, both ways (retention deletes ended tasks; a DBA may delete
-- any). Once per DELETE statement, and only while edges exist at all.
CREATE FUNCTION dispatch.tasks_deleted_edges() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM dispatch.task_dependencies) THEN
        DELETE FROM dispatch.task_dependencies dd WHERE dd.task_id IN (SELECT task_id FROM gone);
        DELETE FROM dispatch.task_dependencies dd WHERE dd.depends_on IN (SELECT task_id FROM gone);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_deleted_edges AFTER DELETE ON dispatch.tasks
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION dispatch.tasks_deleted_edges();
