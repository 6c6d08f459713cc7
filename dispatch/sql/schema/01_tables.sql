-- Tables: tasks, their event log (history and outbox), the agent directory, the settings row.
-- The migrator creates the schema `dispatch` and dispatch.schema_migrations before these files run.
-- Every timestamp a row holds lies in this range, so that every client (Python's datetime ends at
-- year 9999, a deadline's epoch travels in a NOTIFY) can read it back. Checked by constraint, so a
-- value outside it is refused before anything is written, from psql too. (The constraints write
-- the range out, as least() >= its start and greatest() < its end over their columns, NULLs aside:
-- a constraint is planned again by every statement that writes the row, and each call of this
-- function in it was inlined anew, its body parsed every time: about a fifth of a task INSERT's
-- server time.)
CREATE FUNCTION dispatch.time_in_range(t timestamptz) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT t IS NULL OR (t >= '1970-01-01 00:00:00+00' AND t < '9999-01-01 00:00:00+00')
$$;

-- blocked: waits out of the queue for the tasks it depends on (09_dependencies.sql) or for its
-- approval; review: its agent's result waits to be accepted (18_gates.sql); suspended: its agent
-- set it aside until a signal comes (19_signals.sql).
CREATE TYPE dispatch.task_status AS ENUM (
    'blocked', 'pending', 'assigned', 'running', 'suspended', 'review', 'completed', 'failed',
    'timed_out', 'cancelled'
);

CREATE TYPE dispatch.agent_status AS ENUM (
    'ready', 'sleeping', 'busy', 'degraded', 'stopped', 'unknown'
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
    ui_notify_until          timestamptz CHECK (ui_notify_until >= '1970-01-01 00:00:00+00'
                                                AND ui_notify_until < '9999-01-01 00:00:00+00'),
    -- Priority aging (flow control, 06_queue_order.sql): a pending task's effective priority
    -- rises one level per aging_ms of waiting, up to 10; 0 turns aging off.
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
    last_assigned_at timestamptz,
    last_seen_at     timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT agents_times_range CHECK (
        least(last_assigned_at, last_seen_at, created_at, updated_at) >= '1970-01-01 00:00:00+00'
        AND greatest(last_assigned_at, last_seen_at, created_at, updated_at) < '9999-01-01 00:00:00+00')
);

-- Device ownership (Alexandria): agent_id belongs to owner.
CREATE TABLE dispatch.agent_owners (
    agent_id   text NOT NULL,
    owner      text NOT NULL,
    source     text NOT NULL DEFAULT 'alexandria',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, owner)
);

-- The checks on what a task's columns may hold are of two kinds. Those on the columns its
-- transitions write (its times, lease, retry_count, progress, waiting_on) are CHECK constraints.
-- Those on the columns set when it is created and rarely changed after (title, description,
-- priority, limits, keys, metadata, approval, waiting_for, feedback, trace_context) are checked
-- by the insert triggers (UD400, naming the column) and by tasks_values_checked (02_guards.sql)
-- on an UPDATE that writes one of those columns, raising the same check_violation under the same
-- constraint name:
-- Postgres plans every CHECK constraint of a table again in each statement that writes one of its
-- rows, whichever columns it changes, and these fifteen cost each assignment and completion about
-- 50 us for columns they never touch.
CREATE TABLE dispatch.tasks (
    task_id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    title                 text NOT NULL,
    description           text NOT NULL DEFAULT '',
    requester             text NOT NULL,
    -- NULL: not owner-scoped (any eligible agent); set: only that owner's agents (owner filter).
    owner                 text,
    source                text NOT NULL,
    required_capabilities text[] NOT NULL DEFAULT '{}',
    priority              integer NOT NULL DEFAULT 0,
    status                dispatch.task_status NOT NULL DEFAULT 'pending',
    assigned_agent        text,
    -- Which of its agent's slots (1 .. its limit) the task holds while assigned or running
    -- (dispatch.slots_take); kept afterwards as a record of where it ran.
    slot                  integer,
    -- The assigner gave it (true) or the agent's own claim took it (false): a claim hands the
    -- agent the pushed tasks it has not started, and not again those it took itself.
    pushed                boolean NOT NULL DEFAULT false,
    -- The Idempotency-Key of the claim that took it (NULL: none, or the assigner gave it): the same
    -- claim sent again, its answer lost, returns what it took instead of taking more.
    claim_key             text,
    previous_agents       text[] NOT NULL DEFAULT '{}',
    retry_count           integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    -- The token of the current (or last) assignment (0: never assigned), drawn at random by each
    -- one (dispatch.lease_next), so that it stays unique when a failover loses WAL. Reports may
    -- present it: a report naming another assignment is stale, even from the same agent.
    lease                 integer NOT NULL DEFAULT 0 CHECK (lease >= 0),
    max_retries           integer NOT NULL DEFAULT 3,
    timeout_seconds       integer NOT NULL,
    heartbeat_seconds     integer,
    available_at          timestamptz NOT NULL DEFAULT now()
                          CONSTRAINT tasks_available_at_range CHECK (
                              available_at >= '1970-01-01 00:00:00+00' AND available_at < '9999-01-01 00:00:00+00'),
    deadline_at           timestamptz,
    -- Set when the assigned agent was asleep: it must start before this or the task goes back.
    wake_deadline_at      timestamptz,
    metadata              jsonb NOT NULL DEFAULT '{}',
    progress              jsonb
                          CONSTRAINT tasks_progress_object CHECK (jsonb_typeof(progress) = 'object'),
    result                jsonb,
    error                 text,
    parent_task_id        uuid REFERENCES dispatch.tasks (task_id) ON DELETE SET NULL,
    idempotency_key       text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    assigned_at           timestamptz,
    started_at            timestamptz,
    last_progress_at      timestamptz,
    completed_at          timestamptz,
    -- Flow control: at most concurrency_limits.max_active tasks of one concurrency_key are
    -- active at once (03_concurrency.sql); a task with a rate_key takes `cost` tokens from that
    -- key's bucket when it is assigned (05_rate_limits.sql).
    concurrency_key       text,
    rate_key              text,
    cost                  integer NOT NULL DEFAULT 1,
    -- The task's place in the pending queue, kept by the tasks_queue_place trigger and the aging
    -- sweep (dispatch.queue_age): its effective priority (priority, raised by aging), the instant
    -- it queues at (available_at, or later when its tenant already has tasks waiting at this
    -- priority: fair share) and when it next ages.
    queue_priority        integer NOT NULL DEFAULT 0,
    queue_at              timestamptz NOT NULL DEFAULT now(),
    age_due_at            timestamptz,
    -- A pending task that its concurrency key's cap holds back is parked out of the walk
    -- (tasks_pending_order_idx) until a task of its key ends (04_parking.sql).
    parked                boolean NOT NULL DEFAULT false,
    -- So is one that no agent of the directory could take (none has its capabilities or, with
    -- the owner filter on, belongs to its owner), until one could (10_assignment.sql). Set only
    -- then: when it was last reported `unmatched` ('-infinity': not yet since it was parked).
    unmatched_at          timestamptz CONSTRAINT tasks_unmatched_parked
                          CHECK (unmatched_at IS NULL OR parked),
    -- Dependencies (09_dependencies.sql): how many of the tasks it depends on have not yet let it
    -- run (it is blocked while any has not), and whether any task depends on this one (so that
    -- only such a task's end looks for dependents).
    waiting_on            integer NOT NULL DEFAULT 0 CONSTRAINT tasks_waiting_on_range
                          CHECK (waiting_on >= 0),
    has_dependents        boolean NOT NULL DEFAULT false,
    -- Gates (18_gates.sql): before_start, a person approves it before it may run (counted in
    -- waiting_on until then); review, its agent's result is accepted before it completes; both.
    approval              text,
    approved_by           text,
    approved_at           timestamptz,
    -- Signals (19_signals.sql): what the suspended task waits for (its agent's words), and the
    -- payload of the signal that resumed it, for the agent that runs it next.
    waiting_for           text,
    signal                jsonb,
    -- The reviewer's request for changes, for the next attempt.
    feedback              text,
    -- The W3C trace context of its create ({"traceparent": ..., "tracestate": ...}) while tracing
    -- is on (dispatch.tracing): its assignment, its events and its agent continue that trace.
    trace_context         jsonb,
    CONSTRAINT tasks_times_range CHECK (
        least(deadline_at, wake_deadline_at, created_at, updated_at, assigned_at, started_at,
              last_progress_at, completed_at, queue_at, age_due_at, approved_at)
            >= '1970-01-01 00:00:00+00'
        AND greatest(deadline_at, wake_deadline_at, created_at, updated_at, assigned_at,
                     started_at, last_progress_at, completed_at, queue_at, age_due_at,
                     approved_at)
            < '9999-01-01 00:00:00+00')
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
    WHERE status = 'pending' AND parked AND unmatched_at IS NULL;

-- The rows parked for want of an agent, by what they require, the longest unreported first.
CREATE INDEX tasks_unmatched_idx ON dispatch.tasks (required_capabilities, unmatched_at)
    WHERE status = 'pending' AND unmatched_at IS NOT NULL;

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

-- An agent's active tasks and the slots they hold: read whenever work is given to it, and its
-- claim finds the ones pushed to it that it has not started.
CREATE INDEX tasks_active_agent_idx ON dispatch.tasks (assigned_agent, status) INCLUDE (slot)
    WHERE status IN ('assigned', 'running');

-- The reapers: the active tasks whose deadline passes next, and the suspended ones whose wait
-- ends next (one index rather than two: every transition in and out of assigned or running pays
-- for each partial index on the table).
CREATE INDEX tasks_active_deadline_idx ON dispatch.tasks (deadline_at)
    WHERE status IN ('assigned', 'running', 'suspended');

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

-- Dependencies between tasks (09_dependencies.sql): the edge task_id -> depends_on. Without
-- foreign keys: each would add its triggers to every UPDATE of a task, dependencies or not (about
-- 5 % of a lifecycle's cost). The functions that add edges check that both tasks exist, and a
-- statement trigger removes the edges of deleted tasks (09_dependencies.sql).
CREATE TABLE dispatch.task_dependencies (
    -- The dependent, and the task it waits for.
    task_id    uuid NOT NULL,
    depends_on uuid NOT NULL,
    -- What the dependency's end other than completion does to the dependent: cancel it, or let it
    -- run as if the dependency had completed.
    on_failure text NOT NULL DEFAULT 'cancel'
               CONSTRAINT task_dependencies_on_failure CHECK (on_failure IN ('cancel', 'run')),
    -- The dependency has let the dependent run (it completed, or ended and on_failure is run).
    satisfied  boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, depends_on),
    CONSTRAINT task_dependencies_not_self CHECK (task_id <> depends_on)
);

-- A dependency's dependents, read when it ends.
CREATE INDEX task_dependencies_depends_on_idx ON dispatch.task_dependencies (depends_on);

-- History and transactional outbox in one: written in the transaction that makes the change.
-- Partitioned by time so that retention drops whole partitions instead of deleting rows
-- (16_history.sql): the pruner creates them ahead and drops those past retention. A task's history
-- is kept by time, not by task: no foreign key, so deleting a task leaves its events to their
-- partition. Rows outside every partition land in task_events_default, never in an error, and the
-- pruner moves them into partitions of their own. Every reader finds a task's events by its id, and
-- the relay finds the unpublished ones by their own index, so the primary key leads with the task:
-- an event row then costs two index entries, not three.
CREATE TABLE dispatch.task_events (
    id           bigserial,
    task_id      uuid NOT NULL,
    event        text NOT NULL,
    actor        text NOT NULL,
    payload      jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    -- Set (with published_at) when the relay gave up on the event: NATS refused it for good.
    relay_error  text,
    PRIMARY KEY (task_id, id, created_at),
    CONSTRAINT task_events_times_range CHECK (
        least(created_at, published_at) >= '1970-01-01 00:00:00+00'
        AND greatest(created_at, published_at) < '9999-01-01 00:00:00+00')
) PARTITION BY RANGE (created_at);

CREATE TABLE dispatch.task_events_default PARTITION OF dispatch.task_events DEFAULT;

CREATE INDEX task_events_unpublished_idx ON dispatch.task_events (id) WHERE published_at IS NULL;
