-- The baseline: the schema of the first release (0.1.0), frozen. Never edit this file: a change
-- to the schema is a new migration here and the same change in ../schema/, and
-- tests/db/test_schema.py checks that the two build the same catalog.

-- ---- schema/01_tables.sql at 0.1.0

-- Tables: tasks, their event log (history and outbox), the agent directory, the settings row.
-- The migrator creates the schema `dispatch` and dispatch.schema_migrations before these files run.
-- Every timestamp a row holds lies in this range, so that every client (Python's datetime ends at
-- year 9999, a deadline's epoch travels in a NOTIFY) can read it back. Checked by constraint, so a
-- value outside it is refused before anything is written, from psql too.
CREATE FUNCTION dispatch.time_in_range(t timestamptz) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT t IS NULL OR (t >= '1970-01-01 00:00:00+00' AND t < '9999-01-01 00:00:00+00')
$$;

CREATE TYPE dispatch.task_status AS ENUM (
    'pending', 'assigned', 'running', 'completed', 'failed', 'timed_out', 'cancelled'
);

CREATE TYPE dispatch.agent_status AS ENUM (
    'ready', 'sleeping', 'busy', 'degraded', 'stopped', 'unknown'
);

-- Flow control (08_flow.sql): what an assigning transaction knows of the flow limits it has met.
-- Each concurrency key's cap and the tasks it counts as active (those active when the key was
-- first read, plus what this transaction has taken since); each rate key's bucket and the tokens
-- left in it. Each key is read once per state, so a walk past many tasks of one key counts its
-- active tasks once, not once per task. reason/until: the verdict of the last flow_admit (reason
-- NULL: admitted).
CREATE TYPE dispatch.flow_state AS (
    ckeys   text[],
    cmax    integer[],  -- NULL: the key has no cap
    cused   integer[],
    rkeys   text[],
    rcap    float8[],   -- NULL: the key has no bucket
    rrefill float8[],
    rtokens float8[],
    reason  text,
    until   timestamptz, -- for a rate limit: when its bucket will hold the task's cost
    capped  boolean      -- the reason is the task's concurrency key at its cap
);

-- One row of settings that the SQL functions read, written by `dispatch serve` at start-up from its
-- configuration, so that psql callers get exactly the behaviour of the API.
CREATE TABLE dispatch.config (
    singleton                boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    default_timeout_seconds  integer NOT NULL DEFAULT 300 CHECK (default_timeout_seconds > 0),
    max_concurrent_per_agent integer NOT NULL DEFAULT 3 CHECK (max_concurrent_per_agent > 0),
    owner_filter_enabled     boolean NOT NULL DEFAULT true,
    retry_backoff_ms         integer NOT NULL DEFAULT 1000 CHECK (retry_backoff_ms >= 0),
    retry_backoff_max_ms     integer NOT NULL DEFAULT 300000 CHECK (retry_backoff_max_ms >= 0),
    wake_timeout_ms          integer NOT NULL DEFAULT 30000 CHECK (wake_timeout_ms > 0),
    unmatched_repeat_ms      integer NOT NULL DEFAULT 600000 CHECK (unmatched_repeat_ms > 0),
    -- The reapers wake at least this often: a deadline further away needs no NOTIFY.
    tick_interval_ms         integer NOT NULL DEFAULT 5000 CHECK (tick_interval_ms > 0),
    -- Whether an event relay runs (a replica with NATS configured turns it on at start-up): new
    -- event rows NOTIFY dispatch_events only then.
    events_notify            boolean NOT NULL DEFAULT false,
    -- While a replica serves open dashboards (/ui) it keeps moving this a minute ahead: new event
    -- rows NOTIFY dispatch_events until then too, and with no dashboard open it lapses by itself.
    ui_notify_until          timestamptz CHECK (dispatch.time_in_range(ui_notify_until)),
    -- Priority aging (flow control, 08_flow.sql): a pending task's effective priority rises one
    -- level per aging_ms of waiting, up to 10; 0 turns aging off.
    aging_ms                 integer NOT NULL DEFAULT 300000 CHECK (aging_ms >= 0),
    updated_at               timestamptz NOT NULL DEFAULT now()
);

INSERT INTO dispatch.config DEFAULT VALUES;

-- An agent id (also the X-Agent-ID of any caller): 1-128 of [A-Za-z0-9._:@/-], and no
-- /-separated segment may be `.` or `..`: clients put the id in URL paths
-- (/api/v1/agents/{id}), where such a segment means "this" or "the parent" path.
CREATE FUNCTION dispatch.agent_id_valid(p_agent_id text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_agent_id ~ '^[A-Za-z0-9._:@/-]{1,128}$' AND p_agent_id !~ '(^|/)\.\.?(/|$)'
$$;

CREATE TABLE dispatch.agents (
    agent_id         text PRIMARY KEY
                     CONSTRAINT agents_agent_id_format CHECK (dispatch.agent_id_valid(agent_id)),
    capabilities     text[] NOT NULL DEFAULT '{}',
    owner            text,
    status           dispatch.agent_status NOT NULL DEFAULT 'ready',
    policy           text,
    -- NULL means dispatch.config.max_concurrent_per_agent.
    max_concurrent   integer CONSTRAINT agents_max_concurrent_range
                     CHECK (max_concurrent BETWEEN 1 AND 1000),
    drained          boolean NOT NULL DEFAULT false,
    source           text NOT NULL DEFAULT 'registry',
    -- The agent row is the concurrency semaphore: active_count is kept equal to the number of its
    -- assigned + running tasks by the status trigger on dispatch.tasks, under this row's lock.
    active_count     integer NOT NULL DEFAULT 0,
    last_assigned_at timestamptz,
    last_seen_at     timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT agents_times_range CHECK (
        dispatch.time_in_range(last_assigned_at) AND dispatch.time_in_range(last_seen_at)
        AND dispatch.time_in_range(created_at) AND dispatch.time_in_range(updated_at))
);

-- Device ownership (Alexandria): agent_id belongs to owner.
CREATE TABLE dispatch.agent_owners (
    agent_id   text NOT NULL,
    owner      text NOT NULL,
    source     text NOT NULL DEFAULT 'alexandria',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, owner)
);

CREATE TABLE dispatch.tasks (
    task_id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    title                 text NOT NULL
                          CONSTRAINT tasks_title_length CHECK (char_length(title) BETWEEN 1 AND 500),
    description           text NOT NULL DEFAULT ''
                          CONSTRAINT tasks_description_length CHECK (octet_length(description) <= 65536),
    requester             text NOT NULL,
    -- NULL: not owner-scoped (any eligible agent); set: only that owner's agents (owner filter).
    owner                 text,
    source                text NOT NULL,
    required_capabilities text[] NOT NULL DEFAULT '{}',
    priority              integer NOT NULL DEFAULT 0
                          CONSTRAINT tasks_priority_range CHECK (priority BETWEEN 0 AND 10),
    status                dispatch.task_status NOT NULL DEFAULT 'pending',
    assigned_agent        text,
    previous_agents       text[] NOT NULL DEFAULT '{}',
    retry_count           integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    -- The number of the current (or last) assignment, raised by each one. Reports may present
    -- it: a report naming an earlier assignment is stale, even from the same agent.
    lease                 integer NOT NULL DEFAULT 0 CHECK (lease >= 0),
    max_retries           integer NOT NULL DEFAULT 3
                          CONSTRAINT tasks_max_retries_range CHECK (max_retries BETWEEN 0 AND 100),
    timeout_seconds       integer NOT NULL
                          CONSTRAINT tasks_timeout_positive CHECK (timeout_seconds > 0),
    heartbeat_seconds     integer
                          CONSTRAINT tasks_heartbeat_positive CHECK (heartbeat_seconds > 0),
    available_at          timestamptz NOT NULL DEFAULT now()
                          CONSTRAINT tasks_available_at_range CHECK (dispatch.time_in_range(available_at)),
    deadline_at           timestamptz,
    -- Set when the assigned agent was asleep: it must start before this or the task goes back.
    wake_deadline_at      timestamptz,
    metadata              jsonb NOT NULL DEFAULT '{}'
                          CONSTRAINT tasks_metadata_object CHECK (jsonb_typeof(metadata) = 'object'),
    progress              jsonb,
    result                jsonb,
    error                 text,
    parent_task_id        uuid REFERENCES dispatch.tasks (task_id) ON DELETE SET NULL,
    idempotency_key       text CONSTRAINT tasks_idempotency_key_length
                          CHECK (char_length(idempotency_key) BETWEEN 1 AND 200),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    assigned_at           timestamptz,
    started_at            timestamptz,
    last_progress_at      timestamptz,
    completed_at          timestamptz,
    -- Flow control (08_flow.sql): at most concurrency_limits.max_active tasks of one
    -- concurrency_key are active at once; a task with a rate_key takes `cost` tokens from that
    -- key's bucket when it is assigned.
    concurrency_key       text CONSTRAINT tasks_concurrency_key_length
                          CHECK (char_length(concurrency_key) BETWEEN 1 AND 256),
    rate_key              text CONSTRAINT tasks_rate_key_length
                          CHECK (char_length(rate_key) BETWEEN 1 AND 256),
    cost                  integer NOT NULL DEFAULT 1
                          CONSTRAINT tasks_cost_range CHECK (cost BETWEEN 1 AND 1000000000),
    -- The task's place in the pending queue, kept by the tasks_queue_place trigger and the aging
    -- sweep (dispatch.queue_age): its effective priority (priority, raised by aging), the instant
    -- it queues at (available_at, or later when its tenant already has tasks waiting at this
    -- priority: fair share) and when it next ages.
    queue_priority        integer NOT NULL DEFAULT 0,
    queue_at              timestamptz NOT NULL DEFAULT now(),
    age_due_at            timestamptz,
    -- A pending task that its concurrency key's cap holds back is parked out of the walk
    -- (tasks_pending_order_idx) until a task of its key ends (08_flow.sql).
    parked                boolean NOT NULL DEFAULT false,
    CONSTRAINT tasks_times_range CHECK (
        dispatch.time_in_range(deadline_at) AND dispatch.time_in_range(wake_deadline_at)
        AND dispatch.time_in_range(created_at) AND dispatch.time_in_range(updated_at)
        AND dispatch.time_in_range(assigned_at) AND dispatch.time_in_range(started_at)
        AND dispatch.time_in_range(last_progress_at) AND dispatch.time_in_range(completed_at)
        AND dispatch.time_in_range(queue_at) AND dispatch.time_in_range(age_due_at))
);

-- The hot path. Only pending rows are in these two, only active rows in the third, so they stay
-- small however long the history grows. Progress/heartbeat columns are in no index: progress
-- reports are HOT updates.
--
-- The claim and the assigner walk the pending rows in this order (effective priority, then the
-- place in line that fair share gave each task) and stop when they have enough. Parked rows are
-- left out, so a deep backlog that a concurrency key holds back is not read on every walk.
CREATE INDEX tasks_pending_order_idx ON dispatch.tasks (queue_priority DESC, queue_at)
    WHERE status = 'pending' AND NOT parked;

-- The parked rows of a key, in the order they come back.
CREATE INDEX tasks_parked_idx ON dispatch.tasks (concurrency_key, queue_priority DESC, queue_at)
    WHERE status = 'pending' AND parked;

-- Fair share: the last place in line a tenant (owner, else requester) holds at a priority.
CREATE INDEX tasks_pending_tenant_idx ON dispatch.tasks
    ((coalesce(owner, requester)), priority, queue_at) WHERE status = 'pending';

-- Aging: the pending tasks whose effective priority is due to rise next.
CREATE INDEX tasks_pending_aging_idx ON dispatch.tasks (age_due_at)
    WHERE status = 'pending' AND age_due_at IS NOT NULL;

-- Pending rows whose availability was moved past their creation (scheduled, retried, reassigned,
-- requeued): next_due finds the next one to become available. Only those rows, on purpose: an
-- index over every pending row by available_at would offer the claim a second way in (read all
-- available rows, then sort them), one the planner takes when its statistics are stale.
CREATE INDEX tasks_pending_deferred_idx ON dispatch.tasks (available_at)
    WHERE status = 'pending' AND available_at > created_at;

CREATE INDEX tasks_active_deadline_idx ON dispatch.tasks (deadline_at)
    WHERE status IN ('assigned', 'running');

-- A concurrency limit set on a key that already has active tasks starts from their count.
CREATE INDEX tasks_active_concurrency_idx ON dispatch.tasks (concurrency_key)
    WHERE status IN ('assigned', 'running') AND concurrency_key IS NOT NULL;

-- Retention, stats over the last hour and the dead-letter listing read terminal rows by time.
CREATE INDEX tasks_terminal_completed_idx ON dispatch.tasks (completed_at)
    WHERE status IN ('completed', 'failed', 'timed_out', 'cancelled');

-- The dead letters (failed for good or timed out), counted by the stats without reading the
-- rest of the history. Rows enter it only when a task ends that way.
CREATE INDEX tasks_dead_letter_idx ON dispatch.tasks (completed_at)
    WHERE status IN ('failed', 'timed_out');

CREATE UNIQUE INDEX tasks_idempotency_key_idx ON dispatch.tasks (requester, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE INDEX tasks_parent_idx ON dispatch.tasks (parent_task_id)
    WHERE parent_task_id IS NOT NULL;

-- History and transactional outbox in one: written in the transaction that makes the change.
CREATE TABLE dispatch.task_events (
    id           bigserial PRIMARY KEY,
    task_id      uuid NOT NULL REFERENCES dispatch.tasks (task_id) ON DELETE CASCADE,
    event        text NOT NULL,
    actor        text NOT NULL,
    payload      jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    -- Set (with published_at) when the relay gave up on the event: NATS refused it for good.
    relay_error  text,
    CONSTRAINT task_events_times_range CHECK (
        dispatch.time_in_range(created_at) AND dispatch.time_in_range(published_at))
);

CREATE INDEX task_events_task_idx ON dispatch.task_events (task_id, id);

CREATE INDEX task_events_unpublished_idx ON dispatch.task_events (id) WHERE published_at IS NULL;

-- ---- schema/02_guards.sql at 0.1.0

-- Guards: the lifecycle's edges, the triggers that reject any other status change (from raw SQL
-- too), and the event row + NOTIFY written in the transaction of every change. The transitions
-- themselves are in 03_transitions.sql, one function each.
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
CREATE FUNCTION dispatch.normalize_capabilities(caps text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(DISTINCT c ORDER BY c), '{}')
    FROM (SELECT lower(btrim(x)) AS c FROM unnest(caps) AS x) s
    WHERE c IS NOT NULL AND c <> ''
$$;

-- Who the session is, for the actor of events written from raw SQL.
CREATE FUNCTION dispatch.session_actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('dispatch.actor', true), ''), session_user::text)
$$;

CREATE FUNCTION dispatch.event_write(
    p_task_id uuid, p_event text, p_actor text, p_payload jsonb, p_now timestamptz
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dispatch.task_events (task_id, event, actor, payload, created_at)
    VALUES (p_task_id, p_event, p_actor, coalesce(p_payload, '{}'), p_now);
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
        WHEN 'pending'   THEN new_status IN ('assigned', 'completed', 'cancelled')
        WHEN 'assigned'  THEN new_status IN ('running', 'completed', 'failed', 'timed_out',
                                             'pending', 'cancelled')
        WHEN 'running'   THEN new_status IN ('completed', 'failed', 'timed_out', 'pending',
                                             'cancelled')
        WHEN 'failed'    THEN new_status = 'pending'
        WHEN 'timed_out' THEN new_status = 'pending'
        WHEN 'cancelled' THEN new_status = 'pending'
        ELSE false
    END
$$;

-- Marks the current transaction as inside a lifecycle function (its events are written by the
-- function itself), until dispatch.fn_leave().
CREATE FUNCTION dispatch.fn_enter() RETURNS void
LANGUAGE sql AS $$ SELECT set_config('dispatch.via', 'fn', true) $$;

CREATE FUNCTION dispatch.fn_leave() RETURNS void
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
    IF NEW.owner IS NOT NULL AND char_length(NEW.owner) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION 'owner must be 1 to 256 characters, or NULL for a task any eligible agent may run'
            USING ERRCODE = 'UD400', COLUMN = 'owner';
    END IF;
    IF NEW.timeout_seconds IS NULL THEN
        SELECT * INTO c FROM dispatch.config;
        NEW.timeout_seconds := c.default_timeout_seconds;
    END IF;
    NEW.required_capabilities := dispatch.normalize_capabilities(NEW.required_capabilities);
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
    PERFORM pg_notify('dispatch_work', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_after_insert AFTER INSERT ON dispatch.tasks
    FOR EACH ROW EXECUTE FUNCTION dispatch.tasks_after_insert();

-- Guards every status change and keeps each agent's active_count. Status changes made by raw SQL
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
        IF NOT dispatch.status_edge_allowed(OLD.status, NEW.status) THEN
            RAISE EXCEPTION 'illegal task status transition from % to % (task %)',
                OLD.status, NEW.status, OLD.task_id
                USING ERRCODE = 'UD409',
                      HINT = 'the lifecycle: pending -> assigned -> running -> completed | failed | timed_out; '
                             'pending -> completed (manual); pending | assigned | running -> cancelled; '
                             'failed | timed_out | cancelled -> pending (requeue). '
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
    IF was_active AND (NOT is_active OR NEW.assigned_agent IS DISTINCT FROM OLD.assigned_agent) THEN
        UPDATE dispatch.agents SET active_count = greatest(active_count - 1, 0)
        WHERE agent_id = OLD.assigned_agent;
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    IF is_active AND (NOT was_active OR NEW.assigned_agent IS DISTINCT FROM OLD.assigned_agent) THEN
        UPDATE dispatch.agents
        SET active_count = active_count + 1,
            last_assigned_at = coalesce(NEW.assigned_at, now())
        WHERE agent_id = NEW.assigned_agent;
    END IF;
    IF NEW.status = 'pending' AND OLD.status <> 'pending' AND via_sql THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_before_update BEFORE UPDATE OF status, assigned_agent ON dispatch.tasks
    FOR EACH ROW EXECUTE FUNCTION dispatch.tasks_before_update();

-- ---- schema/03_transitions.sql at 0.1.0

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

-- Takes an active task away from its agent without blaming a failure on it (wake timeout, agent
-- stopped). It still counts as an attempt, so nothing bounces forever.
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
    UPDATE dispatch.tasks
    SET status = 'pending', retry_count = t.retry_count + 1, available_at = p_now,
        previous_agents = CASE WHEN t.assigned_agent = ANY (t.previous_agents)
                               THEN t.previous_agents
                               ELSE t.previous_agents || t.assigned_agent END,
        assigned_agent = NULL, deadline_at = NULL, wake_deadline_at = NULL, updated_at = p_now
    WHERE task_id = t.task_id
    RETURNING * INTO r;
    PERFORM dispatch.event_write(t.task_id, 'reassigned', 'dispatch',
        jsonb_build_object('previous_agent', t.assigned_agent, 'reason', p_reason), p_now);
    PERFORM pg_notify('dispatch_work', '');
    RETURN r;
END
$$;

CREATE FUNCTION dispatch.task_start(
    p_task_id uuid, p_agent_id text, p_now timestamptz DEFAULT now(), p_lease integer DEFAULT NULL
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    PERFORM dispatch.task_fence(t, p_agent_id, p_lease);
    IF t.status = 'running' THEN
        RETURN t;   -- a repeated start changes nothing
    END IF;
    PERFORM dispatch.task_require_status(t, 'assigned');
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks
    SET status = 'running', started_at = p_now, last_progress_at = p_now,
        wake_deadline_at = NULL, updated_at = p_now
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'started', p_agent_id,
        jsonb_build_object('assigned_agent', p_agent_id), p_now);
    PERFORM dispatch.fn_leave();
    RETURN t;
END
$$;

CREATE FUNCTION dispatch.task_progress(
    p_task_id uuid, p_agent_id text, p_percent real DEFAULT NULL, p_message text DEFAULT NULL,
    p_data jsonb DEFAULT NULL, p_now timestamptz DEFAULT now(), p_lease integer DEFAULT NULL
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
    p jsonb;
BEGIN
    IF p_percent IS NOT NULL AND NOT (p_percent BETWEEN 0 AND 100) THEN
        RAISE EXCEPTION 'percent must be between 0 and 100 (got %)', p_percent
            USING ERRCODE = 'UD400', COLUMN = 'percent';
    END IF;
    PERFORM dispatch.task_fence(t, p_agent_id, p_lease);
    PERFORM dispatch.task_require_status(t, 'assigned', 'running');
    IF t.status = 'assigned' THEN
        t := dispatch.task_start(p_task_id, p_agent_id, p_now);
    END IF;
    p := jsonb_strip_nulls(jsonb_build_object('percent', p_percent, 'message', p_message,
                                              'data', p_data));
    PERFORM dispatch.fn_enter();
    -- Only unindexed columns change: a HOT update.
    UPDATE dispatch.tasks
    SET progress = p, last_progress_at = p_now, updated_at = p_now
    WHERE task_id = p_task_id
    RETURNING * INTO t;
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
    p_now timestamptz DEFAULT now(), p_lease integer DEFAULT NULL
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
    holder text := t.assigned_agent;
    manual boolean;
BEGIN
    IF t.status = 'completed' AND p_actor = t.assigned_agent THEN
        PERFORM dispatch.task_fence(t, p_actor, p_lease);
        RETURN t;
    END IF;
    manual := dispatch.task_is_resolver(t, p_actor, p_admin)
              AND p_actor IS DISTINCT FROM t.assigned_agent;
    IF manual THEN
        PERFORM dispatch.task_require_status(t, 'pending', 'assigned', 'running');
    ELSE
        PERFORM dispatch.task_fence(t, p_actor, p_lease);
        PERFORM dispatch.task_require_status(t, 'assigned', 'running');
    END IF;
    PERFORM dispatch.fn_enter();
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
    p_lease integer DEFAULT NULL
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
BEGIN
    PERFORM dispatch.task_fence(t, p_agent_id, p_lease);
    PERFORM dispatch.task_require_status(t, 'assigned', 'running');
    PERFORM dispatch.fn_enter();
    PERFORM dispatch.event_write(p_task_id, 'failed', p_agent_id,
        jsonb_build_object('assigned_agent', p_agent_id, 'error', p_error,
                           'retry_eligible', coalesce(p_retry_eligible, true)), p_now);
    t := dispatch.task_end_attempt(t, 'failed', p_error, coalesce(p_retry_eligible, true), p_now);
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
    FOR t IN
        SELECT * FROM dispatch.tasks tk
        WHERE tk.status IN ('assigned', 'running')
          AND (tk.deadline_at <= p_now
               OR (tk.status = 'assigned' AND tk.wake_deadline_at <= p_now)
               OR tk.heartbeat_seconds IS NOT NULL
                  AND coalesce(tk.last_progress_at, tk.started_at, tk.assigned_at)
                      + make_interval(secs => tk.heartbeat_seconds) <= p_now)
        ORDER BY tk.deadline_at
        LIMIT p_limit
        FOR NO KEY UPDATE SKIP LOCKED
    LOOP
        -- The end of an attempt updates its agent's row. When another session holds that row (a
        -- claim in flight, or a psql session left open), this task waits for the next round and
        -- the round goes on: waiting would hold every other expiry back, and past lock_timeout
        -- it would fail the whole round.
        IF t.assigned_agent IS NOT NULL THEN
            PERFORM 1 FROM dispatch.agents ag WHERE ag.agent_id = t.assigned_agent
            FOR NO KEY UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND AND EXISTS (
                SELECT 1 FROM dispatch.agents ag WHERE ag.agent_id = t.assigned_agent);
        END IF;
        IF t.status = 'assigned' AND t.wake_deadline_at <= p_now AND t.deadline_at > p_now THEN
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
    -- Flow control's sweep (08_flow.sql): parked tasks whose key has room go back in line.
    PERFORM dispatch.flow_unpark();
END
$$;

-- The next instant at which the reaper or the assigner has something to do (a deadline, a heartbeat
-- or wake timeout, a scheduled or backed-off task becoming available); NULL when nothing is known.
CREATE FUNCTION dispatch.next_due(p_now timestamptz DEFAULT now()) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT least(
        (SELECT min(least(tk.deadline_at,
                          CASE WHEN tk.status = 'assigned' THEN tk.wake_deadline_at END,
                          coalesce(tk.last_progress_at, tk.started_at, tk.assigned_at)
                              + make_interval(secs => tk.heartbeat_seconds)))
         FROM dispatch.tasks tk WHERE tk.status IN ('assigned', 'running')),
        (SELECT min(tk.available_at) FROM dispatch.tasks tk
         WHERE tk.status = 'pending' AND tk.available_at > tk.created_at
           AND tk.available_at > p_now))
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
    PERFORM dispatch.task_require_status(t, 'pending', 'assigned', 'running');
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

-- Dead-letter requeue (admin): a failed, timed-out or cancelled task starts over.
CREATE FUNCTION dispatch.task_requeue(
    p_task_id uuid, p_actor text, p_now timestamptz DEFAULT now()
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t dispatch.tasks := dispatch.task_lock(p_task_id);
    previous dispatch.task_status := t.status;
BEGIN
    PERFORM dispatch.task_require_status(t, 'failed', 'timed_out', 'cancelled');
    PERFORM dispatch.fn_enter();
    UPDATE dispatch.tasks
    SET status = 'pending', retry_count = 0, assigned_agent = NULL, available_at = p_now,
        deadline_at = NULL, wake_deadline_at = NULL, completed_at = NULL,
        updated_at = p_now
    WHERE task_id = p_task_id
    RETURNING * INTO t;
    PERFORM dispatch.event_write(p_task_id, 'requeued', p_actor,
        jsonb_build_object('previous_status', previous), p_now);
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
CREATE FUNCTION dispatch.task_report_batch(
    p_agent_id text, p_reports jsonb, p_admin boolean DEFAULT false, p_now timestamptz DEFAULT now()
) RETURNS TABLE (ord integer, status integer, error text, field text, task jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    r    jsonb;
    id    uuid;
    lease integer;
    t     dispatch.tasks;
    code  text;
BEGIN
    IF jsonb_typeof(p_reports) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'reports must be a JSON array' USING ERRCODE = 'UD400', COLUMN = 'reports';
    END IF;
    FOR r, ord IN SELECT x.e, x.n::integer FROM jsonb_array_elements(p_reports)
                  WITH ORDINALITY AS x (e, n) LOOP
        status := 200;
        error := NULL;
        field := NULL;
        task := NULL;
        id := NULL;
        BEGIN
            id := (r ->> 'task_id')::uuid;
            lease := (r ->> 'lease')::integer;
            CASE r ->> 'action'
                WHEN 'start' THEN
                    t := dispatch.task_start(id, p_agent_id, p_now, lease);
                WHEN 'progress' THEN
                    t := dispatch.task_progress(id, p_agent_id, (r ->> 'percent')::real,
                                                r ->> 'message', r -> 'data', p_now, lease);
                WHEN 'complete' THEN
                    t := dispatch.task_complete(id, p_agent_id, r -> 'result', p_admin, p_now,
                                                lease);
                WHEN 'fail' THEN
                    t := dispatch.task_fail(id, p_agent_id, r ->> 'error',
                                            coalesce((r ->> 'retry_eligible')::boolean, true), p_now,
                                            lease);
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

-- ---- schema/04_assignment.sql at 0.1.0

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

-- Every reason the agent may not take a task that requires p_required and belongs to p_owner (empty:
-- eligible): unavailable, capabilities not a superset of the requirement, or, when the task has an
-- owner and the owner filter is on, not the owner's. A previous agent of the task is eligible;
-- callers prefer the others.
CREATE FUNCTION dispatch.agent_ineligibility(
    a dispatch.agents, p_required text[], p_owner text, c dispatch.config,
    p_capacity boolean DEFAULT true
) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT dispatch.agent_unavailability(a, c, p_capacity) || array_remove(ARRAY[
        CASE WHEN NOT a.capabilities @> p_required
             THEN 'missing capabilities: ' || array_to_string(
                 dispatch.capabilities_missing(a.capabilities, p_required), ', ') END,
        CASE WHEN c.owner_filter_enabled AND p_owner IS NOT NULL
                  AND NOT dispatch.agent_belongs(a.agent_id, a.owner, p_owner)
             THEN dispatch.agent_owner_reason(a.agent_id, a.owner, p_owner) END
    ], NULL)
$$;

-- The walk of the pending queue that the claim, the assigner and the unmatched report share: the
-- pending, available rows in queue order (effective priority, then place in line: 08_flow.sql),
-- fetched one at a time through a cursor. A cursor is
-- planned for its first rows, so its natural plan reads tasks_pending_order_idx in order and stops
-- when the caller stops fetching: O(rows looked at), whatever the statistics say. (A single
-- statement with the eligibility rule in its WHERE and a LIMIT invites the planner, whenever its
-- statistics undercount the pending rows, to read all of them and sort.) Rows are not locked by the
-- walk; the caller locks the one it takes, SKIP LOCKED.
CREATE FUNCTION dispatch.pending_queue(p_now timestamptz)
RETURNS TABLE (task_id uuid, required_capabilities text[], owner text, previous_agents text[],
               concurrency_key text, rate_key text, cost integer)
LANGUAGE sql STABLE AS $$
    SELECT tk.task_id, tk.required_capabilities, tk.owner, tk.previous_agents,
           tk.concurrency_key, tk.rate_key, tk.cost
    FROM dispatch.tasks tk
    WHERE tk.status = 'pending' AND NOT tk.parked AND tk.available_at <= p_now
    ORDER BY tk.queue_priority DESC, tk.queue_at
$$;

-- Moves a locked pending task to an agent (assigner and pull claim share it; c is the config row
-- the caller already read). When the attempt's first deadline comes before the reapers' next
-- tick, it tells the reapers of every replica (channel dispatch_due, payload: the deadline's
-- epoch): a reaper sleeping past it wakes.
-- Identical payloads fold, so a batch with one short timeout sends one.
CREATE FUNCTION dispatch.task_give(
    t dispatch.tasks, a dispatch.agents, c dispatch.config, p_score real, p_mode text,
    p_now timestamptz
) RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    r     dispatch.tasks;
    first timestamptz;
BEGIN
    UPDATE dispatch.tasks
    SET status = 'assigned', assigned_agent = a.agent_id, assigned_at = p_now, lease = t.lease + 1,
        deadline_at = p_now + make_interval(secs => t.timeout_seconds),
        wake_deadline_at = CASE WHEN a.status = 'sleeping'
                                THEN p_now + make_interval(secs => c.wake_timeout_ms / 1000.0) END,
        started_at = NULL, last_progress_at = NULL, progress = NULL,
        updated_at = p_now
    WHERE task_id = t.task_id
    RETURNING * INTO r;
    PERFORM dispatch.event_write(t.task_id, 'assigned',
        CASE WHEN p_mode = 'claim' THEN a.agent_id ELSE 'dispatch' END,
        jsonb_build_object('assigned_agent', a.agent_id, 'score', p_score,
                           'attempt', t.retry_count + 1, 'lease', r.lease, 'mode', p_mode,
                           'wake', a.status = 'sleeping'), p_now);
    first := least(r.deadline_at, r.wake_deadline_at,
                   p_now + make_interval(secs => r.heartbeat_seconds));
    IF first < p_now + make_interval(secs => c.tick_interval_ms / 1000.0) THEN
        PERFORM pg_notify('dispatch_due', extract(epoch FROM first)::text);
    END IF;
    RETURN r;
END
$$;

-- Pull mode: assign the calling agent the best pending tasks it is eligible for, up to p_max and
-- the room under its limit, or nothing. With p_start they are started in the same transaction
-- (claim-and-start: one round trip instead of two). The agent must be registered (an unknown id
-- is refused: a claim is not a registration). p_capabilities, when given, narrows what the agent
-- takes now to those of its registered capabilities; it never widens them. Flow control: tasks
-- whose concurrency key or rate key holds them back are passed over, and flow_grant decides on
-- the tasks taken, under its locks.
CREATE FUNCTION dispatch.task_claim(
    p_agent_id text, p_capabilities text[] DEFAULT NULL, p_now timestamptz DEFAULT now(),
    p_max integer DEFAULT 1, p_start boolean DEFAULT false
) RETURNS SETOF dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    walk NO SCROLL CURSOR FOR SELECT * FROM dispatch.pending_queue(p_now);
    c     dispatch.config;
    a     dispatch.agents;
    t     dispatch.tasks;
    cand  record;
    room  integer;
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
BEGIN
    IF p_max IS NULL OR p_max NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'max_tasks must be between 1 and 100 (got %)', p_max
            USING ERRCODE = 'UD400', COLUMN = 'max_tasks';
    END IF;
    SELECT * INTO c FROM dispatch.config;
    UPDATE dispatch.agents ag
    SET last_seen_at = p_now,
        status = CASE WHEN ag.status IN ('unknown', 'stopped', 'sleeping')
                      THEN 'ready'::dispatch.agent_status ELSE ag.status END
    WHERE ag.agent_id = p_agent_id
    RETURNING * INTO a;     -- also locks the agent row: it is the semaphore
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % is not registered: register it first (PUT /api/v1/agents/%, or dispatch.agent_upsert)',
            p_agent_id, p_agent_id USING ERRCODE = 'UD404';
    END IF;
    IF cardinality(dispatch.agent_unavailability(a, c)) > 0 THEN
        RETURN;
    END IF;
    room := least(p_max, coalesce(a.max_concurrent, c.max_concurrent_per_agent) - a.active_count);
    IF c.aging_ms > 0 AND EXISTS (SELECT 1 FROM dispatch.tasks tk
                                  WHERE tk.status = 'pending' AND tk.age_due_at <= p_now) THEN
        PERFORM dispatch.queue_age(p_now, 10);
    END IF;
    IF p_capabilities IS NOT NULL THEN
        a.capabilities := ARRAY(
            SELECT x FROM unnest(dispatch.normalize_capabilities(p_capabilities)) x
            WHERE x = ANY (a.capabilities));
    END IF;
    OPEN walk;
    WHILE cardinality(taken) < room LOOP
        FETCH walk INTO cand;
        EXIT WHEN NOT FOUND;
        CONTINUE WHEN cardinality(dispatch.agent_ineligibility(
            a, cand.required_capabilities, cand.owner, c, false)) > 0;
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
        SELECT * INTO t FROM dispatch.tasks tk
        WHERE tk.task_id = cand.task_id AND tk.status = 'pending'
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
            WHERE tk.task_id = ANY (again) AND tk.status = 'pending'
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
    FOR i IN 1 .. cardinality(taken) LOOP
        CONTINUE WHEN ok[i] IS FALSE;
        PERFORM dispatch.fn_enter();
        t := dispatch.task_give(taken[i], a, c, dispatch.task_score(a, taken[i]), 'claim', p_now);
        PERFORM dispatch.fn_leave();
        IF p_start THEN
            t := dispatch.task_start(t.task_id, p_agent_id, p_now);
        END IF;
        RETURN NEXT t;
    END LOOP;
    IF refill IS NOT NULL THEN
        PERFORM dispatch.flow_wake(refill);
    END IF;
    IF cardinality(park) > 0 THEN
        PERFORM dispatch.flow_park(park);
    END IF;
END
$$;

-- The assigner, in two steps. Plan: walk the pending queue and pick each task's best eligible
-- agent from an unlocked snapshot of the agents that have room (counting the plan's own picks
-- against their room), locking each picked task (SKIP LOCKED: a claim or another replica has the
-- others). Apply: lock the picked agents' rows, in agent_id order, check each again as it is now,
-- and give it its tasks up to its room; a task whose agent can no longer take it stays pending.
-- An agent row (the semaphore) is held only from its lock to the commit, for the agents that get
-- work: claims and completions of other agents never wait for a round, and those of a picked
-- agent only for the gives; two replicas lock agents in the same order, so they cannot deadlock,
-- and active_count rises with each assignment, so the limit holds inside the round too.
-- Flow control: the plan passes over tasks whose concurrency key or rate key holds them back
-- (counting its own picks); the apply step, once every picked agent is locked and checked, has
-- flow_grant decide on the tasks with flow keys before it gives anything.
CREATE FUNCTION dispatch.task_assign(p_batch integer DEFAULT 100, p_now timestamptz DEFAULT now())
RETURNS TABLE (task_id uuid, agent_id text, score real, wake boolean, waited float8)
LANGUAGE plpgsql AS $$
DECLARE
    walk  NO SCROLL CURSOR FOR SELECT * FROM dispatch.pending_queue(p_now);
    c     dispatch.config;
    free  dispatch.agents[];
    room  integer;
    cand  record;
    a     dispatch.agents;
    held  dispatch.agents;
    t     dispatch.tasks;
    picks uuid[] := '{}';
    pickd text[] := '{}';  -- the agent of each pick
    id    text;
    keyed boolean := false;  -- some pick has flow keys
    plan  dispatch.flow_state;  -- the flow limits as the walk sees them, with what it picked
    gives dispatch.tasks[] := '{}';   -- the picks that pass the check under their agent's lock
    givers dispatch.agents[] := '{}';  -- and their agents, as locked
    ok    boolean[];         -- flow_grant's verdict on each of them (NULL: no flow keys)
    later timestamptz;       -- flow_grant's: when a rate limit that held one back refills
    refill timestamptz;      -- when a rate limit that held a task back will have refilled
    park  uuid[] := '{}';    -- tasks passed over because their concurrency key is at its cap
BEGIN
    SELECT * INTO c FROM dispatch.config;
    free := ARRAY(SELECT ag FROM dispatch.agents ag
                  WHERE cardinality(dispatch.agent_unavailability(ag, c)) = 0
                  ORDER BY ag.agent_id);
    SELECT sum(coalesce(f.max_concurrent, c.max_concurrent_per_agent) - f.active_count)
    INTO room FROM unnest(free) f;
    room := least(coalesce(room, 0), p_batch);
    IF room <= 0 THEN
        RETURN;
    END IF;
    IF c.aging_ms > 0 AND EXISTS (SELECT 1 FROM dispatch.tasks tk
                                  WHERE tk.status = 'pending' AND tk.age_due_at <= p_now) THEN
        PERFORM dispatch.queue_age(p_now, greatest(p_batch, 100));
    END IF;
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
        SELECT s.* INTO a FROM unnest(free) s
        WHERE cardinality(dispatch.agent_ineligibility(
                  s, cand.required_capabilities, cand.owner, c)) = 0
        ORDER BY s.agent_id = ANY (cand.previous_agents),
                 dispatch.availability(s.status) DESC,
                 s.active_count,
                 s.last_assigned_at NULLS FIRST,
                 s.agent_id
        LIMIT 1;
        CONTINUE WHEN NOT FOUND;
        PERFORM 1 FROM dispatch.tasks tk
        WHERE tk.task_id = cand.task_id AND tk.status = 'pending'
        FOR NO KEY UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        picks := picks || cand.task_id;
        pickd := pickd || a.agent_id;
        IF cand.concurrency_key IS NOT NULL OR cand.rate_key IS NOT NULL THEN
            keyed := true;
            plan := dispatch.flow_admit(plan, cand.concurrency_key, cand.rate_key, cand.cost,
                                        p_now, true);
        END IF;
        -- The pick counts against the agent's room in the snapshot, and spreads ties.
        a.active_count := a.active_count + 1;
        a.last_assigned_at := p_now;
        FOR k IN 1 .. cardinality(free) LOOP
            IF (free[k]).agent_id = a.agent_id THEN
                free[k] := a;
                EXIT;
            END IF;
        END LOOP;
    END LOOP;
    CLOSE walk;
    FOR id IN SELECT DISTINCT x FROM unnest(pickd) x ORDER BY x LOOP
        SELECT * INTO held FROM dispatch.agents ag WHERE ag.agent_id = id FOR UPDATE;
        FOR i IN 1 .. cardinality(picks) LOOP
            CONTINUE WHEN pickd[i] <> id;
            SELECT * INTO t FROM dispatch.tasks tk WHERE tk.task_id = picks[i];
            CONTINUE WHEN cardinality(dispatch.agent_ineligibility(
                held, t.required_capabilities, t.owner, c)) > 0;
            gives := gives || t;
            givers := givers || held;
            held.active_count := held.active_count + 1;
        END LOOP;
    END LOOP;
    IF keyed THEN
        SELECT f.admitted, f.until INTO ok, later
        FROM dispatch.flow_grant(plan, ARRAY(SELECT x.concurrency_key FROM unnest(gives) x),
                                 ARRAY(SELECT x.rate_key FROM unnest(gives) x),
                                 ARRAY(SELECT x.cost FROM unnest(gives) x), p_now) f;
        refill := least(refill, later);
    END IF;
    PERFORM dispatch.fn_enter();
    FOR i IN 1 .. cardinality(gives) LOOP
        CONTINUE WHEN ok[i] IS FALSE;
        t := gives[i];
        a := givers[i];
        task_id := t.task_id;
        agent_id := a.agent_id;
        score := dispatch.task_score(a, t);
        wake := a.status = 'sleeping';
        waited := greatest(extract(epoch FROM p_now - greatest(t.created_at, t.available_at)), 0);
        PERFORM dispatch.task_give(t, a, c, score, 'push', p_now);
        RETURN NEXT;
    END LOOP;
    PERFORM dispatch.fn_leave();
    IF refill IS NOT NULL THEN
        PERFORM dispatch.flow_wake(refill);
    END IF;
    IF cardinality(park) > 0 THEN
        PERFORM dispatch.flow_park(park);
    END IF;
END
$$;

-- Pending, available tasks that no agent in the directory could take (capacity aside) get one
-- `unmatched` event, and another only after unmatched_repeat_ms (the last one is found in the
-- task's history). The report takes no row lock on the tasks (the event's foreign key takes KEY
-- SHARE, which a claim's NO KEY UPDATE does not wait for or skip), so it never hides work from a
-- claim. The price: an `unmatched` event is advisory, written without the task's row lock, and may
-- follow an assignment that raced it.
CREATE FUNCTION dispatch.task_report_unmatched(
    p_now timestamptz DEFAULT now(), p_limit integer DEFAULT 100
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    walk NO SCROLL CURSOR FOR SELECT * FROM dispatch.pending_queue(p_now);
    c      dispatch.config;
    cand   record;
    n      integer := 0;
BEGIN
    SELECT * INTO c FROM dispatch.config;
    OPEN walk;
    WHILE n < p_limit LOOP
        FETCH walk INTO cand;
        EXIT WHEN NOT FOUND;
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM dispatch.agents ag
            WHERE cardinality(dispatch.agent_ineligibility(
                      ag, cand.required_capabilities, cand.owner, c, false)) = 0);
        -- Reported already, and not assigned since: again only after unmatched_repeat_ms.
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM (SELECT e.event, e.created_at FROM dispatch.task_events e
                           WHERE e.task_id = cand.task_id AND e.event IN ('unmatched', 'assigned')
                           ORDER BY e.id DESC LIMIT 1) last
            WHERE last.event = 'unmatched'
              AND last.created_at > p_now - make_interval(secs => c.unmatched_repeat_ms / 1000.0));
        PERFORM dispatch.event_write(cand.task_id, 'unmatched', 'dispatch',
            jsonb_build_object('required_capabilities', to_jsonb(cand.required_capabilities),
                               'owner', cand.owner), p_now);
        n := n + 1;
    END LOOP;
    CLOSE walk;
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
        SELECT ag, dispatch.agent_ineligibility(ag, t.required_capabilities, t.owner, c)
                   AS base_reasons,
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

-- ---- schema/05_directory.sql at 0.1.0

-- Registers or updates an agent; NULL arguments keep the current value.
CREATE FUNCTION dispatch.agent_upsert(
    p_agent_id text, p_capabilities text[] DEFAULT NULL, p_owner text DEFAULT NULL,
    p_max_concurrent integer DEFAULT NULL, p_status dispatch.agent_status DEFAULT NULL,
    p_policy text DEFAULT NULL, p_source text DEFAULT 'registry', p_now timestamptz DEFAULT now()
) RETURNS dispatch.agents
LANGUAGE plpgsql AS $$
DECLARE
    a dispatch.agents;
BEGIN
    INSERT INTO dispatch.agents AS ag (agent_id, capabilities, owner, max_concurrent, status, policy,
                                       source, last_seen_at, created_at, updated_at)
    VALUES (p_agent_id, dispatch.normalize_capabilities(coalesce(p_capabilities, '{}')), p_owner,
            p_max_concurrent, coalesce(p_status, 'ready'), p_policy, coalesce(p_source, 'registry'),
            p_now, p_now, p_now)
    ON CONFLICT (agent_id) DO UPDATE SET
        capabilities = coalesce(dispatch.normalize_capabilities(p_capabilities), ag.capabilities),
        owner = coalesce(p_owner, ag.owner),
        max_concurrent = coalesce(p_max_concurrent, ag.max_concurrent),
        status = coalesce(p_status, CASE WHEN ag.status = 'unknown'
                                         THEN 'ready'::dispatch.agent_status ELSE ag.status END),
        policy = coalesce(p_policy, ag.policy),
        last_seen_at = p_now, updated_at = p_now
    RETURNING * INTO a;
    PERFORM pg_notify('dispatch_work', '');
    RETURN a;
END
$$;

-- An agent heartbeat. One that went stale (status unknown) and reports in again without naming a
-- status is ready again.
CREATE FUNCTION dispatch.agent_heartbeat(
    p_agent_id text, p_status dispatch.agent_status DEFAULT NULL, p_now timestamptz DEFAULT now()
) RETURNS dispatch.agents
LANGUAGE plpgsql AS $$
DECLARE
    a dispatch.agents;
BEGIN
    UPDATE dispatch.agents
    SET status = coalesce(p_status, CASE WHEN status = 'unknown' THEN 'ready'::dispatch.agent_status
                                         ELSE status END),
        last_seen_at = p_now, updated_at = p_now
    WHERE agent_id = p_agent_id
    RETURNING * INTO a;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % not found', p_agent_id USING ERRCODE = 'UD404';
    END IF;
    IF a.status IN ('ready', 'sleeping', 'busy') THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    RETURN a;
END
$$;

CREATE FUNCTION dispatch.agent_drain(p_agent_id text, p_drained boolean DEFAULT true,
                                     p_now timestamptz DEFAULT now())
RETURNS dispatch.agents
LANGUAGE plpgsql AS $$
DECLARE
    a dispatch.agents;
BEGIN
    UPDATE dispatch.agents SET drained = p_drained, updated_at = p_now
    WHERE agent_id = p_agent_id
    RETURNING * INTO a;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % not found', p_agent_id USING ERRCODE = 'UD404';
    END IF;
    IF NOT p_drained THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    RETURN a;
END
$$;

-- Lock the agent's tasks before the agent row, in the order every transition takes them (task
-- first, then the agent through the status trigger), so a stop racing a completion cannot deadlock.
CREATE FUNCTION dispatch.agent_stop(p_agent_id text, p_now timestamptz DEFAULT now())
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

-- Writes one refresh of the external directory. p_entries is a JSON array of
--   {agent_id, capabilities?, status?, policy?, source, seen}
-- where a missing (null) field keeps what the directory knows (its service did not answer) and
-- `seen` says whether the entry's availability was refreshed now (it resets the stale clock).
-- New agents are created; agents of the built-in registry keep source `registry`. Returns the number
-- of entries written and NOTIFYs the assigner (capabilities or availability may have changed).
CREATE FUNCTION dispatch.agent_sync(p_entries jsonb, p_now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    WITH e AS (
        SELECT x.agent_id,
               CASE WHEN x.capabilities IS NULL THEN NULL
                    ELSE dispatch.normalize_capabilities(
                        ARRAY(SELECT jsonb_array_elements_text(x.capabilities))) END AS caps,
               x.status::dispatch.agent_status AS status, x.policy, x.source,
               coalesce(x.seen, false) AS seen
        FROM jsonb_to_recordset(p_entries)
             AS x (agent_id text, capabilities jsonb, status text, policy text, source text,
                   seen boolean)
        ORDER BY x.agent_id
    ), ins AS (
        INSERT INTO dispatch.agents AS ag (agent_id, capabilities, status, policy, source,
                                           last_seen_at, created_at, updated_at)
        SELECT e.agent_id, coalesce(e.caps, '{}'),
               coalesce(e.status, CASE WHEN e.seen THEN 'ready'
                                       ELSE 'unknown' END::dispatch.agent_status), e.policy,
               e.source, p_now, p_now, p_now
        FROM e
        ORDER BY e.agent_id
        ON CONFLICT (agent_id) DO UPDATE SET
            capabilities = coalesce((SELECT e2.caps FROM e e2 WHERE e2.agent_id = ag.agent_id),
                                    ag.capabilities),
            status = coalesce((SELECT e2.status FROM e e2 WHERE e2.agent_id = ag.agent_id),
                              CASE WHEN ag.status = 'unknown'
                                        AND (SELECT e2.seen FROM e e2 WHERE e2.agent_id = ag.agent_id)
                                   THEN 'ready'::dispatch.agent_status ELSE ag.status END),
            policy = coalesce(EXCLUDED.policy, ag.policy),
            source = CASE WHEN ag.source = 'registry' THEN ag.source ELSE EXCLUDED.source END,
            last_seen_at = CASE WHEN (SELECT e2.seen FROM e e2 WHERE e2.agent_id = ag.agent_id)
                                THEN p_now ELSE ag.last_seen_at END,
            updated_at = p_now
        RETURNING 1
    )
    SELECT count(*) INTO n FROM ins;
    IF n > 0 THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    RETURN n;
END
$$;

-- Replaces the device ownership learned from one source (Alexandria) by p_pairs, a JSON array of
-- {agent_id, owner}. Returns the number of pairs now known.
CREATE FUNCTION dispatch.agent_owners_sync(
    p_pairs jsonb, p_source text DEFAULT 'alexandria', p_now timestamptz DEFAULT now()
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    DELETE FROM dispatch.agent_owners o
    WHERE o.source = p_source
      AND NOT EXISTS (SELECT 1 FROM jsonb_to_recordset(p_pairs) AS x (agent_id text, owner text)
                      WHERE x.agent_id = o.agent_id AND x.owner = o.owner);
    INSERT INTO dispatch.agent_owners AS o (agent_id, owner, source, updated_at)
    SELECT DISTINCT x.agent_id, x.owner, p_source, p_now
    FROM jsonb_to_recordset(p_pairs) AS x (agent_id text, owner text)
    WHERE x.agent_id IS NOT NULL AND x.owner IS NOT NULL
    ORDER BY x.agent_id, x.owner
    ON CONFLICT (agent_id, owner) DO UPDATE SET source = EXCLUDED.source, updated_at = p_now;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pg_notify('dispatch_work', '');
    RETURN n;
END
$$;

-- Entries not refreshed for p_stale_ms become `unknown` (no longer eligible), and device ownership
-- not refreshed for as long is forgotten (the owner filter then fails closed). Agents that stopped
-- stay stopped. Returns the number of agents marked unknown.
CREATE FUNCTION dispatch.agent_mark_stale(p_stale_ms integer, p_now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    horizon timestamptz := p_now - make_interval(secs => p_stale_ms / 1000.0);
BEGIN
    WITH stale AS (
        SELECT ag.agent_id FROM dispatch.agents ag
        WHERE ag.last_seen_at < horizon AND ag.status NOT IN ('unknown', 'stopped')
        ORDER BY ag.agent_id
        FOR UPDATE SKIP LOCKED
    ), marked AS (
        UPDATE dispatch.agents ag SET status = 'unknown', updated_at = p_now
        FROM stale WHERE ag.agent_id = stale.agent_id
        RETURNING 1
    )
    SELECT count(*) INTO n FROM marked;
    DELETE FROM dispatch.agent_owners o WHERE o.updated_at < horizon;
    RETURN n;
END
$$;

-- Per-caller API tokens (auth.mode `tokens`). Only the SHA-256 of a token is stored: the token
-- itself is shown once, to whoever issued it. agent_id is any caller identity (the X-Agent-ID a
-- token is good for), a registered agent or a requester, so there is no foreign key to agents.
CREATE TABLE dispatch.agent_tokens (
    token_hash bytea PRIMARY KEY CONSTRAINT agent_tokens_hash_length
               CHECK (octet_length(token_hash) = 32),
    agent_id   text NOT NULL CONSTRAINT agent_tokens_agent_id_format
               CHECK (dispatch.agent_id_valid(agent_id)),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX agent_tokens_agent_idx ON dispatch.agent_tokens (agent_id);

-- Issues a new token for p_agent_id and returns it; its earlier tokens stay valid. The token is
-- 244 random bits (two version-4 UUIDs, drawn from pg_strong_random) in hex behind a `dsp_` prefix
-- that lets secret scanners recognise it.
CREATE FUNCTION dispatch.agent_token_issue(p_agent_id text, p_now timestamptz DEFAULT now())
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    token text := 'dsp_' || replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
BEGIN
    INSERT INTO dispatch.agent_tokens (token_hash, agent_id, created_at)
    VALUES (sha256(convert_to(token, 'UTF8')), p_agent_id, p_now);
    RETURN token;
END
$$;

-- The identity a token is good for, or NULL when it is unknown or revoked.
CREATE FUNCTION dispatch.agent_token_agent(p_token text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT t.agent_id FROM dispatch.agent_tokens t
    WHERE t.token_hash = sha256(convert_to(p_token, 'UTF8'))
$$;

-- Revokes every token of p_agent_id; returns how many. The NOTIFY (payload: the agent id) makes
-- every replica forget the tokens it verified for that agent at once.
CREATE FUNCTION dispatch.agent_token_revoke(p_agent_id text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    DELETE FROM dispatch.agent_tokens WHERE agent_id = p_agent_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pg_notify('dispatch_auth', p_agent_id);
    RETURN n;
END
$$;

-- ---- schema/06_outbox.sql at 0.1.0

-- The event relay's side of the transactional outbox: task_events rows with published_at IS NULL
-- are published to NATS JetStream and then marked, in one transaction:
--
--   BEGIN;
--   SELECT dispatch.event_relay_lock();          -- false: another replica is relaying, stand by
--   SELECT * FROM dispatch.event_relay_batch(500);
--   ... publish each row with Nats-Msg-Id = id, wait for the JetStream acks ...
--   SELECT dispatch.event_mark_published(ids);
--   COMMIT;
--
-- A crash between publish and mark rolls the marks back; the next relay publishes the same rows
-- again under the same message ids and JetStream's duplicate window drops the copies.

-- Only one replica relays at a time. Row locks with SKIP LOCKED alone would let replica B lock and
-- publish a later event of a task while replica A is still publishing an earlier one of the same
-- task (A holds the earlier rows, B skips them), so per-task order would depend on who wins the
-- race to the NATS server. A transaction-level advisory lock, tried without waiting, makes one
-- batch at a time the rule: the others return at once and wait for the next NOTIFY. It is released
-- by COMMIT/ROLLBACK or when the session dies, so a killed relay never blocks the others.
CREATE FUNCTION dispatch.event_relay_lock() RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT pg_try_advisory_xact_lock(hashtext('dispatch.event_relay'))
$$;

-- The oldest unpublished events, locked for this transaction. The event rows only are locked (not
-- their tasks), so the relay never blocks a transition. SKIP LOCKED is a second fence behind the
-- advisory lock: a batch still being published (and not yet marked) is never picked up twice.
-- Per task, ids follow commit order: every writer of a task's events holds that task's row lock.
CREATE FUNCTION dispatch.event_relay_batch(p_limit integer DEFAULT 500)
RETURNS SETOF dispatch.task_events
LANGUAGE sql VOLATILE AS $$
    SELECT * FROM dispatch.task_events
    WHERE published_at IS NULL
    ORDER BY id
    LIMIT p_limit
    FOR UPDATE SKIP LOCKED
$$;

CREATE FUNCTION dispatch.event_mark_published(p_ids bigint[], p_now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE sql VOLATILE AS $$
    WITH marked AS (
        UPDATE dispatch.task_events SET published_at = p_now
        WHERE id = ANY (p_ids) AND published_at IS NULL
        RETURNING 1
    )
    SELECT count(*)::integer FROM marked
$$;

-- Events NATS refuses for good (the relay tried them and JetStream answered with an error each
-- time) are set aside: marked published, with the reason, so one bad event never stops the
-- relay. `SELECT * FROM dispatch.task_events WHERE relay_error IS NOT NULL` lists them.
CREATE FUNCTION dispatch.event_set_aside(p_ids bigint[], p_error text, p_now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE sql VOLATILE AS $$
    WITH marked AS (
        UPDATE dispatch.task_events SET published_at = p_now, relay_error = p_error
        WHERE id = ANY (p_ids) AND published_at IS NULL
        RETURNING 1
    )
    SELECT count(*)::integer FROM marked
$$;

-- ---- schema/07_dba.sql at 0.1.0

-- The DBA surface: functions that behave exactly like the API, and views to look at the queue from
-- psql.
-- Creation: the one way a task row is made, by the API, NATS and psql (dispatch.create_task).
-- A repeated (requester, idempotency key) returns the task it made first, with created false.
-- Unset arguments take the column defaults' values; the requester defaults to the session's actor.
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
    OUT task dispatch.tasks,
    OUT created boolean
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO dispatch.tasks AS tk (title, description, requester, owner, required_capabilities,
                                      priority, timeout_seconds, heartbeat_seconds, max_retries,
                                      metadata, parent_task_id, available_at, source,
                                      idempotency_key, concurrency_key, rate_key, cost)
    VALUES (task_create.title, coalesce(task_create.description, ''), task_create.requester,
            task_create.owner, coalesce(task_create.required_capabilities, '{}'),
            coalesce(task_create.priority, 0), task_create.timeout_seconds,
            task_create.heartbeat_seconds, coalesce(task_create.max_retries, 3),
            coalesce(task_create.metadata, '{}'), task_create.parent_task_id,
            task_create.available_at, task_create.source, task_create.idempotency_key,
            task_create.concurrency_key, task_create.rate_key, task_create.cost)
    ON CONFLICT (requester, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING * INTO task;
    created := task.task_id IS NOT NULL;
    IF NOT created THEN
        SELECT * INTO task FROM dispatch.tasks tk
        WHERE tk.requester = coalesce(task_create.requester, dispatch.session_actor())
          AND tk.idempotency_key = task_create.idempotency_key;
    END IF;
END
$$;

CREATE FUNCTION dispatch.create_task(
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
    cost integer DEFAULT 1
) RETURNS dispatch.tasks
LANGUAGE sql AS $$
    SELECT (dispatch.task_create(title, description, requester, owner, required_capabilities,
                                 priority, timeout_seconds, heartbeat_seconds, max_retries,
                                 metadata, parent_task_id, available_at, source, idempotency_key,
                                 concurrency_key, rate_key, cost)).task
$$;

CREATE FUNCTION dispatch.cancel_task(task_id uuid, actor text DEFAULT NULL, reason text DEFAULT NULL)
RETURNS dispatch.tasks
LANGUAGE sql AS $$
    SELECT dispatch.task_cancel(task_id, coalesce(actor, dispatch.session_actor()), reason, true)
$$;

CREATE FUNCTION dispatch.requeue_task(task_id uuid, actor text DEFAULT NULL)
RETURNS dispatch.tasks
LANGUAGE sql AS $$
    SELECT dispatch.task_requeue(task_id, coalesce(actor, dispatch.session_actor()))
$$;

CREATE FUNCTION dispatch.drain_agent(agent_id text, drained boolean DEFAULT true)
RETURNS dispatch.agents
LANGUAGE sql AS $$
    SELECT dispatch.agent_drain(agent_id, drained)
$$;

CREATE VIEW dispatch.queue_depth AS
SELECT s.status,
       count(t.task_id)::bigint AS count,
       now() - min(t.created_at) AS oldest_age
FROM unnest(enum_range(NULL::dispatch.task_status)) AS s (status)
LEFT JOIN dispatch.tasks t ON t.status = s.status
GROUP BY s.status
ORDER BY s.status;

CREATE VIEW dispatch.agent_load AS
SELECT a.agent_id, a.status, a.drained, a.source, a.owner, a.capabilities,
       a.active_count AS active_tasks,
       coalesce(a.max_concurrent, c.max_concurrent_per_agent) AS max_concurrent,
       (SELECT count(*) FROM dispatch.tasks t
        WHERE t.status IN ('assigned', 'running') AND t.assigned_agent = a.agent_id)::integer
           AS counted_active_tasks,
       a.last_assigned_at, a.last_seen_at
FROM dispatch.agents a CROSS JOIN dispatch.config c
ORDER BY a.agent_id;

CREATE VIEW dispatch.overdue AS
SELECT t.task_id, t.title, t.status, t.assigned_agent, t.deadline_at,
       now() - t.deadline_at AS overdue_by,
       CASE WHEN t.deadline_at <= now() THEN 'deadline'
            WHEN t.status = 'assigned' AND t.wake_deadline_at <= now() THEN 'wake_timeout'
            ELSE 'heartbeat' END AS reason
FROM dispatch.tasks t
WHERE t.status IN ('assigned', 'running')
  AND (t.deadline_at <= now()
       OR (t.status = 'assigned' AND t.wake_deadline_at <= now())
       OR t.heartbeat_seconds IS NOT NULL
          AND coalesce(t.last_progress_at, t.started_at, t.assigned_at)
              + make_interval(secs => t.heartbeat_seconds) <= now());

-- ---- schema/08_flow.sql at 0.1.0

-- Flow control (SPEC §12): fair share across tenants, priority aging, concurrency keys and rate
-- limits. All of it is enforced here, in the transaction that assigns (task_assign and task_claim
-- in 04_assignment.sql call these functions), so no replica, agent or psql session gets around it.
--
-- Fair share and aging decide the order of the pending queue, and they are kept in the rows the
-- walk reads (tasks.queue_priority, tasks.queue_at) so that the walk stays one ordered index scan:
--   * A task's place in line (queue_at) is its available_at, or, when its tenant (owner, else
--     requester) already has tasks waiting at the same priority, 1/weight seconds after the last
--     of them. A tenant's flood is spread out in time, and another tenant's task lands between
--     its first ones instead of behind all of them (weighted fair queuing with a virtual clock).
--   * Its effective priority (queue_priority) is its priority, raised by one level per
--     config.aging_ms that it has waited in line, up to 10. The sweep dispatch.queue_age raises it
--     when due (age_due_at); the assigner and the claim run the sweep before they walk.
-- Concurrency keys and rate limits decide whether a task may be assigned now (flow_grant). Every
-- busy key is touched by every assignment of its tasks, so neither may be one row locked until
-- commit: on a busy key, assignments would then commit one after another. Instead:
--   * A concurrency key counts its active tasks (tasks_active_concurrency_idx) under a
--     transaction-level advisory lock, its gate. Far below its cap, an assignment takes the gate
--     shared plus one of flow_tickets() ticket locks per task it gives, tried without waiting, and
--     gives when the count plus flow_tickets() is within the cap: what other transactions give
--     meanwhile holds tickets too, so it is at most flow_tickets() in all. Near the cap, it takes
--     the gate exclusive (waiting for every shared holder to commit) and counts exactly.
--   * A rate key's token bucket is split into rate_limits.shards rows (rate_buckets), each with
--     its share of the capacity and the refill. An assignment takes a shard holding the
--     cost that no other transaction holds (SKIP LOCKED); when none does, it locks every shard
--     and pools them. The shards together never hold more than one bucket would, so the limit
--     holds; a small bucket (capacity under 20) is one shard, exact.
-- Locks are taken after the agents' rows, concurrency keys first and then rate keys, each in key
-- order, and the only locks ever waited for are the exclusive gate and a bucket's shards, so no
-- two assignments can deadlock.

CREATE TABLE dispatch.tenant_weights (
    tenant     text PRIMARY KEY
               CONSTRAINT tenant_weights_tenant_length CHECK (char_length(tenant) BETWEEN 1 AND 256),
    -- A tenant of weight 2 gets two tasks assigned for every one of a tenant of weight 1.
    weight     float8 NOT NULL CONSTRAINT tenant_weights_weight_range CHECK (weight > 0 AND weight <= 1000),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dispatch.concurrency_limits (
    key          text PRIMARY KEY
                 CONSTRAINT concurrency_limits_key_length CHECK (char_length(key) BETWEEN 1 AND 256),
    -- 0 pauses the key.
    max_active   integer NOT NULL
                 CONSTRAINT concurrency_limits_max_active_range CHECK (max_active BETWEEN 0 AND 1000000),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- A token bucket per key: it gains refill_per_second tokens a second up to `capacity`, and every
-- assignment of a task with this rate_key takes the task's cost. The tokens are in rate_buckets.
CREATE TABLE dispatch.rate_limits (
    key               text PRIMARY KEY
                      CONSTRAINT rate_limits_key_length CHECK (char_length(key) BETWEEN 1 AND 256),
    capacity          float8 NOT NULL
                      CONSTRAINT rate_limits_capacity_range CHECK (capacity >= 1 AND capacity <= 1e12),
    refill_per_second float8 NOT NULL
                      CONSTRAINT rate_limits_refill_range
                      CHECK (refill_per_second > 0 AND refill_per_second <= 1e12),
    -- How many rows of rate_buckets share the bucket: dispatch.rate_shards(capacity).
    shards            smallint NOT NULL CONSTRAINT rate_limits_shards_range CHECK (shards BETWEEN 1 AND 16),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- The bucket's tokens, in `shards` rows: each holds up to capacity/shards, `tokens` as of
-- `refilled_at`, and refills at refill_per_second/shards.
CREATE TABLE dispatch.rate_buckets (
    key         text NOT NULL REFERENCES dispatch.rate_limits (key) ON DELETE CASCADE,
    shard       smallint NOT NULL,
    tokens      float8 NOT NULL,
    refilled_at timestamptz NOT NULL,
    PRIMARY KEY (key, shard)
);

-- How many shards a bucket of this capacity is split into: each holds at least 10 tokens, and
-- there are at most 16.
CREATE FUNCTION dispatch.rate_shards(p_capacity float8) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT least(16, greatest(1, floor(p_capacity / 10)))::smallint
$$;

-- The tokens in one shard of bucket r at p_now.
CREATE FUNCTION dispatch.shard_tokens(b dispatch.rate_buckets, r dispatch.rate_limits,
                                      p_now timestamptz) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT least(r.capacity / r.shards,
                 b.tokens + greatest(extract(epoch FROM p_now - b.refilled_at)::float8, 0)
                            * r.refill_per_second / r.shards)
$$;

-- The tokens in the bucket at p_now: its shards' together. (PL/pgSQL, like concurrency_used,
-- for its cached plan: a SQL function whose body cannot be inlined is planned on every call, and
-- the assigning transactions call these on every claim.)
CREATE FUNCTION dispatch.rate_tokens(r dispatch.rate_limits, p_now timestamptz) RETURNS float8
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(sum(dispatch.shard_tokens(b, r, p_now)), 0)
            FROM dispatch.rate_buckets b WHERE b.key = r.key);
END
$$;

-- The tasks of a concurrency key assigned or running now.
CREATE FUNCTION dispatch.concurrency_used(p_key text) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT count(*) FROM dispatch.tasks tk
            WHERE tk.status IN ('assigned', 'running') AND tk.concurrency_key = p_key);
END
$$;

-- How many tasks of one concurrency key may be in flight on its fast path at once (see above).
CREATE FUNCTION dispatch.flow_tickets() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 32 $$;

-- The advisory lock class of a concurrency key (objid -1: its gate; 0 .. flow_tickets() - 1: its
-- tickets).
CREATE FUNCTION dispatch.concurrency_lock(p_key text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT hashtext('dispatch.concurrency_key ' || p_key) $$;

---------------------------------------------------------------------------------------------------
-- The queue order: fair share and aging
---------------------------------------------------------------------------------------------------

-- Places a task that (re)enters the pending queue or changes priority, and checks the flow fields
-- of a new task.
CREATE FUNCTION dispatch.tasks_queue_place() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    who   text := coalesce(NEW.owner, NEW.requester);
    w     float8;
    prev  timestamptz;
    aging integer;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.concurrency_key IS NOT NULL AND char_length(NEW.concurrency_key) NOT BETWEEN 1 AND 256 THEN
            RAISE EXCEPTION 'concurrency_key must be 1 to 256 characters'
                USING ERRCODE = 'UD400', COLUMN = 'concurrency_key';
        END IF;
        IF NEW.rate_key IS NOT NULL AND char_length(NEW.rate_key) NOT BETWEEN 1 AND 256 THEN
            RAISE EXCEPTION 'rate_key must be 1 to 256 characters'
                USING ERRCODE = 'UD400', COLUMN = 'rate_key';
        END IF;
        IF NEW.cost IS NULL OR NEW.cost NOT BETWEEN 1 AND 1000000000 THEN
            RAISE EXCEPTION 'cost must be between 1 and 1000000000 (got %)', NEW.cost
                USING ERRCODE = 'UD400', COLUMN = 'cost';
        END IF;
        -- A cost its bucket can never hold would wait for ever. (A bucket made smaller later
        -- leaves such a task pending; explain names it.)
        IF NEW.rate_key IS NOT NULL AND NEW.cost > 1 THEN
            SELECT l.capacity INTO w FROM dispatch.rate_limits l WHERE l.key = NEW.rate_key;
            IF NEW.cost > w THEN
                RAISE EXCEPTION 'cost % exceeds the capacity % of rate key %, so the task could never be assigned',
                    NEW.cost, w, NEW.rate_key USING ERRCODE = 'UD400', COLUMN = 'cost';
            END IF;
        END IF;
    ELSIF OLD.status = 'pending' AND NEW.priority = OLD.priority
          AND NEW.available_at = OLD.available_at THEN
        RETURN NEW;  -- still in line where it was
    END IF;
    -- The tenant's last place in line: one step back from the top of tasks_pending_tenant_idx.
    -- (Written as max(), the planner read every pending task of the tenant to aggregate them, so
    -- each insert of a tenant with a deep queue cost O(its queue).)
    SELECT (SELECT tw.weight FROM dispatch.tenant_weights tw WHERE tw.tenant = who),
           (SELECT tk.queue_at FROM dispatch.tasks tk
            WHERE tk.status = 'pending' AND coalesce(tk.owner, tk.requester) = who
              AND tk.priority = NEW.priority AND tk.task_id <> NEW.task_id
            ORDER BY tk.queue_at DESC LIMIT 1),
           c.aging_ms
    INTO w, prev, aging FROM dispatch.config c;
    NEW.queue_at := greatest(NEW.available_at, prev + make_interval(secs => 1.0 / coalesce(w, 1)));
    NEW.queue_priority := NEW.priority;
    NEW.parked := false;  -- back in line: the walk parks it again if its key is still at its cap
    NEW.age_due_at := CASE WHEN aging > 0 AND NEW.priority < 10
                           THEN NEW.queue_at + make_interval(secs => aging / 1000.0) END;
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_queue_place
    BEFORE INSERT OR UPDATE OF status, priority, available_at ON dispatch.tasks
    FOR EACH ROW WHEN (NEW.status = 'pending') EXECUTE FUNCTION dispatch.tasks_queue_place();

-- Raises the effective priority of up to p_limit pending tasks whose next level is due; returns
-- how many. Rows another transaction holds are left for the next sweep.
CREATE FUNCTION dispatch.queue_age(p_now timestamptz DEFAULT now(), p_limit integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    aging integer := (SELECT c.aging_ms FROM dispatch.config c);
    n     integer;
BEGIN
    IF aging = 0 THEN
        RETURN 0;
    END IF;
    WITH due AS (
        SELECT tk.task_id,
               least(10, tk.priority + floor(extract(epoch FROM p_now - tk.queue_at) * 1000
                                             / aging)::integer) AS level
        FROM dispatch.tasks tk
        WHERE tk.status = 'pending' AND tk.age_due_at <= p_now
        ORDER BY tk.age_due_at
        LIMIT p_limit
        FOR NO KEY UPDATE SKIP LOCKED
    ), aged AS (
        UPDATE dispatch.tasks tk
        SET queue_priority = due.level,
            age_due_at = CASE WHEN due.level < 10
                              THEN tk.queue_at + make_interval(
                                  secs => (due.level - tk.priority + 1) * aging / 1000.0) END
        FROM due WHERE tk.task_id = due.task_id
        RETURNING 1
    )
    SELECT count(*) INTO n FROM aged;
    RETURN n;
END
$$;

---------------------------------------------------------------------------------------------------
-- Whether a task may be assigned now: concurrency keys and rate limits
---------------------------------------------------------------------------------------------------

-- Whether a task with these flow fields may be assigned at p_now, as far as an unlocked read
-- shows, given what state s (the type dispatch.flow_state, in 01_tables.sql: 04_assignment.sql
-- declares it too) has seen and taken; with p_take an admitted task is counted against its limits
-- in the returned state. A key met for the first time is read. The walks plan with it; flow_grant
-- decides under the locks.
CREATE FUNCTION dispatch.flow_admit(
    s dispatch.flow_state, p_concurrency_key text, p_rate_key text, p_cost integer,
    p_now timestamptz, p_take boolean
) RETURNS dispatch.flow_state
LANGUAGE plpgsql AS $$
DECLARE
    i  integer;
    j  integer;
    cl dispatch.concurrency_limits;
    rl dispatch.rate_limits;
BEGIN
    s.reason := NULL;
    s.until := NULL;
    s.capped := false;
    IF p_concurrency_key IS NOT NULL THEN
        i := array_position(s.ckeys, p_concurrency_key);
        IF i IS NULL THEN
            SELECT * INTO cl FROM dispatch.concurrency_limits l WHERE l.key = p_concurrency_key;
            s.ckeys := s.ckeys || p_concurrency_key;
            s.cmax := s.cmax || cl.max_active;
            s.cused := s.cused || CASE WHEN cl.key IS NULL THEN 0
                                       ELSE dispatch.concurrency_used(p_concurrency_key) END;
            i := cardinality(s.ckeys);
        END IF;
        IF s.cused[i] >= s.cmax[i] THEN
            s.reason := format('concurrency key %s at %s/%s', p_concurrency_key, s.cused[i],
                               s.cmax[i]);
            s.capped := true;
            RETURN s;
        END IF;
    END IF;
    IF p_rate_key IS NOT NULL THEN
        j := array_position(s.rkeys, p_rate_key);
        IF j IS NULL THEN
            SELECT * INTO rl FROM dispatch.rate_limits l WHERE l.key = p_rate_key;
            s.rkeys := s.rkeys || p_rate_key;
            s.rcap := s.rcap || rl.capacity;
            s.rrefill := s.rrefill || rl.refill_per_second;
            s.rtokens := s.rtokens || dispatch.rate_tokens(rl, p_now);
            j := cardinality(s.rkeys);
        END IF;
        IF p_cost > s.rcap[j] THEN
            s.reason := format('rate key %s: cost %s exceeds its capacity %s', p_rate_key, p_cost,
                               s.rcap[j]);
            RETURN s;
        ELSIF s.rtokens[j] < p_cost THEN
            s.until := p_now + make_interval(secs => (p_cost - s.rtokens[j]) / s.rrefill[j]);
            s.reason := format('rate key %s empty until %s', p_rate_key,
                               to_char(s.until AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'));
            RETURN s;
        END IF;
    END IF;
    IF p_take THEN
        IF i IS NOT NULL THEN
            s.cused[i] := s.cused[i] + 1;
        END IF;
        IF j IS NOT NULL THEN
            s.rtokens[j] := s.rtokens[j] - p_cost;
        END IF;
    END IF;
    RETURN s;
END
$$;

-- What holds back a task with these flow fields at p_now (reason NULL: nothing), and for a rate
-- limit the instant its bucket will hold enough; for explain and the metrics.
CREATE FUNCTION dispatch.flow_hold(
    p_concurrency_key text, p_rate_key text, p_cost integer, p_now timestamptz,
    OUT reason text, OUT until timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    s dispatch.flow_state;  -- nothing seen yet
BEGIN
    s := dispatch.flow_admit(s, p_concurrency_key, p_rate_key, p_cost, p_now, false);
    reason := s.reason;
    until := s.until;
END
$$;

-- Locks every shard of a rate key's bucket, in shard order (with p_wait false: those no other
-- transaction holds), and reads them at p_now: the shards locked, their tokens together, and the
-- bucket's capacity and refill (NULL: the key has no bucket, or nothing could be locked).
CREATE FUNCTION dispatch.rate_pool(
    p_key text, p_now timestamptz, p_wait boolean,
    OUT shards smallint[], OUT tokens float8, OUT capacity float8, OUT refill float8
)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_wait THEN
        SELECT array_agg(x.shard ORDER BY x.shard), sum(x.tokens), max(x.capacity), max(x.refill)
        INTO shards, tokens, capacity, refill
        FROM (SELECT b.shard, dispatch.shard_tokens(b, l, p_now) AS tokens, l.capacity,
                     l.refill_per_second AS refill
              FROM dispatch.rate_buckets b JOIN dispatch.rate_limits l ON l.key = b.key
              WHERE b.key = p_key ORDER BY b.shard FOR UPDATE OF b) x;
    ELSE
        SELECT array_agg(x.shard ORDER BY x.shard), sum(x.tokens), max(x.capacity), max(x.refill)
        INTO shards, tokens, capacity, refill
        FROM (SELECT b.shard, dispatch.shard_tokens(b, l, p_now) AS tokens, l.capacity,
                     l.refill_per_second AS refill
              FROM dispatch.rate_buckets b JOIN dispatch.rate_limits l ON l.key = b.key
              WHERE b.key = p_key ORDER BY b.shard FOR UPDATE OF b SKIP LOCKED) x;
    END IF;
END
$$;

-- Leaves p_tokens in the locked shards of a rate key's bucket, spread evenly, as of p_now.
CREATE FUNCTION dispatch.rate_spread(p_key text, p_shards smallint[], p_tokens float8,
                                     p_now timestamptz) RETURNS void
LANGUAGE sql AS $$
    UPDATE dispatch.rate_buckets b
    SET tokens = p_tokens / cardinality(p_shards), refilled_at = greatest(b.refilled_at, p_now)
    WHERE b.key = p_key AND b.shard = ANY (p_shards)
$$;

-- Which of these tasks (their concurrency keys, rate keys and costs, NULL keys for none) may be
-- given now, taken and counted in their limits: the rule of the header above. Every task admitted
-- must then be given in this transaction (its tokens are taken here). p_plan is what the walk
-- saw of the concurrency keys (a key it did not see is counted here). `until`: when a rate limit
-- that held one back will have refilled. A transaction that calls it again (a second claim in one
-- psql transaction) waits for no lock: it takes what it can without waiting, and holds back the
-- rest, so that it cannot deadlock with the locks it took the first time.
CREATE FUNCTION dispatch.flow_grant(
    p_plan dispatch.flow_state, p_ckeys text[], p_rkeys text[], p_costs integer[],
    p_now timestamptz, OUT admitted boolean[], OUT until timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    tickets integer := dispatch.flow_tickets();
    was     text := nullif(current_setting('dispatch.flow_tickets', true), '');
    waits   boolean := was IS NULL;  -- no flow lock taken by an earlier call of this transaction
    pos     integer := coalesce(was::integer, 0);  -- ticket tries made by this transaction
    keys    text[];
    k       text;
    idx     integer[];
    g       integer;
    cap     integer;
    used    integer;
    got     integer;
    lk      integer;
    need    float8;
    sh      smallint;
    pool    record;
    rest    float8;
    holding boolean;         -- this transaction holds a shard of the key
    one     boolean := cardinality(p_costs) = 1;  -- a single task (most claims): no key to sort
BEGIN
    admitted := array_fill(true, ARRAY[cardinality(p_costs)]);
    -- (Written with IF, not CASE: a CASE with a subquery in any branch runs through the executor
    -- even when the branch taken has none.)
    IF one THEN
        keys := array_remove(p_ckeys, NULL);
    ELSE
        keys := ARRAY(SELECT DISTINCT x FROM unnest(p_ckeys) x WHERE x IS NOT NULL ORDER BY x);
    END IF;
    FOREACH k IN ARRAY keys LOOP
        SELECT l.max_active INTO cap FROM dispatch.concurrency_limits l WHERE l.key = k;
        CONTINUE WHEN NOT FOUND;
        IF one THEN
            idx := '{1}';
        ELSE
            idx := ARRAY(SELECT i FROM generate_subscripts(p_ckeys, 1) i WHERE p_ckeys[i] = k
                         ORDER BY i);
        END IF;
        lk := dispatch.concurrency_lock(k);
        g := array_position(p_plan.ckeys, k);
        used := CASE WHEN g IS NOT NULL THEN p_plan.cused[g]
                     ELSE dispatch.concurrency_used(k) END;
        got := 0;
        IF used + tickets <= cap THEN
            -- Far below the cap: a ticket per task, tried without waiting (a ticket this
            -- transaction tried before is never tried again: it may hold it), then the gate
            -- shared, and a count that must leave room for every ticket.
            WHILE got < cardinality(idx) AND pos < tickets LOOP
                IF pg_try_advisory_xact_lock(lk, (pg_backend_pid() + pos) % tickets) THEN
                    got := got + 1;
                END IF;
                pos := pos + 1;
            END LOOP;
            IF got > 0 AND pg_try_advisory_xact_lock_shared(lk, -1) THEN
                -- Holding the gate shared, this transaction may not wait for it exclusive
                -- (two would deadlock): if the count came close to the cap meanwhile, none.
                idx := CASE WHEN dispatch.concurrency_used(k) + tickets <= cap THEN idx[got + 1:]
                            ELSE idx END;
            ELSE
                got := 0;
            END IF;
        END IF;
        IF got = 0 THEN
            -- Near the cap (or the gate or every ticket taken): the gate exclusive, and an exact
            -- count.
            IF waits THEN
                PERFORM pg_advisory_xact_lock(lk, -1);
                used := dispatch.concurrency_used(k);
            ELSIF pg_try_advisory_xact_lock(lk, -1) THEN
                used := dispatch.concurrency_used(k);
            ELSE
                used := cap;
            END IF;
            idx := idx[greatest(cap - used, 0) + 1:];
        END IF;
        FOREACH g IN ARRAY idx LOOP
            admitted[g] := false;
        END LOOP;
    END LOOP;
    IF one THEN
        keys := array_remove(p_rkeys, NULL);
    ELSE
        keys := ARRAY(SELECT DISTINCT x FROM unnest(p_rkeys) x WHERE x IS NOT NULL ORDER BY x);
    END IF;
    FOREACH k IN ARRAY keys LOOP
        IF one THEN
            CONTINUE WHEN NOT admitted[1];
            idx := '{1}';
            need := p_costs[1];
        ELSE
            idx := ARRAY(SELECT i FROM generate_subscripts(p_rkeys, 1) i
                         WHERE p_rkeys[i] = k AND admitted[i] ORDER BY i);
            CONTINUE WHEN cardinality(idx) = 0;
            need := (SELECT sum(p_costs[i]) FROM unnest(idx) i);
        END IF;
        -- A shard that holds all of it and that no other transaction holds: first the one of
        -- this backend (no other's, mostly), then the fullest. (Locked by key and shard alone: a
        -- lock with the tokens in its condition could keep a row it then skips, and this
        -- transaction would hold a shard it does not know of.)
        SELECT b.shard, dispatch.shard_tokens(b, l, p_now) INTO sh, rest
        FROM dispatch.rate_buckets b JOIN dispatch.rate_limits l ON l.key = b.key
        WHERE b.key = k AND b.shard = pg_backend_pid() % l.shards
        FOR UPDATE OF b SKIP LOCKED;
        holding := FOUND;
        IF NOT holding OR rest < need THEN
            sh := NULL;
            FOREACH g IN ARRAY ARRAY(
                SELECT b.shard FROM dispatch.rate_buckets b
                JOIN dispatch.rate_limits l ON l.key = b.key
                WHERE b.key = k AND dispatch.shard_tokens(b, l, p_now) >= need
                ORDER BY dispatch.shard_tokens(b, l, p_now) DESC)
            LOOP
                SELECT b.shard, dispatch.shard_tokens(b, l, p_now) INTO sh, rest
                FROM dispatch.rate_buckets b JOIN dispatch.rate_limits l ON l.key = b.key
                WHERE b.key = k AND b.shard = g
                FOR UPDATE OF b SKIP LOCKED;
                holding := holding OR FOUND;
                EXIT WHEN FOUND;
            END LOOP;
        END IF;
        IF sh IS NOT NULL AND rest >= need THEN
            UPDATE dispatch.rate_buckets b
            SET tokens = rest - need, refilled_at = greatest(b.refilled_at, p_now)
            WHERE b.key = k AND b.shard = sh;
            CONTINUE;
        END IF;
        -- Else all its shards, pooled; the tasks that fit take their cost in order. Holding a
        -- shard already (another transaction took from it since this one looked), it waits for
        -- none of the others: it pools those it can lock.
        pool := dispatch.rate_pool(k, p_now, waits AND NOT holding);
        IF pool.shards IS NULL THEN
            CONTINUE WHEN NOT EXISTS (SELECT 1 FROM dispatch.rate_limits l WHERE l.key = k);
            pool.tokens := 0;  -- every shard held by others: none of them this time
        END IF;
        rest := pool.tokens;
        FOREACH g IN ARRAY idx LOOP
            IF p_costs[g] <= rest THEN
                rest := rest - p_costs[g];
            ELSE
                admitted[g] := false;
                IF pool.refill IS NOT NULL AND p_costs[g] <= pool.capacity THEN
                    until := least(until, p_now + make_interval(
                        secs => (p_costs[g] - rest) / pool.refill));
                END IF;
            END IF;
        END LOOP;
        IF pool.shards IS NOT NULL THEN
            PERFORM dispatch.rate_spread(k, pool.shards, rest, p_now);
        END IF;
    END LOOP;
    PERFORM set_config('dispatch.flow_tickets', pos::text, true);
END
$$;

-- Tells the engines of every replica when a rate limit that held a task back will have refilled
-- (channel dispatch_due, payload its epoch), so that assignment resumes then and not at the next
-- tick. Identical payloads fold.
CREATE FUNCTION dispatch.flow_wake(p_at timestamptz) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('dispatch_due', extract(epoch FROM p_at)::text)
$$;

-- An assignment by hand (raw SQL: the claim and the assigner, dispatch.via = 'fn', use
-- flow_grant) is held to the limits too: it is refused while its concurrency key is at its cap,
-- and it takes its cost from its bucket (which may go below zero, and waits to refill). Named to
-- run after tasks_before_update, so the agent's row is locked before the flow locks.
CREATE FUNCTION dispatch.tasks_flow_count() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    at   timestamptz := coalesce(NEW.assigned_at, now());
    cap  integer;
    used integer;
    pool record;
BEGIN
    IF coalesce(current_setting('dispatch.via', true), '') <> 'fn' THEN
        IF NEW.concurrency_key IS NOT NULL THEN
            SELECT l.max_active INTO cap FROM dispatch.concurrency_limits l
            WHERE l.key = NEW.concurrency_key;
            IF FOUND THEN
                PERFORM pg_advisory_xact_lock(dispatch.concurrency_lock(NEW.concurrency_key), -1);
                -- The rows this statement assigned before this one are counted too.
                SELECT count(*) INTO used FROM dispatch.tasks tk
                WHERE tk.status IN ('assigned', 'running')
                  AND tk.concurrency_key = NEW.concurrency_key;
                IF used >= cap THEN
                    RAISE EXCEPTION 'concurrency key % is at its cap (% of % active): task % stays pending',
                        NEW.concurrency_key, used, cap, NEW.task_id
                        USING ERRCODE = 'UD409', COLUMN = 'concurrency_key';
                END IF;
            END IF;
        END IF;
        IF NEW.rate_key IS NOT NULL THEN
            pool := dispatch.rate_pool(NEW.rate_key, at, true);
            IF pool.shards IS NOT NULL THEN
                PERFORM dispatch.rate_spread(NEW.rate_key, pool.shards, pool.tokens - NEW.cost, at);
            END IF;
        END IF;
        PERFORM set_config('dispatch.flow_tickets',
            coalesce(nullif(current_setting('dispatch.flow_tickets', true), ''), '0'), true);
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_flow_count BEFORE UPDATE OF status ON dispatch.tasks
    FOR EACH ROW WHEN (OLD.status = 'pending' AND NEW.status = 'assigned'
                       AND (NEW.rate_key IS NOT NULL OR NEW.concurrency_key IS NOT NULL))
    EXECUTE FUNCTION dispatch.tasks_flow_count();

---------------------------------------------------------------------------------------------------
-- Parking: a backlog held back by a concurrency key's cap out of the walk
---------------------------------------------------------------------------------------------------

-- Parks these pending tasks, which the walk found held back by their concurrency key's cap. Rows
-- another transaction holds are left in the walk.
CREATE FUNCTION dispatch.flow_park(p_task_ids uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE dispatch.tasks tk SET parked = true
    FROM (SELECT x.task_id FROM dispatch.tasks x
          WHERE x.task_id = ANY (p_task_ids) AND x.status = 'pending' AND NOT x.parked
            AND x.concurrency_key IS NOT NULL
          FOR NO KEY UPDATE SKIP LOCKED) p
    WHERE tk.task_id = p.task_id;
END
$$;

-- Returns up to p_count parked tasks of a key to the walk, first in line first; how many.
CREATE FUNCTION dispatch.flow_unpark_key(p_key text, p_count integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    WITH back AS (
        UPDATE dispatch.tasks tk SET parked = false
        FROM (SELECT x.task_id FROM dispatch.tasks x
              WHERE x.status = 'pending' AND x.parked AND x.concurrency_key = p_key
              ORDER BY x.queue_priority DESC, x.queue_at
              LIMIT p_count
              FOR NO KEY UPDATE SKIP LOCKED) b
        WHERE tk.task_id = b.task_id
        RETURNING 1
    )
    SELECT count(*) INTO n FROM back;
    RETURN n;
END
$$;

-- A task of a key that stops being active (ends, or goes back to pending) frees a slot: the
-- first parked task of its key comes back to the walk.
CREATE FUNCTION dispatch.tasks_flow_unpark() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM dispatch.flow_unpark_key(NEW.concurrency_key, 1);
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_flow_unpark AFTER UPDATE OF status ON dispatch.tasks
    FOR EACH ROW WHEN (OLD.status IN ('assigned', 'running')
                       AND NEW.status NOT IN ('assigned', 'running')
                       AND NEW.concurrency_key IS NOT NULL)
    EXECUTE FUNCTION dispatch.tasks_flow_unpark();

-- The reaper's sweep, every tick: a key with parked tasks and room under its cap (a walk parked
-- a task on a count taken just before a task of its key ended, so that no end unparked it; or
-- its cap went away) gets as many back as it has room for. Reads one index entry per key with
-- parked tasks.
CREATE FUNCTION dispatch.flow_unpark() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    k    text;
    cap  integer;
    room integer;
    n    integer := 0;
BEGIN
    FOR k IN
        WITH RECURSIVE keys AS (
            SELECT (SELECT min(tk.concurrency_key) FROM dispatch.tasks tk
                    WHERE tk.status = 'pending' AND tk.parked) AS key
            UNION ALL
            SELECT (SELECT min(tk.concurrency_key) FROM dispatch.tasks tk
                    WHERE tk.status = 'pending' AND tk.parked AND tk.concurrency_key > keys.key)
            FROM keys WHERE keys.key IS NOT NULL
        )
        SELECT keys.key FROM keys WHERE keys.key IS NOT NULL
    LOOP
        SELECT l.max_active INTO cap FROM dispatch.concurrency_limits l WHERE l.key = k;
        room := CASE WHEN cap IS NULL THEN 1000000 ELSE cap - dispatch.concurrency_used(k) END;
        IF room > 0 THEN
            n := n + dispatch.flow_unpark_key(k, room);
        END IF;
    END LOOP;
    IF n > 0 THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    RETURN n;
END
$$;

-- Every rule that holds back a pending task now (empty: none does): its availability, its
-- concurrency key, its rate key, and fair share when its tenant's earlier tasks pushed it back in
-- line. With the task's tenant and effective priority, for explain.
CREATE FUNCTION dispatch.task_hold(p_task_id uuid, p_now timestamptz DEFAULT now())
RETURNS TABLE (tenant text, effective_priority integer, reasons text[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    t     dispatch.tasks;
    hold  record;
    ahead bigint;
BEGIN
    SELECT * INTO t FROM dispatch.tasks tk WHERE tk.task_id = p_task_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task % not found', p_task_id USING ERRCODE = 'UD404';
    END IF;
    tenant := coalesce(t.owner, t.requester);
    effective_priority := CASE WHEN t.status = 'pending' THEN t.queue_priority END;
    reasons := '{}';
    IF t.status = 'pending' THEN
        IF t.available_at > p_now THEN
            reasons := reasons || format('not available until %s',
                to_char(t.available_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'));
        END IF;
        hold := dispatch.flow_hold(t.concurrency_key, t.rate_key, t.cost, p_now);
        IF hold.reason IS NOT NULL THEN
            reasons := reasons || hold.reason;
        END IF;
        IF t.queue_at > t.available_at THEN
            SELECT count(*) INTO ahead FROM dispatch.tasks tk
            WHERE tk.status = 'pending' AND coalesce(tk.owner, tk.requester) = tenant
              AND tk.priority = t.priority AND tk.queue_at < t.queue_at;
            IF ahead > 0 THEN
                reasons := reasons || format(
                    'tenant %s''s fair share: %s of its tasks at priority %s are ahead in line',
                    tenant, ahead, t.priority);
            END IF;
        END IF;
    END IF;
    RETURN NEXT;
END
$$;

---------------------------------------------------------------------------------------------------
-- The DBA and admin surface: weights, caps and buckets
---------------------------------------------------------------------------------------------------

CREATE FUNCTION dispatch.flow_check_key(p_key text, p_column text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_key IS NULL OR char_length(p_key) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION '% must be 1 to 256 characters', p_column
            USING ERRCODE = 'UD400', COLUMN = p_column;
    END IF;
END
$$;

-- A tenant's weight for fair share (default 1); it places the tenant's tasks queued from now on.
CREATE FUNCTION dispatch.tenant_weight_set(
    p_tenant text, p_weight float8, p_now timestamptz DEFAULT now()
)
RETURNS dispatch.tenant_weights
LANGUAGE plpgsql AS $$
DECLARE
    r dispatch.tenant_weights;
BEGIN
    PERFORM dispatch.flow_check_key(p_tenant, 'tenant');
    IF p_weight IS NULL OR NOT (p_weight > 0 AND p_weight <= 1000) THEN
        RAISE EXCEPTION 'weight must be greater than 0 and at most 1000 (got %)', p_weight
            USING ERRCODE = 'UD400', COLUMN = 'weight';
    END IF;
    INSERT INTO dispatch.tenant_weights AS tw (tenant, weight, updated_at)
    VALUES (p_tenant, p_weight, p_now)
    ON CONFLICT (tenant) DO UPDATE SET weight = EXCLUDED.weight, updated_at = p_now
    RETURNING * INTO r;
    RETURN r;
END
$$;

CREATE FUNCTION dispatch.tenant_weight_delete(p_tenant text) RETURNS boolean
LANGUAGE sql AS $$
    WITH gone AS (DELETE FROM dispatch.tenant_weights WHERE tenant = p_tenant RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM gone)
$$;

-- Sets a key's cap; it counts the key's tasks active from then on, those already active included.
CREATE FUNCTION dispatch.concurrency_limit_set(
    p_key text, p_max_active integer, p_now timestamptz DEFAULT now()
) RETURNS dispatch.concurrency_limits
LANGUAGE plpgsql AS $$
DECLARE
    r dispatch.concurrency_limits;
BEGIN
    PERFORM dispatch.flow_check_key(p_key, 'key');
    IF p_max_active IS NULL OR p_max_active NOT BETWEEN 0 AND 1000000 THEN
        RAISE EXCEPTION 'max_active must be between 0 and 1000000 (got %)', p_max_active
            USING ERRCODE = 'UD400', COLUMN = 'max_active';
    END IF;
    INSERT INTO dispatch.concurrency_limits AS l (key, max_active, updated_at)
    VALUES (p_key, p_max_active, p_now)
    ON CONFLICT (key) DO UPDATE SET max_active = EXCLUDED.max_active, updated_at = p_now
    RETURNING * INTO r;
    PERFORM dispatch.flow_unpark_key(p_key, 1000000);  -- the walk parks again what still waits
    PERFORM pg_notify('dispatch_work', '');
    RETURN r;
END
$$;

CREATE FUNCTION dispatch.concurrency_limit_delete(p_key text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM dispatch.concurrency_limits WHERE key = p_key;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM dispatch.flow_unpark_key(p_key, 1000000);
    PERFORM pg_notify('dispatch_work', '');
    RETURN true;
END
$$;

-- Sets a key's bucket. A new bucket starts full; a changed one keeps the tokens it has (refilled
-- at its old rate up to now, and at most the new capacity), spread over the shards of its new
-- capacity.
CREATE FUNCTION dispatch.rate_limit_set(
    p_key text, p_capacity float8, p_refill_per_second float8, p_now timestamptz DEFAULT now()
) RETURNS dispatch.rate_limits
LANGUAGE plpgsql AS $$
DECLARE
    r    dispatch.rate_limits;
    pool record;
BEGIN
    PERFORM dispatch.flow_check_key(p_key, 'key');
    IF p_capacity IS NULL OR NOT (p_capacity >= 1 AND p_capacity <= 1e12) THEN
        RAISE EXCEPTION 'capacity must be between 1 and 1e12 (got %)', p_capacity
            USING ERRCODE = 'UD400', COLUMN = 'capacity';
    END IF;
    IF p_refill_per_second IS NULL OR NOT (p_refill_per_second > 0 AND p_refill_per_second <= 1e12) THEN
        RAISE EXCEPTION 'refill_per_second must be greater than 0 and at most 1e12 (got %)',
            p_refill_per_second USING ERRCODE = 'UD400', COLUMN = 'refill_per_second';
    END IF;
    INSERT INTO dispatch.rate_limits AS l (key, capacity, refill_per_second, shards, updated_at)
    VALUES (p_key, p_capacity, p_refill_per_second, dispatch.rate_shards(p_capacity), p_now)
    ON CONFLICT (key) DO UPDATE SET updated_at = p_now;  -- locks the row of an existing one
    pool := dispatch.rate_pool(p_key, p_now, true);
    UPDATE dispatch.rate_limits l
    SET capacity = p_capacity, refill_per_second = p_refill_per_second,
        shards = dispatch.rate_shards(p_capacity)
    WHERE l.key = p_key
    RETURNING * INTO r;
    DELETE FROM dispatch.rate_buckets b WHERE b.key = p_key;
    INSERT INTO dispatch.rate_buckets (key, shard, tokens, refilled_at)
    SELECT p_key, g, least(p_capacity, coalesce(pool.tokens, p_capacity)) / r.shards, p_now
    FROM generate_series(0, r.shards - 1) g;
    PERFORM pg_notify('dispatch_work', '');
    RETURN r;
END
$$;

CREATE FUNCTION dispatch.rate_limit_delete(p_key text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM dispatch.rate_limits WHERE key = p_key;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_notify('dispatch_work', '');
    RETURN true;
END
$$;

-- The caps with the tasks of each key assigned or running now, for the API, the metrics and psql.
CREATE FUNCTION dispatch.concurrency_limit_list()
RETURNS TABLE (key text, max_active integer, active_tasks integer, updated_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT l.key, l.max_active,
           (SELECT count(*) FROM dispatch.tasks tk
            WHERE tk.status IN ('assigned', 'running') AND tk.concurrency_key = l.key)::integer,
           l.updated_at
    FROM dispatch.concurrency_limits l ORDER BY l.key
$$;

-- The buckets as of p_now, for the API, the metrics and psql.
CREATE FUNCTION dispatch.rate_limit_list(p_now timestamptz DEFAULT now())
RETURNS TABLE (key text, capacity float8, refill_per_second float8, tokens float8,
               updated_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT l.key, l.capacity, l.refill_per_second, dispatch.rate_tokens(l, p_now), l.updated_at
    FROM dispatch.rate_limits l ORDER BY l.key
$$;

-- Pending, available tasks held back now, by rule: a concurrency key at its cap, a rate key short
-- of the task's cost, or fair share (placed in line after its tenant's earlier tasks, keyed by
-- tenant). For the metrics, read at scrape time.
CREATE FUNCTION dispatch.flow_held(p_now timestamptz DEFAULT now())
RETURNS TABLE (rule text, key text, tasks bigint)
LANGUAGE sql STABLE AS $$
    SELECT 'concurrency', l.key, count(*)
    FROM dispatch.concurrency_limit_list() l
    JOIN dispatch.tasks tk ON tk.concurrency_key = l.key
    WHERE tk.status = 'pending' AND tk.available_at <= p_now AND l.active_tasks >= l.max_active
    GROUP BY l.key
    UNION ALL
    SELECT 'rate', l.key, count(*)
    FROM dispatch.rate_limits l
    JOIN dispatch.tasks tk ON tk.rate_key = l.key
    WHERE tk.status = 'pending' AND tk.available_at <= p_now
      AND dispatch.rate_tokens(l, p_now) < tk.cost
    GROUP BY l.key
    UNION ALL
    SELECT 'fair_share', coalesce(tk.owner, tk.requester), count(*)
    FROM dispatch.tasks tk
    WHERE tk.status = 'pending' AND tk.available_at <= p_now AND tk.queue_at > tk.available_at
    GROUP BY 2
$$;
