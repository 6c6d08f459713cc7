-- Flow control, admission: whether a task may be assigned now, by its concurrency key and its rate
-- key. It is decided in the transaction that assigns (task_assign and task_claim call flow_admit
-- while they walk and flow_grant on what they take; a raw UPDATE meets tasks_flow_count), so no
-- replica, agent or psql session gets around it. Locks are taken after the agents' rows,
-- concurrency keys first and then rate keys, each in key order, and the only locks ever waited
-- for are a key's exclusive gate and a bucket's shard locks (in shard order, by a transaction
-- holding none of that bucket's), so no two assignments can deadlock.

-- What an assigning transaction knows of the flow limits it has met: each concurrency key's cap
-- and the tasks it counts as active (those active when the key was first read, plus what this
-- transaction has taken since); each rate key's bucket and the tokens left in it. Each key is
-- read once per state, so a walk past many tasks of one key counts its active tasks once, not
-- once per task. reason/until: the verdict of the last flow_admit (reason NULL: admitted).
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

-- Whether a task with these flow fields may be assigned at p_now, as far as an unlocked read
-- shows, given what state s has seen and taken; with p_take an admitted task is counted against
-- its limits in the returned state. A key met for the first time is read. The walks plan with it;
-- flow_grant decides under the locks.
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
        IF s.rcap[j] IS NULL THEN
            NULL;  -- no bucket: the key does not limit, as a concurrency key without a cap
        ELSIF p_cost > s.rcap[j] THEN
            s.reason := format('rate key %s: cost %s exceeds its capacity %s', p_rate_key, p_cost,
                               s.rcap[j]);
            RETURN s;
        ELSIF s.rtokens[j] < p_cost THEN
            s.until := dispatch.rate_until(p_now, p_cost - s.rtokens[j], s.rrefill[j]);
            s.reason := format('rate key %s empty until %s', p_rate_key,
                               to_char(s.until AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'));
            RETURN s;
        END IF;
    END IF;
    IF p_take THEN
        IF i IS NOT NULL THEN
            s.cused[i] := s.cused[i] + 1;
        END IF;
        IF j IS NOT NULL AND s.rcap[j] IS NOT NULL THEN
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

-- Which of these tasks (their concurrency keys, rate keys and costs, NULL keys for none) may be
-- given now, taken and counted in their limits: the concurrency keys decide first
-- (dispatch.concurrency_grant), then the rate keys on what they admitted (dispatch.rate_grant),
-- in the lock order of the header above. Every task admitted must then be given in this
-- transaction (its tokens are taken here). p_plan is what the walk saw of the concurrency keys (a
-- key it did not see is counted here). `until`: when a rate limit that held one back will have
-- refilled. A transaction that calls it again (a second claim in one psql transaction) waits for
-- no lock: it takes what it can without waiting, and holds back the rest, so that it cannot
-- deadlock with the locks it took the first time (the setting dispatch.flow_tickets, the ticket
-- tries made so far, says that it took some).
CREATE FUNCTION dispatch.flow_grant(
    p_plan dispatch.flow_state, p_ckeys text[], p_rkeys text[], p_costs integer[],
    p_now timestamptz, OUT admitted boolean[], OUT until timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    was   text := nullif(current_setting('dispatch.flow_tickets', true), '');
    waits boolean := was IS NULL;  -- no flow lock taken by an earlier call of this transaction
    c     record;
    r     record;
BEGIN
    c := dispatch.concurrency_grant(p_ckeys, p_plan.ckeys, p_plan.cused, waits,
                                    array_fill(true, ARRAY[cardinality(p_costs)]),
                                    coalesce(was::integer, 0));
    r := dispatch.rate_grant(p_rkeys, p_costs, p_now, waits, c.admitted);
    admitted := r.admitted;
    until := r.until;
    PERFORM set_config('dispatch.flow_tickets', c.pos::text, true);
END
$$;

-- An assignment by hand (raw SQL: the claim and the assigner, dispatch.via = 'fn', use
-- flow_grant) is held to the limits too: it is refused while its concurrency key is at its cap,
-- and it takes its cost from its bucket (which may go below zero, and waits to refill). Named to
-- run after tasks_before_update, so the task has its slot before the flow locks are taken.
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

-- Every rule that holds back a pending task now (empty: none does): its availability, its
-- concurrency key, its rate key, and fair share when its tenant's earlier tasks pushed it back in
-- line; for a blocked task, its approval and the dependencies it waits for; for a suspended one,
-- its signal; for a task in review, its review. With the task's tenant and effective priority, for explain.
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
    ELSIF t.status = 'blocked' THEN
        IF t.approval IN ('before_start', 'both') AND t.approved_at IS NULL THEN
            reasons := reasons || 'waiting for approval by its requester, its owner or an admin'::text;
        END IF;
        -- The tasks it waits for (09_dependencies.sql), the first ten by name.
        SELECT count(*) INTO ahead FROM dispatch.task_dependencies dd
        WHERE dd.task_id = t.task_id AND NOT dd.satisfied;
        IF ahead > 0 THEN
            reasons := reasons || (
                SELECT format('waiting for %s of its dependencies to complete: %s%s', ahead,
                              string_agg(format('%s (%s)', d.depends_on, d.status), ', '),
                              CASE WHEN ahead > 10 THEN ', ...' ELSE '' END)
                FROM (SELECT dd.depends_on, tk.status
                      FROM dispatch.task_dependencies dd
                      JOIN dispatch.tasks tk ON tk.task_id = dd.depends_on
                      WHERE dd.task_id = t.task_id AND NOT dd.satisfied
                      ORDER BY dd.created_at, dd.depends_on LIMIT 10) d);
        END IF;
    ELSIF t.status = 'suspended' THEN
        reasons := reasons || format('suspended by %s until a signal (at most until %s): %s',
            t.assigned_agent,
            to_char(t.deadline_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
            left(t.waiting_for, 200));
    ELSIF t.status = 'review' THEN
        reasons := reasons || ('its result waits for review (accept or request changes) by its'
                               ' requester, its owner or an admin')::text;
    END IF;
    RETURN NEXT;
END
$$;
