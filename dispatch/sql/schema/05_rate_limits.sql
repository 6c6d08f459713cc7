-- Flow control, rate limits: a task with a rate_key takes `cost` tokens from that key's token
-- bucket when it is assigned. Like a concurrency key, a busy bucket may not be one row locked
-- until commit. It is split into rate_limits.shards rows (rate_buckets), each with its share of
-- the capacity and the refill. A shard is held under a transaction-level advisory lock (class
-- dispatch.rate_lock(key), objid the shard), and only its holder writes its row. An assignment
-- takes a shard holding the cost whose lock it gets without waiting; when none does, it takes
-- every shard's lock and pools them. The shards together never hold more than one bucket would,
-- so the limit holds; a small bucket (capacity under 20) is one shard, exact. (Not row locks:
-- a row lock tried with SKIP LOCKED still waits when the row it read has since been updated and
-- the new version is locked, so two assignments could each wait for a shard the other held.)

-- The longest an empty bucket may take to fill, in seconds (1e9 s: about 31.7 years), so the
-- longest wait for a cost the bucket can hold (cost <= capacity): a bucket must refill at least
-- capacity / rate_wait_max() tokens a second. Every instant a wait announces (dispatch_due,
-- explain) is then at most 31.7 years ahead: well inside a timestamp (an interval ends at about
-- 9.2e12 s, a timestamp in year 294276) and inside the years 1970-9999 that every client reads.
-- Without it a bucket of capacity 1 refilling 1e-300 a second put its tasks' wait past the end of
-- time, and every assignment round that met two of them failed.
CREATE FUNCTION dispatch.rate_wait_max() RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1e9::float8 $$;

-- A token bucket per key: it gains refill_per_second tokens a second up to `capacity`, and every
-- assignment of a task with this rate_key takes the task's cost. The tokens are in rate_buckets.
-- A rate key with no bucket does not limit (as a concurrency key with no cap).
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
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rate_limits_fill_range
        CHECK (capacity <= refill_per_second * dispatch.rate_wait_max())
);

-- The bucket's tokens, in `shards` rows: each holds up to capacity/shards, `tokens` as of
-- `refilled_at`, and refills at refill_per_second/shards.
CREATE TABLE dispatch.rate_buckets (
    key         text NOT NULL REFERENCES dispatch.rate_limits (key) ON DELETE CASCADE,
    shard       smallint NOT NULL,
    -- Below zero after an assignment by hand took more than there was; never NaN or infinite.
    tokens      float8 NOT NULL
                CONSTRAINT rate_buckets_tokens_finite CHECK (tokens > '-Infinity' AND tokens < 'Infinity'),
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

-- When a bucket refilling p_refill tokens a second, short of p_short tokens at p_now, will hold
-- them. At most rate_wait_max() ahead: the bounds of rate_limits keep a cost the bucket can hold
-- within it, and a bucket overdrawn by hand (or any stored value) must not make the instant
-- overflow and fail the assignment round, the claim or explain that computes it (in numeric:
-- float8 division can overflow or underflow). Assignment looks again then.
CREATE FUNCTION dispatch.rate_until(p_now timestamptz, p_short float8, p_refill float8)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_refill > 0 THEN p_now + make_interval(secs => least(
        greatest(p_short::numeric / p_refill::numeric, 0),
        dispatch.rate_wait_max()::numeric)::float8) END
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

-- The advisory lock class of a rate key's shards (objid: the shard number).
CREATE FUNCTION dispatch.rate_lock(p_key text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT hashtext('dispatch.rate_key ' || p_key) $$;

-- Takes the locks of every shard of a rate key's bucket, in shard order (with p_wait false:
-- those it gets without waiting, and those this transaction holds already), and then reads them
-- at p_now: the shards held, their tokens together, and the bucket's capacity and refill (NULL:
-- the key has no bucket, or no shard's lock could be had). p_all: lock the 16 shards a bucket
-- may have, for whoever rewrites the rows (dispatch.rate_limit_set).
CREATE FUNCTION dispatch.rate_pool(
    p_key text, p_now timestamptz, p_wait boolean, p_all boolean DEFAULT false,
    OUT shards smallint[], OUT tokens float8, OUT capacity float8, OUT refill float8
)
LANGUAGE plpgsql AS $$
DECLARE
    lk  integer := dispatch.rate_lock(p_key);
    n   integer;
    got smallint[] := '{}';
BEGIN
    n := CASE WHEN p_all THEN 16
              ELSE (SELECT l.shards FROM dispatch.rate_limits l WHERE l.key = p_key) END;
    FOR s IN 0 .. coalesce(n, 0) - 1 LOOP
        IF p_wait THEN
            PERFORM pg_advisory_xact_lock(lk, s);
            got := got || s::smallint;
        ELSIF pg_try_advisory_xact_lock(lk, s) THEN
            got := got || s::smallint;
        END IF;
    END LOOP;
    IF cardinality(got) = 0 THEN
        RETURN;
    END IF;
    -- Read after the locks were granted: it sees what their earlier holders wrote.
    SELECT array_agg(b.shard ORDER BY b.shard), sum(dispatch.shard_tokens(b, l, p_now)),
           max(l.capacity), max(l.refill_per_second)
    INTO shards, tokens, capacity, refill
    FROM dispatch.rate_buckets b JOIN dispatch.rate_limits l ON l.key = b.key
    WHERE b.key = p_key AND b.shard = ANY (got);
END
$$;

-- Takes p_need tokens from one shard of bucket r that holds them, when this transaction holds
-- that shard's lock: whether it did.
CREATE FUNCTION dispatch.rate_take(r dispatch.rate_limits, p_shard integer, p_need float8,
                                   p_now timestamptz)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE dispatch.rate_buckets b
    SET tokens = dispatch.shard_tokens(b, r, p_now) - p_need,
        refilled_at = greatest(b.refilled_at, p_now)
    WHERE b.key = r.key AND b.shard = p_shard AND dispatch.shard_tokens(b, r, p_now) >= p_need;
    RETURN FOUND;
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

-- The rate keys' half of dispatch.flow_grant (07_admission.sql): the tasks still admitted
-- (p_rkeys: their keys, NULL for none) take their costs from their buckets, by the shards above,
-- key by key in key order; those the bucket cannot hold now are held back, and `until` is when
-- the first of them will fit. p_waits: as for dispatch.concurrency_grant.
CREATE FUNCTION dispatch.rate_grant(
    p_rkeys text[], p_costs integer[], p_now timestamptz, p_waits boolean,
    INOUT admitted boolean[], OUT until timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    keys    text[];
    k       text;
    idx     integer[];
    g       integer;
    need    float8;
    rl      dispatch.rate_limits;
    lk      integer;
    sh      integer;
    pool    record;
    rest    float8;
    took    boolean;         -- one shard held the cost, and gave it
    holding boolean;         -- this transaction holds a shard of the key
    one     boolean := cardinality(p_costs) = 1;  -- a single task (most claims): no key to sort
BEGIN
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
        -- A shard that holds all of it and whose lock no other transaction holds: first the
        -- one of this backend (no other's, mostly), then the fullest. Read after its lock.
        SELECT * INTO rl FROM dispatch.rate_limits l WHERE l.key = k;
        CONTINUE WHEN NOT FOUND;  -- no bucket: no limit
        lk := dispatch.rate_lock(k);
        sh := pg_backend_pid() % rl.shards;
        holding := pg_try_advisory_xact_lock(lk, sh);
        took := false;
        IF holding THEN
            took := dispatch.rate_take(rl, sh, need, p_now);
        END IF;
        IF NOT took THEN
            FOREACH g IN ARRAY ARRAY(
                SELECT b.shard FROM dispatch.rate_buckets b
                WHERE b.key = k AND b.shard <> sh AND dispatch.shard_tokens(b, rl, p_now) >= need
                ORDER BY dispatch.shard_tokens(b, rl, p_now) DESC)
            LOOP
                CONTINUE WHEN NOT pg_try_advisory_xact_lock(lk, g);
                holding := true;
                took := dispatch.rate_take(rl, g, need, p_now);
                EXIT WHEN took;
            END LOOP;
        END IF;
        CONTINUE WHEN took;
        -- Else all its shards, pooled; the tasks that fit take their cost in order. Holding a
        -- shard already (another transaction took from it since this one looked), it waits for
        -- none of the others: it pools those it can lock.
        pool := dispatch.rate_pool(k, p_now, p_waits AND NOT holding);
        IF pool.shards IS NULL THEN
            pool.tokens := 0;  -- every shard held by others (or the bucket just went): none now
        END IF;
        rest := pool.tokens;
        FOREACH g IN ARRAY idx LOOP
            IF p_costs[g] <= rest THEN
                rest := rest - p_costs[g];
            ELSE
                admitted[g] := false;
                IF pool.refill IS NOT NULL AND p_costs[g] <= pool.capacity THEN
                    until := least(until, dispatch.rate_until(p_now, p_costs[g] - rest,
                                                              pool.refill));
                END IF;
            END IF;
        END LOOP;
        IF pool.shards IS NOT NULL THEN
            PERFORM dispatch.rate_spread(k, pool.shards, rest, p_now);
        END IF;
    END LOOP;
END
$$;

-- Tells the engines of every replica when a rate limit that held a task back will have refilled
-- (channel dispatch_due, payload its epoch), so that assignment resumes then and not at the next
-- tick. Identical payloads fold.
CREATE FUNCTION dispatch.flow_wake(p_at timestamptz) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('dispatch_due', extract(epoch FROM p_at)::text)
$$;
