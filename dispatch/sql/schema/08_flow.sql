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
-- Concurrency keys and rate limits decide whether a task may be assigned now. Both live in rows
-- that the assigning transaction locks (after the agents' rows, keys in key order, so it never
-- deadlocks with another assignment). A key's row is its semaphore: under its lock the key's
-- active tasks are counted (tasks_active_concurrency_idx), so the row is never updated and a
-- completion does not touch it (a counter updated by every assignment and completion of a busy
-- key made that one row the hot spot of the whole queue). A bucket's row is updated by every
-- assignment that takes its tokens (the trigger tasks_flow_count, from raw SQL too).

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

-- A token bucket per key: `tokens` as of `refilled_at`; it gains refill_per_second tokens a second
-- up to `capacity`, and every assignment of a task with this rate_key takes the task's cost.
CREATE TABLE dispatch.rate_limits (
    key               text PRIMARY KEY
                      CONSTRAINT rate_limits_key_length CHECK (char_length(key) BETWEEN 1 AND 256),
    capacity          float8 NOT NULL
                      CONSTRAINT rate_limits_capacity_range CHECK (capacity >= 1 AND capacity <= 1e12),
    refill_per_second float8 NOT NULL
                      CONSTRAINT rate_limits_refill_range
                      CHECK (refill_per_second > 0 AND refill_per_second <= 1e12),
    tokens            float8 NOT NULL,
    refilled_at       timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- The tokens in the bucket at p_now.
CREATE FUNCTION dispatch.rate_tokens(r dispatch.rate_limits, p_now timestamptz) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT least(r.capacity, r.tokens + greatest(extract(epoch FROM p_now - r.refilled_at)::float8, 0)
                                        * r.refill_per_second)
$$;

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

-- Whether a task with these flow fields may be assigned at p_now, given what state s (the type
-- dispatch.flow_state, in 01_tables.sql: 04_assignment.sql declares it too) has seen and
-- taken; with p_take an admitted task is counted against its limits in the returned state. A key
-- met for the first time is read, and with p_lock its limit row is locked first (the concurrency
-- key's, then the rate key's: flow_lock's order) so that it is counted as it is now, this
-- transaction's earlier gives included. Without p_lock the verdict is a plan, checked again
-- under the lock before anything is given.
CREATE FUNCTION dispatch.flow_admit(
    s dispatch.flow_state, p_concurrency_key text, p_rate_key text, p_cost integer,
    p_now timestamptz, p_lock boolean, p_take boolean
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
    IF p_concurrency_key IS NOT NULL THEN
        i := array_position(s.ckeys, p_concurrency_key);
        IF i IS NULL THEN
            IF p_lock THEN
                SELECT * INTO cl FROM dispatch.concurrency_limits l WHERE l.key = p_concurrency_key
                FOR UPDATE;
            ELSE
                SELECT * INTO cl FROM dispatch.concurrency_limits l WHERE l.key = p_concurrency_key;
            END IF;
            s.ckeys := s.ckeys || p_concurrency_key;
            s.cmax := s.cmax || cl.max_active;
            -- Counted after the lock (a new snapshot): what earlier holders gave is included.
            s.cused := s.cused || CASE WHEN cl.key IS NULL THEN 0 ELSE (
                SELECT count(*) FROM dispatch.tasks tk
                WHERE tk.status IN ('assigned', 'running')
                  AND tk.concurrency_key = p_concurrency_key)::integer END;
            i := cardinality(s.ckeys);
        END IF;
        IF s.cused[i] >= s.cmax[i] THEN
            s.reason := format('concurrency key %s at %s/%s', p_concurrency_key, s.cused[i],
                               s.cmax[i]);
            RETURN s;
        END IF;
    END IF;
    IF p_rate_key IS NOT NULL THEN
        j := array_position(s.rkeys, p_rate_key);
        IF j IS NULL THEN
            IF p_lock THEN
                SELECT * INTO rl FROM dispatch.rate_limits l WHERE l.key = p_rate_key FOR UPDATE;
            ELSE
                SELECT * INTO rl FROM dispatch.rate_limits l WHERE l.key = p_rate_key;
            END IF;
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
    s := dispatch.flow_admit(s, p_concurrency_key, p_rate_key, p_cost, p_now, false, false);
    reason := s.reason;
    until := s.until;
END
$$;

-- Locks the limit rows of these keys, after the agents' rows and in key order (concurrency keys,
-- then rate keys): every assigning transaction takes them in this order, so none of them can
-- deadlock (a completion takes no key row; a raw-SQL assignment takes its bucket's row last).
CREATE FUNCTION dispatch.flow_lock(p_concurrency_keys text[], p_rate_keys text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM dispatch.concurrency_limits l WHERE l.key = ANY (p_concurrency_keys)
    ORDER BY l.key FOR UPDATE;
    PERFORM 1 FROM dispatch.rate_limits l WHERE l.key = ANY (p_rate_keys)
    ORDER BY l.key FOR UPDATE;
END
$$;

-- Tells the engines of every replica when a rate limit that held a task back will have refilled
-- (channel dispatch_due, payload its epoch), so that assignment resumes then and not at the next
-- tick. Identical payloads fold.
CREATE FUNCTION dispatch.flow_wake(p_at timestamptz) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('dispatch_due', extract(epoch FROM p_at)::text)
$$;

-- An assignment of a task with a rate key takes its cost from the key's bucket: a raw-SQL
-- assignment here (the bucket may go below zero, and waits to refill). Named to run after
-- tasks_before_update, so the agent's row is locked before the bucket's. The claim and the
-- assigner (dispatch.via = 'fn') charge what they gave themselves, with flow_charge, once per key
-- and transaction instead of once per task: a new version of the bucket's row per task was most
-- of what flow control added to an assignment's WAL.
CREATE FUNCTION dispatch.tasks_flow_count() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := coalesce(NEW.assigned_at, now());
BEGIN
    IF OLD.status = 'pending' AND NEW.status = 'assigned'
       AND coalesce(current_setting('dispatch.via', true), '') <> 'fn' THEN
        UPDATE dispatch.rate_limits l
        SET tokens = dispatch.rate_tokens(l, at) - NEW.cost,
            refilled_at = greatest(l.refilled_at, at)
        WHERE l.key = NEW.rate_key;
    END IF;
    RETURN NEW;
END
$$;

-- Takes from each bucket the costs of the tasks just given under these rate keys (NULL keys
-- skipped), in one update per key; the caller holds the buckets' rows (flow_admit's lock).
CREATE FUNCTION dispatch.flow_charge(p_rate_keys text[], p_costs integer[], p_now timestamptz)
RETURNS void
LANGUAGE sql AS $$
    UPDATE dispatch.rate_limits l
    SET tokens = dispatch.rate_tokens(l, p_now) - x.cost,
        refilled_at = greatest(l.refilled_at, p_now)
    FROM (SELECT u.k, sum(u.c) AS cost FROM unnest(p_rate_keys, p_costs) AS u (k, c)
          WHERE u.k IS NOT NULL GROUP BY u.k) x
    WHERE l.key = x.k
$$;

CREATE TRIGGER tasks_flow_count BEFORE UPDATE OF status ON dispatch.tasks
    FOR EACH ROW WHEN (NEW.rate_key IS NOT NULL) EXECUTE FUNCTION dispatch.tasks_flow_count();

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
    PERFORM pg_notify('dispatch_work', '');
    RETURN true;
END
$$;

-- Sets a key's bucket. A new bucket starts full; a changed one keeps the tokens it has (refilled
-- at its old rate up to now, and at most the new capacity).
CREATE FUNCTION dispatch.rate_limit_set(
    p_key text, p_capacity float8, p_refill_per_second float8, p_now timestamptz DEFAULT now()
) RETURNS dispatch.rate_limits
LANGUAGE plpgsql AS $$
DECLARE
    r dispatch.rate_limits;
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
    INSERT INTO dispatch.rate_limits AS l (key, capacity, refill_per_second, tokens, refilled_at,
                                           updated_at)
    VALUES (p_key, p_capacity, p_refill_per_second, p_capacity, p_now, p_now)
    ON CONFLICT (key) DO UPDATE
        SET tokens = least(EXCLUDED.capacity, dispatch.rate_tokens(l, p_now)),
            refilled_at = greatest(l.refilled_at, p_now),
            capacity = EXCLUDED.capacity, refill_per_second = EXCLUDED.refill_per_second,
            updated_at = p_now
    RETURNING * INTO r;
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
