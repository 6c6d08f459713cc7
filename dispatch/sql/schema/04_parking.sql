-- Flow control, parking: a backlog that a concurrency key's cap holds back leaves the walk
-- (tasks.parked, outside tasks_pending_order_idx), so that it is not read on every claim. A task
-- of the key that ends brings the first parked one back, a cap raised or removed brings all back,
-- and the reaper's sweep returns any whose key has room. (A task parked because no agent could
-- take it, unmatched_at set, is not the key's to bring back: 10_assignment.sql.)

-- Parks these pending tasks, which the walk found held back by their concurrency key's cap. Rows
-- another transaction holds are left in the walk.
CREATE FUNCTION dispatch.flow_park(p_task_ids uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE dispatch.tasks tk SET parked = true
    FROM (SELECT x.task_id FROM dispatch.tasks x
          -- By key: the status as text, so that no partial index of pending rows matches
          -- (see dispatch.task_claim).
          WHERE x.task_id = ANY (p_task_ids) AND x.status::text = 'pending' AND NOT x.parked
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
              WHERE x.status = 'pending' AND x.parked AND x.unmatched_at IS NULL
                AND x.concurrency_key = p_key
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
                    WHERE tk.status = 'pending' AND tk.parked AND tk.unmatched_at IS NULL) AS key
            UNION ALL
            SELECT (SELECT min(tk.concurrency_key) FROM dispatch.tasks tk
                    WHERE tk.status = 'pending' AND tk.parked AND tk.unmatched_at IS NULL
                      AND tk.concurrency_key > keys.key)
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
    -- Tasks came back to the queue: wake the assigner.
    PERFORM pg_notify('dispatch_work', '') WHERE n > 0;
    RETURN n;
END
$$;
