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
