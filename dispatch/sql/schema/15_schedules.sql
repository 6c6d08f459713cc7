-- Recurring work: a schedule makes one task per fire of its cron expression.
--
-- The fire times come from the cron expression in the schedule's time zone, which Python reads
-- (dispatch/cron.py); the database holds the rest and makes each fire exactly once. A scheduler
-- (every `dispatch serve` runs one) locks the due schedules with SKIP LOCKED, works out their
-- fires by the database's clock and records them with dispatch.schedule_fire in the same
-- transaction, which also moves next_fire_at on. Every fire's task carries the idempotency key
-- `fire:<time>` under the requester `schedule:<name>`: whatever replicas, restarts or clocks do,
-- a fire makes at most one task (tasks_idempotency_key_idx); the row lock keeps it to one attempt.
--
-- A DBA may INSERT or UPDATE a row in psql: the trigger clears next_fire_at when the timing
-- changes, and the scheduler, woken by NOTIFY dispatch_schedules, computes it (or, for an
-- expression or zone it cannot read, pauses the schedule with last_error saying why).

CREATE TABLE dispatch.schedules (
    -- A NATS subject token and a URL segment: letters, digits, '_' and '-'.
    name           text PRIMARY KEY CONSTRAINT schedules_name_check
                   CHECK (name ~ '^[A-Za-z0-9_-]{1,128}$'),
    cron           text NOT NULL CONSTRAINT schedules_cron_check
                   CHECK (char_length(cron) BETWEEN 1 AND 256),
    timezone       text NOT NULL DEFAULT 'UTC' CONSTRAINT schedules_timezone_check
                   CHECK (char_length(timezone) BETWEEN 1 AND 64),
    -- The body of a task create (POST /api/v1/tasks) without available_at.
    template       jsonb NOT NULL CONSTRAINT schedules_template_check
                   CHECK (jsonb_typeof(template) = 'object' AND template ? 'title'),
    -- skip: no new task while the last fire's task is not finished; allow: one every fire.
    overlap        text NOT NULL DEFAULT 'skip' CONSTRAINT schedules_overlap_check
                   CHECK (overlap IN ('skip', 'allow')),
    -- What fires missed while no scheduler ran (or the schedule was paused) make, on the next
    -- look: none, the latest one only, or all of them (at most catch_up_limit, the newest).
    catch_up       text NOT NULL DEFAULT 'latest' CONSTRAINT schedules_catch_up_check
                   CHECK (catch_up IN ('none', 'latest', 'all')),
    catch_up_limit integer NOT NULL DEFAULT 100 CONSTRAINT schedules_catch_up_limit_check
                   CHECK (catch_up_limit BETWEEN 1 AND 10000),
    paused         boolean NOT NULL DEFAULT false,
    -- NULL until the scheduler has computed it (a new, changed or resumed schedule).
    next_fire_at   timestamptz,
    last_fire_at   timestamptz,
    last_task_id   uuid,
    fired_count    bigint NOT NULL DEFAULT 0,
    skipped_count  bigint NOT NULL DEFAULT 0,
    missed_count   bigint NOT NULL DEFAULT 0,
    -- Why the scheduler paused the schedule (an expression or time zone it cannot read).
    last_error     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The scheduler's look: active schedules by their next fire (NULL first: still to compute).
CREATE INDEX schedules_due_idx ON dispatch.schedules (next_fire_at NULLS FIRST) WHERE NOT paused;

-- A change of the timing (or a resume) clears next_fire_at for the scheduler to compute from
-- now: a schedule edited never keeps its old timing, and a resumed one does not replay the fires
-- of its pause. Every change wakes the schedulers.
CREATE FUNCTION dispatch.schedules_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.next_fire_at := NULL;
    ELSIF NEW.cron IS DISTINCT FROM OLD.cron OR NEW.timezone IS DISTINCT FROM OLD.timezone
          OR (OLD.paused AND NOT NEW.paused) THEN
        NEW.next_fire_at := NULL;
        IF NOT NEW.paused THEN
            NEW.last_error := NULL;
        END IF;
    END IF;
    NEW.updated_at := now();
    PERFORM pg_notify('dispatch_schedules', '');
    RETURN NEW;
END
$$;

CREATE TRIGGER schedules_changed BEFORE INSERT OR UPDATE OF cron, timezone, template, overlap,
    catch_up, catch_up_limit, paused ON dispatch.schedules
    FOR EACH ROW EXECUTE FUNCTION dispatch.schedules_changed();

-- The task one fire makes, from the template (the same fields and defaults as dispatch.task_create
-- takes from a POST /api/v1/tasks), keyed so that a fire makes it once. Returns the task, and
-- whether this call made it (false: the fire already had its task).
CREATE FUNCTION dispatch.schedule_task(
    p_schedule dispatch.schedules, p_key text, p_fire_at timestamptz,
    OUT task dispatch.tasks, OUT created boolean
)
LANGUAGE sql AS $$
    SELECT c.task, c.created FROM dispatch.task_create(
        title => p_schedule.template->>'title',
        description => coalesce(p_schedule.template->>'description', ''),
        requester => 'schedule:' || p_schedule.name,
        owner => p_schedule.template->>'owner',
        required_capabilities => ARRAY(SELECT jsonb_array_elements_text(
            coalesce(p_schedule.template->'required_capabilities', '[]'))),
        priority => coalesce((p_schedule.template->>'priority')::integer, 0),
        timeout_seconds => (p_schedule.template->>'timeout_seconds')::integer,
        heartbeat_seconds => (p_schedule.template->>'heartbeat_seconds')::integer,
        max_retries => coalesce((p_schedule.template->>'max_retries')::integer, 3),
        metadata => coalesce(p_schedule.template->'metadata', '{}')
            || jsonb_build_object('schedule', p_schedule.name, 'fire_at', p_fire_at),
        parent_task_id => (p_schedule.template->>'parent_task_id')::uuid,
        source => 'schedule',
        idempotency_key => p_key,
        concurrency_key => p_schedule.template->>'concurrency_key',
        rate_key => p_schedule.template->>'rate_key',
        cost => coalesce((p_schedule.template->>'cost')::integer, 1),
        approval => p_schedule.template->>'approval'
    ) c
$$;

-- Whether a new fire of the schedule waits for its last one (overlap 'skip' and that task is
-- neither finished nor gone).
CREATE FUNCTION dispatch.schedule_running(p_schedule dispatch.schedules) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p_schedule.overlap = 'skip' AND EXISTS (
        SELECT 1 FROM dispatch.tasks
        WHERE task_id = p_schedule.last_task_id
          AND status IN ('blocked', 'pending', 'assigned', 'running', 'review'))
$$;

-- Records the fires the scheduler found due (oldest first; `p_missed` more were left out by the
-- catch-up rule) and moves next_fire_at to p_next, on the row the caller has locked. A fire makes
-- a task, or, under overlap 'skip' while the last fire's task runs, is skipped: then the running
-- task gets a 'schedule_skipped' event saying so. Each task made gets a 'schedule_fired' event.
-- Returns the tasks made.
CREATE FUNCTION dispatch.schedule_fire(
    p_name text, p_fires timestamptz[], p_next timestamptz, p_missed integer DEFAULT 0
) RETURNS SETOF dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    s dispatch.schedules;
    fire timestamptz;
    made record;
BEGIN
    SELECT * INTO s FROM dispatch.schedules WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'schedule % does not exist', p_name USING ERRCODE = 'UD404';
    END IF;
    FOREACH fire IN ARRAY coalesce(p_fires, '{}') LOOP
        IF dispatch.schedule_running(s) THEN
            s.skipped_count := s.skipped_count + 1;
            PERFORM dispatch.event_write(s.last_task_id, 'schedule_skipped', 'schedule:' || s.name,
                                         jsonb_build_object('schedule', s.name, 'fire_at', fire),
                                         now());
            CONTINUE;
        END IF;
        SELECT r.task, r.created INTO made FROM dispatch.schedule_task(
            s, 'fire:' || to_char(fire AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), fire
        ) r;
        IF made.created THEN
            s.fired_count := s.fired_count + 1;
            PERFORM dispatch.event_write((made.task).task_id, 'schedule_fired',
                                         'schedule:' || s.name,
                                         jsonb_build_object('schedule', s.name, 'fire_at', fire),
                                         now());
            RETURN NEXT made.task;
        END IF;
        s.last_task_id := (made.task).task_id;
        s.last_fire_at := fire;
    END LOOP;
    -- Not through the trigger's columns: recording fires is not a change of the schedule.
    UPDATE dispatch.schedules SET
        next_fire_at = p_next, last_fire_at = s.last_fire_at, last_task_id = s.last_task_id,
        fired_count = s.fired_count, skipped_count = s.skipped_count,
        missed_count = missed_count + greatest(coalesce(p_missed, 0), 0)
    WHERE name = p_name;
END
$$;

-- "Run now": one task from the schedule's template at once, outside its timing (overlap does not
-- apply: it was asked for); `p_actor` (default the session's) is who asked. Returns the task.
CREATE FUNCTION dispatch.schedule_run_now(
    p_name text, p_actor text DEFAULT NULL, p_now timestamptz DEFAULT now()
)
RETURNS dispatch.tasks
LANGUAGE plpgsql AS $$
DECLARE
    s dispatch.schedules;
    made dispatch.tasks;
BEGIN
    SELECT * INTO s FROM dispatch.schedules WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'schedule % does not exist', p_name USING ERRCODE = 'UD404';
    END IF;
    SELECT (r.task).* INTO made
    FROM dispatch.schedule_task(s, 'run:' || gen_random_uuid(), p_now) r;
    PERFORM dispatch.event_write(made.task_id, 'schedule_fired',
                                 coalesce(p_actor, dispatch.session_actor()),
                                 jsonb_build_object('schedule', s.name, 'fire_at', p_now,
                                                    'run_now', true),
                                 p_now);
    UPDATE dispatch.schedules SET last_task_id = made.task_id, fired_count = fired_count + 1
    WHERE name = p_name;
    RETURN made;
END
$$;

-- The scheduler's record of a schedule it cannot compute: paused, with the reason.
CREATE FUNCTION dispatch.schedule_broken(p_name text, p_error text) RETURNS void
LANGUAGE sql AS $$
    UPDATE dispatch.schedules SET paused = true, last_error = p_error, next_fire_at = NULL
    WHERE name = p_name
$$;

-- psql's pause and resume (the API's too): one function sets `paused`, the trigger does the rest.
CREATE FUNCTION dispatch.schedule_set_paused(p_name text, p_paused boolean)
RETURNS dispatch.schedules
LANGUAGE plpgsql AS $$
DECLARE
    s dispatch.schedules;
BEGIN
    UPDATE dispatch.schedules SET paused = p_paused WHERE name = p_name RETURNING * INTO s;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'schedule % does not exist', p_name USING ERRCODE = 'UD404';
    END IF;
    RETURN s;
END
$$;

CREATE FUNCTION dispatch.schedule_pause(p_name text) RETURNS dispatch.schedules
LANGUAGE sql AS $$ SELECT dispatch.schedule_set_paused(p_name, true) $$;

CREATE FUNCTION dispatch.schedule_resume(p_name text) RETURNS dispatch.schedules
LANGUAGE sql AS $$ SELECT dispatch.schedule_set_paused(p_name, false) $$;
