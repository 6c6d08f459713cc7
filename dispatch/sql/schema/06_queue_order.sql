-- Flow control, the order of the pending queue: fair share across tenants and priority aging. Both
-- are kept in the rows the walk reads (tasks.queue_priority, tasks.queue_at) so that the walk
-- stays one ordered index scan:
--   * A task's place in line (queue_at) is its available_at, or, when its tenant (owner, else
--     requester) already has tasks waiting at the same priority, 1/weight seconds after the last
--     of them. A tenant's flood is spread out in time, and another tenant's task lands between
--     its first ones instead of behind all of them (weighted fair queuing with a virtual clock).
--   * Its effective priority (queue_priority) is its priority, raised by one level per
--     config.aging_ms that it has waited in line, up to 10. The sweep dispatch.queue_age raises it
--     when due (age_due_at); the assigner and the claim run the sweep before they walk.

CREATE TABLE dispatch.tenant_weights (
    tenant     text PRIMARY KEY
               CONSTRAINT tenant_weights_tenant_length CHECK (char_length(tenant) BETWEEN 1 AND 256),
    -- A tenant of weight 2 gets two tasks assigned for every one of a tenant of weight 1. From
    -- 0.001 (its tasks queue 1,000 s apart) to 1000 (1 ms apart): a smaller weight put a
    -- tenant's next task past the end of time (1/5e-324 overflows), and failed its creates.
    weight     float8 NOT NULL
               CONSTRAINT tenant_weights_weight_range CHECK (weight >= 0.001 AND weight <= 1000),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- When a task queued at p_queue_at with this priority reaches its next effective priority after
-- p_level (NULL: never: aging is off, it is at 10, or that is past the last instant a row may hold,
-- so a task queued near the end of time is still created and only never ages). STABLE, as
-- timestamptz + interval is: declared IMMUTABLE it could not be inlined, and every create ran it
-- as a function call, planned anew (0.1 ms, a fifth of the create's server time).
CREATE FUNCTION dispatch.queue_age_due(
    p_queue_at timestamptz, p_priority integer, p_level integer, p_aging_ms integer
) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_aging_ms > 0 AND p_level < 10
                     AND dispatch.time_in_range(p_queue_at + make_interval(
                         secs => (p_level - p_priority + 1) * p_aging_ms / 1000.0))
                THEN p_queue_at + make_interval(
                         secs => (p_level - p_priority + 1) * p_aging_ms / 1000.0) END
$$;

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
    -- At most the last instant a row may hold (dispatch.time_in_range): a tenant whose line
    -- reaches the end of time queues its next tasks there, rather than failing to create them.
    -- (No earlier task: prev is NULL and so is the CASE, which greatest() ignores.)
    NEW.queue_at := greatest(NEW.available_at, CASE WHEN prev IS NOT NULL THEN least(
        prev + make_interval(secs => 1.0 / greatest(coalesce(w, 1), 0.001)),
        '9999-01-01 00:00:00+00'::timestamptz - interval '1 microsecond') END);
    NEW.queue_priority := NEW.priority;
    -- Back in line: the walk parks it again if its key is still at its cap, the reaper's sweep if
    -- still no agent could take it.
    NEW.parked := false;
    NEW.unmatched_at := NULL;
    NEW.age_due_at := dispatch.queue_age_due(NEW.queue_at, NEW.priority, NEW.priority, aging);
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_queue_place
    BEFORE INSERT OR UPDATE OF status, priority, available_at ON dispatch.tasks
    FOR EACH ROW WHEN (NEW.status = 'pending') EXECUTE FUNCTION dispatch.tasks_queue_place();

-- Whether some pending task's effective priority is due to rise: the claim and the assigner run
-- the sweep only then. Written as the first row in age_due_at order, bounded by p_now, so that its
-- one sensible plan starts tasks_pending_aging_idx and stops at the first entry past p_now. (As
-- EXISTS, the generic plan guesses a third of the pending rows match the inequality, so another
-- pending index can look as good; in one measured pull drain that check cost 2.9 ms a claim.)
-- (plpgsql: its plan is kept for the session, where a SQL function with a subquery is planned
-- anew at each call.)
CREATE FUNCTION dispatch.queue_aging_due(p_now timestamptz) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT tk.age_due_at FROM dispatch.tasks tk
            WHERE tk.status = 'pending' AND tk.age_due_at <= p_now
            ORDER BY tk.age_due_at LIMIT 1) IS NOT NULL;
END
$$;

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
            age_due_at = dispatch.queue_age_due(tk.queue_at, tk.priority, due.level, aging)
        FROM due WHERE tk.task_id = due.task_id
        RETURNING 1
    )
    SELECT count(*) INTO n FROM aged;
    RETURN n;
END
$$;
