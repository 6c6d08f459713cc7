-- Guards: the lifecycle's edges, the triggers that reject any other status change (from raw SQL
-- too), and the event row + NOTIFY written in the transaction of every change. The transitions
-- themselves are in 09_transitions.sql, one function each.
--
-- Errors raised here carry SQLSTATEs the Python store maps to domain errors:
--   UD400 invalid argument, UD403 actor may not do this, UD404 no such task or agent,
--   UD409 the task is not in a state that allows it (illegal status edges also raise UD409).
--
-- NOTIFY channels carry an empty payload so that Postgres folds them within a transaction:
--   dispatch_work   there may be new assignable work or freed capacity (wakes the assigner)
--   dispatch_events new rows in task_events (wakes the relay and the dashboards; sent only while
--                   config.events_notify, or before config.ui_notify_until)
--   dispatch_due    (payload: an epoch) an assignment set a deadline nearer than the reapers'
--                   tick (wakes sleeping reapers)

-- Capabilities as they are compared: trimmed, lower case, each once, sorted. (PL/pgSQL for its
-- cached plan: as a SQL function with a FROM it was not inlined, and every create planned it.)
CREATE FUNCTION dispatch.normalize_capabilities(caps text[]) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN coalesce((SELECT array_agg(DISTINCT c ORDER BY c)
                     FROM (SELECT lower(btrim(x)) AS c FROM unnest(caps) AS x) s
                     WHERE c IS NOT NULL AND c <> ''), '{}');
END
$$;

-- Who the session is, for the actor of events written from raw SQL.
CREATE FUNCTION dispatch.session_actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('dispatch.actor', true), ''), session_user::text)
$$;

-- One event of a task, or two of one change (p_then_*: a claim that starts what it takes writes
-- assigned, then started) in one statement and one call: the call costs about as much as the
-- INSERT.
CREATE FUNCTION dispatch.event_write(
    p_task_id uuid, p_event text, p_actor text, p_payload jsonb, p_now timestamptz,
    p_then_event text DEFAULT NULL, p_then_actor text DEFAULT NULL,
    p_then_payload jsonb DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_then_event IS NULL THEN
        INSERT INTO dispatch.task_events (task_id, event, actor, payload, created_at)
        VALUES (p_task_id, p_event, p_actor, coalesce(p_payload, '{}'), p_now);
    ELSE
        INSERT INTO dispatch.task_events (task_id, event, actor, payload, created_at)
        VALUES (p_task_id, p_event, p_actor, coalesce(p_payload, '{}'), p_now),
               (p_task_id, p_then_event, p_then_actor, coalesce(p_then_payload, '{}'), p_now);
    END IF;
    -- Only a relay or an open dashboard listens: without one the NOTIFY would only serialise
    -- commits.
    IF (SELECT c.events_notify OR c.ui_notify_until > now() FROM dispatch.config c) THEN
        PERFORM pg_notify('dispatch_events', '');
    END IF;
END
$$;

-- pending -> completed: manual resolution (the requester, the owner or an admin; the original
-- service allowed it and its clients rely on it).
CREATE FUNCTION dispatch.status_edge_allowed(
    old_status dispatch.task_status, new_status dispatch.task_status
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE old_status
        WHEN 'blocked'   THEN new_status IN ('pending', 'completed', 'cancelled')
        WHEN 'pending'   THEN new_status IN ('assigned', 'completed', 'cancelled', 'blocked')
        WHEN 'assigned'  THEN new_status IN ('running', 'completed', 'failed', 'timed_out',
                                             'pending', 'cancelled', 'review')
        WHEN 'running'   THEN new_status IN ('completed', 'failed', 'timed_out', 'pending',
                                             'cancelled', 'review', 'suspended')
        WHEN 'suspended' THEN new_status IN ('assigned', 'pending', 'failed', 'timed_out',
                                             'completed', 'cancelled')
        WHEN 'review'    THEN new_status IN ('completed', 'pending', 'failed', 'cancelled')
        WHEN 'failed'    THEN new_status IN ('pending', 'blocked')
        WHEN 'timed_out' THEN new_status IN ('pending', 'blocked')
        WHEN 'cancelled' THEN new_status IN ('pending', 'blocked')
        ELSE false
    END
$$;

-- Marks the current transaction as inside a lifecycle function (its events are written by the
-- function itself), until dispatch.fn_leave(). They return set_config's text so that the planner
-- inlines them (a void SQL function is run by the function executor: about 17 us a call).
CREATE FUNCTION dispatch.fn_enter() RETURNS text
LANGUAGE sql AS $$ SELECT set_config('dispatch.via', 'fn', true) $$;

CREATE FUNCTION dispatch.fn_leave() RETURNS text
LANGUAGE sql AS $$ SELECT set_config('dispatch.via', '', true) $$;

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
    IF NEW.approval IS NOT NULL AND NEW.approval NOT IN ('before_start', 'review', 'both') THEN
        RAISE EXCEPTION 'approval must be before_start, review or both (got %)', left(NEW.approval, 40)
            USING ERRCODE = 'UD400', COLUMN = 'approval';
    END IF;
    IF NEW.owner IS NOT NULL AND char_length(NEW.owner) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION 'owner must be 1 to 256 characters, or NULL for a task any eligible agent may run'
            USING ERRCODE = 'UD400', COLUMN = 'owner';
    END IF;
    IF char_length(NEW.idempotency_key) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'idempotency_key must be 1 to 200 characters, or NULL'
            USING ERRCODE = 'UD400', COLUMN = 'idempotency_key';
    END IF;
    IF octet_length(NEW.waiting_for) > 65536 THEN
        RAISE EXCEPTION 'waiting_for must be at most 64 KiB'
            USING ERRCODE = 'UD400', COLUMN = 'waiting_for';
    END IF;
    IF octet_length(NEW.feedback) > 65536 THEN
        RAISE EXCEPTION 'feedback must be at most 64 KiB'
            USING ERRCODE = 'UD400', COLUMN = 'feedback';
    END IF;
    IF octet_length(NEW.trace_context::text) > 1024 THEN
        RAISE EXCEPTION 'trace_context must be at most 1 KiB as JSON text'
            USING ERRCODE = 'UD400', COLUMN = 'trace_context';
    END IF;
    IF NEW.timeout_seconds IS NULL THEN
        SELECT * INTO c FROM dispatch.config;
        NEW.timeout_seconds := c.default_timeout_seconds;
    END IF;
    IF NEW.required_capabilities IS DISTINCT FROM '{}' THEN  -- most tasks require none
        NEW.required_capabilities := dispatch.normalize_capabilities(NEW.required_capabilities);
    END IF;
    NEW.requester := coalesce(NEW.requester, dispatch.session_actor());
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
    -- Payload 'created': new work and nothing else (no room freed), which an assigner that
    -- found every agent full may leave to its tick; every other dispatch_work may free room.
    IF current_setting('dispatch.announce', true) IS DISTINCT FROM 'caller' THEN
        PERFORM pg_notify('dispatch_work', 'created');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_after_insert AFTER INSERT ON dispatch.tasks
    FOR EACH ROW EXECUTE FUNCTION dispatch.tasks_after_insert();

-- An agent's active tasks (assigned or running), counted now (tasks_active_agent_idx).
CREATE FUNCTION dispatch.agent_active(p_agent_id text) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT count(*)::integer FROM dispatch.tasks t
    WHERE t.assigned_agent = p_agent_id AND t.status IN ('assigned', 'running')
$$;

-- The agent's concurrency limit is a set of slots, 1 .. its limit; each active task holds one
-- (tasks.slot). Whoever gives work takes free slots for it, each under a transaction-level
-- advisory lock (key: the agent's hash and the slot number), tried without waiting: two claims of
-- one agent, or a claim and the assigner, take different slots and never wait for each other,
-- and nothing counts the agent's load on its row, so no completion, claim or give queues on a row
-- shared by other tasks. The lock is held to the commit, when the task holding the slot is
-- visible; a slot is free when no active task of the agent holds it, read by a statement after
-- the lock was granted (so it sees whoever held the lock before). A hash shared by two agents only
-- makes a slot look taken a little longer. Returns up to p_want slots, fewer when the agent has
-- fewer free (its active tasks counted too, so that one given a slot outside 1 .. p_limit by
-- plain SQL still counts).
CREATE FUNCTION dispatch.slots_take(p_agent_id text, p_want integer, p_limit integer)
RETURNS integer[]
LANGUAGE plpgsql AS $$
DECLARE
    k    integer := hashtext(p_agent_id);
    held integer[];
    got  integer[] := '{}';
    want integer;
BEGIN
    held := ARRAY(SELECT t.slot FROM dispatch.tasks t
                  WHERE t.assigned_agent = p_agent_id AND t.status IN ('assigned', 'running'));
    want := least(p_want, p_limit - cardinality(held));
    IF want <= 0 THEN
        RETURN got;
    END IF;
    FOR s IN 1 .. p_limit LOOP
        CONTINUE WHEN s = ANY (held);
        IF pg_try_advisory_xact_lock(k, s) THEN
            got := got || s;
            EXIT WHEN cardinality(got) = want;
        END IF;
    END LOOP;
    -- Taken by a transaction that committed between the first look and the lock.
    RETURN ARRAY(SELECT g FROM unnest(got) g
                 WHERE NOT EXISTS (SELECT 1 FROM dispatch.tasks t
                                   WHERE t.assigned_agent = p_agent_id AND t.slot = g
                                     AND t.status IN ('assigned', 'running'))
                 ORDER BY g);
END
$$;

-- The new tasks of this transaction are announced by its caller, which wakes an assigner itself
-- once the transaction has committed (a replica's API announces it to its `serve`, whose
-- chosen assigner wakes: Listener.announce): no NOTIFY
-- dispatch_work 'created' for them, which would cost the listener of every replica a transaction
-- of its own. Transaction-local (dispatch.task_create's announce).
CREATE FUNCTION dispatch.announce_by_caller() RETURNS text
LANGUAGE sql AS $$
    SELECT set_config('dispatch.announce', 'caller', true)
$$;

-- A completion or failure whose agent claims its next tasks in the same transaction
-- (dispatch.task_then_claim passes p_refill): the slot it frees is announced by that claim, and
-- only when it takes nothing (dispatch.task_claim_next). When it takes a task the agent's room is
-- what it was, and a NOTIFY would cost every replica's listener a transaction and its assigner a
-- round for nothing. Transaction-local; every completion and failure sets it. Returns
-- set_config's text so that the planner inlines it, as dispatch.fn_enter.
CREATE FUNCTION dispatch.refill_promise(p_agent_id text, p_refill boolean) RETURNS text
LANGUAGE sql AS $$
    SELECT set_config('dispatch.refill', CASE WHEN p_refill THEN p_agent_id ELSE '' END, true)
$$;

-- Guards every status change; work given by raw SQL takes a slot of its agent here (the
-- functions take theirs before they give). Status changes made by raw SQL
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
        -- A claim that starts what it takes (dispatch.tasks_give) writes pending -> running at
        -- once, with both events; from plain SQL the task goes through assigned.
        IF NOT dispatch.status_edge_allowed(OLD.status, NEW.status)
           AND NOT (NOT via_sql AND OLD.status = 'pending' AND NEW.status = 'running') THEN
            RAISE EXCEPTION 'illegal task status transition from % to % (task %)',
                OLD.status, NEW.status, OLD.task_id
                USING ERRCODE = 'UD409',
                      HINT = 'the lifecycle: pending -> assigned -> running -> completed | failed | timed_out; '
                             'pending -> completed (manual); pending | assigned | running -> cancelled; '
                             'failed | timed_out | cancelled -> pending (requeue); blocked -> pending '
                             'when its dependencies complete and it is approved; assigned | running '
                             '-> review -> completed | pending (dispatch.task_accept, '
                             'task_request_changes); running -> suspended -> assigned | pending '
                             '(dispatch.task_suspend, task_signal). '
                             'Use the dispatch.* functions (dispatch.cancel_task, dispatch.requeue_task).';
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
    -- A slot is free. Announced even with no task in line: one created meanwhile (not visible
    -- here) wakes a round that may still see this slot held, and only this notification makes
    -- the assigner look again once the slot is free (else the task waits for the tick). Left to
    -- the claim that follows in the same transaction when its agent promised one (refill_promise).
    IF was_active AND (NOT is_active OR NEW.assigned_agent IS DISTINCT FROM OLD.assigned_agent)
       AND (NEW.status = 'pending'
            OR current_setting('dispatch.refill', true) IS DISTINCT FROM OLD.assigned_agent)
    THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    -- Work given by plain SQL takes a slot: the first free one, past the agent's limit if it must
    -- (whoever gives by hand decides); the task still counts against the limit.
    IF is_active AND (NOT was_active OR NEW.assigned_agent IS DISTINCT FROM OLD.assigned_agent)
       AND via_sql THEN
        NEW.slot := (dispatch.slots_take(NEW.assigned_agent, 1, 2147483647))[1];
    END IF;
    IF NEW.status = 'pending' AND OLD.status <> 'pending' AND via_sql THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    RETURN NEW;
END
$$;

-- Not called for a change a lifecycle function makes (dispatch.via 'fn': the function checked
-- the edge and writes the event) unless that change frees a slot to announce, or would move
-- updated_at back: so never for a give, a start or a completion whose agent's claim follows in
-- the same transaction (refill_promise), which are most of a task's writes.
CREATE TRIGGER tasks_before_update BEFORE UPDATE OF status, assigned_agent ON dispatch.tasks
    FOR EACH ROW WHEN (current_setting('dispatch.via', true) IS DISTINCT FROM 'fn'
                       OR NEW.updated_at < OLD.updated_at
                       OR (OLD.status IN ('assigned', 'running')
                           AND (NEW.status NOT IN ('assigned', 'running')
                                OR NEW.assigned_agent IS DISTINCT FROM OLD.assigned_agent)
                           AND (NEW.status = 'pending'
                                OR current_setting('dispatch.refill', true)
                                   IS DISTINCT FROM OLD.assigned_agent)))
    EXECUTE FUNCTION dispatch.tasks_before_update();

-- What the columns a task gets at its creation may hold, when an UPDATE writes one of them (from
-- psql too; no transition does, so an assignment or a completion never runs it). A new row's are
-- checked by tasks_before_insert and tasks_queue_place, with messages a psql user can act on. The
-- others' checks are CHECK constraints: 01_tables.sql says why. A rule broken raises what its
-- CHECK constraint raised before: check_violation, the same message, under the constraint's
-- name, naming the column. As in a CHECK constraint, a NULL passes, and the row checked is the
-- one the other BEFORE triggers left (they fire in name order: tasks_values_checked is the
-- last).
CREATE FUNCTION dispatch.tasks_values_checked() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    broken text;  -- the constraint
    col    text;  -- its column
BEGIN
    IF (char_length(NEW.title) BETWEEN 1 AND 500) IS FALSE THEN
        broken := 'tasks_title_length'; col := 'title';
    ELSIF (octet_length(NEW.description) <= 65536) IS FALSE THEN
        broken := 'tasks_description_length'; col := 'description';
    ELSIF (NEW.priority BETWEEN 0 AND 10) IS FALSE THEN
        broken := 'tasks_priority_range'; col := 'priority';
    ELSIF (NEW.max_retries BETWEEN 0 AND 100) IS FALSE THEN
        broken := 'tasks_max_retries_range'; col := 'max_retries';
    ELSIF (NEW.timeout_seconds > 0) IS FALSE THEN
        broken := 'tasks_timeout_positive'; col := 'timeout_seconds';
    ELSIF (NEW.heartbeat_seconds > 0) IS FALSE THEN
        broken := 'tasks_heartbeat_positive'; col := 'heartbeat_seconds';
    ELSIF (jsonb_typeof(NEW.metadata) = 'object') IS FALSE THEN
        broken := 'tasks_metadata_object'; col := 'metadata';
    ELSIF (char_length(NEW.idempotency_key) BETWEEN 1 AND 200) IS FALSE THEN
        broken := 'tasks_idempotency_key_length'; col := 'idempotency_key';
    ELSIF (char_length(NEW.concurrency_key) BETWEEN 1 AND 256) IS FALSE THEN
        broken := 'tasks_concurrency_key_length'; col := 'concurrency_key';
    ELSIF (char_length(NEW.rate_key) BETWEEN 1 AND 256) IS FALSE THEN
        broken := 'tasks_rate_key_length'; col := 'rate_key';
    ELSIF (NEW.cost BETWEEN 1 AND 1000000000) IS FALSE THEN
        broken := 'tasks_cost_range'; col := 'cost';
    ELSIF (NEW.approval IN ('before_start', 'review', 'both')) IS FALSE THEN
        broken := 'tasks_approval_kind'; col := 'approval';
    ELSIF (octet_length(NEW.waiting_for) <= 65536) IS FALSE THEN
        broken := 'tasks_waiting_for_length'; col := 'waiting_for';
    ELSIF (octet_length(NEW.feedback) <= 65536) IS FALSE THEN
        broken := 'tasks_feedback_length'; col := 'feedback';
    ELSIF (octet_length(NEW.trace_context::text) <= 1024) IS FALSE THEN
        broken := 'tasks_trace_context_size'; col := 'trace_context';
    ELSE
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'new row for relation "tasks" violates check constraint "%"', broken
        USING ERRCODE = 'check_violation', CONSTRAINT = broken, COLUMN = col,
              SCHEMA = 'dispatch', TABLE = 'tasks';
END
$$;

CREATE TRIGGER tasks_values_checked
    BEFORE UPDATE OF title, description, priority, max_retries, timeout_seconds,
                               heartbeat_seconds, metadata, idempotency_key, concurrency_key,
                               rate_key, cost, approval, waiting_for, feedback, trace_context
    ON dispatch.tasks FOR EACH ROW EXECUTE FUNCTION dispatch.tasks_values_checked();
