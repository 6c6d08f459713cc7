-- Flow control, the DBA and admin surface: tenants' weights, concurrency keys' caps and rate keys'
-- buckets, set, deleted and listed, and what they hold back, for the API, the metrics and psql.

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
    -- The bounds of tenant_weights (06_queue_order.sql), checked here to name the field.
    IF p_weight IS NULL OR NOT (p_weight >= 0.001 AND p_weight <= 1000) THEN
        RAISE EXCEPTION 'weight must be between 0.001 and 1000 (got %)', p_weight
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
-- at its old rate up to now), plus the room a larger capacity adds (so that an enlarged bucket
-- lets through at once what it now has room for, as a raised cap does), at most the new capacity,
-- spread over the shards of its new capacity.
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
    -- rate_limits_fill_range: an empty bucket fills within rate_wait_max() seconds.
    IF p_capacity > p_refill_per_second * dispatch.rate_wait_max() THEN
        RAISE EXCEPTION 'refill_per_second must be at least capacity / 1e9, %, so that an empty bucket fills within 1e9 s (about 31.7 years) (got %)',
            p_capacity / dispatch.rate_wait_max(), p_refill_per_second
            USING ERRCODE = 'UD400', COLUMN = 'refill_per_second';
    END IF;
    INSERT INTO dispatch.rate_limits AS l (key, capacity, refill_per_second, shards, updated_at)
    VALUES (p_key, p_capacity, p_refill_per_second, dispatch.rate_shards(p_capacity), p_now)
    ON CONFLICT (key) DO UPDATE SET updated_at = p_now;  -- locks the row of an existing one
    pool := dispatch.rate_pool(p_key, p_now, true, p_all => true);
    UPDATE dispatch.rate_limits l
    SET capacity = p_capacity, refill_per_second = p_refill_per_second,
        shards = dispatch.rate_shards(p_capacity)
    WHERE l.key = p_key
    RETURNING * INTO r;
    DELETE FROM dispatch.rate_buckets b WHERE b.key = p_key;
    INSERT INTO dispatch.rate_buckets (key, shard, tokens, refilled_at)
    SELECT p_key, g,
           least(p_capacity,
                 coalesce(pool.tokens + greatest(p_capacity - pool.capacity, 0), p_capacity))
           / r.shards,
           p_now
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

