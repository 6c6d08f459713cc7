-- The event history's partitions (dispatch.task_events is partitioned by RANGE (created_at)).
-- The pruner keeps them, one replica at a time, every interval:
--
--   SELECT dispatch.history_prepare(now(), now() + '3 days', '1 day');   -- create ahead
--   SELECT dispatch.history_drop(now() - '7 days');                      -- retention
--
-- Partitions are `width` wide and aligned on multiples of it since the epoch, so replicas and
-- restarts agree on the bounds; a width that changes with the retention only starts at the next
-- free slot (a new partition is cut short where an existing one begins). A row that finds no
-- partition lands in task_events_default instead of failing its transition, and the next
-- history_prepare moves it into a partition of its own.

-- Every partition with its bounds, oldest first; the default partition has none.
CREATE VIEW dispatch.history_partitions AS
SELECT c.oid::regclass AS partition, b.bounds[1]::timestamptz AS from_at,
       b.bounds[2]::timestamptz AS to_at,
       CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint END AS rows_estimate  -- NULL: not analyzed
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                        'FROM \(''([^'']+)''\) TO \(''([^'']+)''\)') AS bounds) b
WHERE i.inhparent = 'dispatch.task_events'::regclass
ORDER BY b.bounds[1]::timestamptz NULLS LAST;

-- A partition width in seconds, refused unless it is 1 minute to 31 days.
CREATE FUNCTION dispatch.history_width_seconds(p_width interval) RETURNS double precision
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    w double precision := extract(epoch FROM p_width);
BEGIN
    IF w IS NULL OR w < 60 OR w > 86400 * 31 THEN
        RAISE EXCEPTION 'a history partition is 1 minute to 31 days wide, not %', p_width
            USING ERRCODE = 'UD400', COLUMN = 'width';
    END IF;
    RETURN w;
END
$$;

-- Creates the partition for the slot holding p_at, unless one covers p_at already; returns
-- whether it created one. Rows of its range waiting in the default partition move into it. The
-- table is made apart and then attached: attaching locks the events table only against other
-- schema changes (not against writes), and the default partition for the instant of its check.
CREATE FUNCTION dispatch.history_partition_cover(p_at timestamptz, p_width interval)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    w    double precision := dispatch.history_width_seconds(p_width);
    lo   timestamptz;
    hi   timestamptz;
    name text;
BEGIN
    IF EXISTS (SELECT 1 FROM dispatch.history_partitions
               WHERE from_at <= p_at AND to_at > p_at) THEN
        RETURN false;
    END IF;
    lo := to_timestamp(floor(extract(epoch FROM p_at) / w) * w);
    hi := lo + p_width;
    SELECT greatest(lo, max(to_at)) INTO lo FROM dispatch.history_partitions
    WHERE to_at > lo AND to_at <= p_at;
    SELECT least(hi, min(from_at)) INTO hi FROM dispatch.history_partitions
    WHERE from_at > p_at AND from_at < hi;
    -- The clock's own slot (give or take 5 minutes) takes no rows from the default partition
    -- while more may be arriving: a write routed to the default partition just before the attach
    -- would fail its partition check just after it. Those rows wait there until the slot is past.
    IF lo < now() + interval '5 minutes' AND hi > now() - interval '5 minutes'
       AND EXISTS (SELECT 1 FROM dispatch.task_events_default
                   WHERE created_at >= lo AND created_at < hi) THEN
        RETURN false;
    END IF;
    name := 'task_events_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24MISS');
    EXECUTE format('CREATE TABLE dispatch.%I (LIKE dispatch.task_events INCLUDING DEFAULTS'
                   ' INCLUDING CONSTRAINTS)', name);
    EXECUTE format('WITH moved AS (DELETE FROM dispatch.task_events_default'
                   ' WHERE created_at >= $1 AND created_at < $2 RETURNING *)'
                   ' INSERT INTO dispatch.%I SELECT * FROM moved', name) USING lo, hi;
    EXECUTE format('ALTER TABLE dispatch.task_events ATTACH PARTITION dispatch.%I'
                   ' FOR VALUES FROM (%L) TO (%L)', name, lo, hi);
    RETURN true;
END
$$;

-- history_partition_cover, or NULL when its lock was not free within the caller's lock_timeout
-- (the attempt is rolled back whole).
CREATE FUNCTION dispatch.history_partition_try(p_at timestamptz, p_width interval)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RETURN dispatch.history_partition_cover(p_at, p_width);
EXCEPTION WHEN lock_not_available THEN
    RETURN NULL;
END
$$;

-- Creates the partitions missing for [p_from, p_to), and one for every slot that has rows in the
-- default partition; returns how many it created. Attaching one waits for every reader of the
-- default partition, so each waits at most p_lock_wait and the first that cannot have its lock
-- ends the call: partitions are created well ahead, and the next call tries again.
CREATE FUNCTION dispatch.history_prepare(
    p_from timestamptz, p_to timestamptz, p_width interval, p_lock_wait interval DEFAULT '100 ms'
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    w       double precision := dispatch.history_width_seconds(p_width);
    saved   text := current_setting('lock_timeout');
    t       timestamptz;
    n       integer := 0;
    made    boolean := false;  -- NULL once a lock was not free: the rest waits for the next call
BEGIN
    IF p_to - p_from > p_width * 1000 THEN
        RAISE EXCEPTION 'history_prepare would create more than 1000 partitions of %', p_width
            USING ERRCODE = 'UD400', COLUMN = 'width';
    END IF;
    PERFORM set_config('lock_timeout', (extract(epoch FROM p_lock_wait) * 1000)::bigint::text, true);
    t := p_from;
    WHILE t < p_to AND made IS NOT NULL LOOP
        made := dispatch.history_partition_try(t, p_width);
        n := n + coalesce(made::integer, 0);
        t := coalesce((SELECT to_at FROM dispatch.history_partitions
                       WHERE from_at <= t AND to_at > t),  -- or the slot left for later:
                      to_timestamp((floor(extract(epoch FROM t) / w) + 1) * w));
    END LOOP;
    FOR t IN
        SELECT min(created_at) FROM dispatch.task_events_default
        GROUP BY floor(extract(epoch FROM created_at) / w) ORDER BY 1
    LOOP
        EXIT WHEN made IS NULL;
        made := dispatch.history_partition_try(t, p_width);
        n := n + coalesce(made::integer, 0);
    END LOOP;
    PERFORM set_config('lock_timeout', saved, true);
    RETURN n;
END
$$;

-- Retention: drops the partitions that end at or before p_before, oldest first, and returns how
-- many. Dropping one takes the events table's exclusive lock for an instant; waiting for it
-- would hold up every event write queued behind the request, so each drop waits at most
-- p_lock_wait and the first that cannot have its lock ends the call (the rest wait for the next).
CREATE FUNCTION dispatch.history_drop(p_before timestamptz, p_lock_wait interval DEFAULT '100 ms')
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    p    regclass;
    n    integer := 0;
    saved text := current_setting('lock_timeout');
BEGIN
    PERFORM set_config('lock_timeout', (extract(epoch FROM p_lock_wait) * 1000)::bigint::text, true);
    FOR p IN SELECT partition FROM dispatch.history_partitions WHERE to_at <= p_before LOOP
        BEGIN
            EXECUTE format('DROP TABLE %s', p);
            n := n + 1;
        EXCEPTION WHEN lock_not_available THEN
            EXIT;
        END;
    END LOOP;
    PERFORM set_config('lock_timeout', saved, true);
    RETURN n;
END
$$;
