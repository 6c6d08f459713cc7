-- The event relay's side of the transactional outbox: task_events rows with published_at IS NULL
-- are published to NATS JetStream and then marked, in one transaction:
--
--   BEGIN;
--   SELECT dispatch.event_relay_lock();          -- false: another replica is relaying, stand by
--   SELECT * FROM dispatch.event_relay_batch(500);
--   ... publish each row with Nats-Msg-Id = id.created_at (in microseconds), wait for the acks ...
--   SELECT dispatch.event_mark_published(ids);
--   COMMIT;
--
-- A crash between publish and mark rolls the marks back; the next relay publishes the same rows
-- again under the same message ids and JetStream's duplicate window drops the copies. The id alone
-- would not do: a standby promoted behind its primary hands out again ids that the lost WAL used,
-- and the old primary's relay may have published those; created_at tells the two apart.

-- Only one replica relays at a time. Row locks with SKIP LOCKED alone would let replica B lock and
-- publish a later event of a task while replica A is still publishing an earlier one of the same
-- task (A holds the earlier rows, B skips them), so per-task order would depend on who wins the
-- race to the NATS server. A transaction-level advisory lock, tried without waiting, makes one
-- batch at a time the rule: the others return at once and wait for the next NOTIFY. It is released
-- by COMMIT/ROLLBACK or when the session dies, so a killed relay never blocks the others.
CREATE FUNCTION dispatch.event_relay_lock() RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT pg_try_advisory_xact_lock(hashtext('dispatch.event_relay'))
$$;

-- The oldest unpublished events, locked for this transaction. The event rows only are locked (not
-- their tasks), so the relay never blocks a transition. SKIP LOCKED is a second fence behind the
-- advisory lock: a batch still being published (and not yet marked) is never picked up twice.
-- Per task, ids follow commit order: every writer of a task's events holds that task's row lock.
CREATE FUNCTION dispatch.event_relay_batch(p_limit integer DEFAULT 500)
RETURNS SETOF dispatch.task_events
LANGUAGE sql VOLATILE AS $$
    SELECT * FROM dispatch.task_events
    WHERE published_at IS NULL
    ORDER BY id
    LIMIT p_limit
    FOR UPDATE SKIP LOCKED
$$;

-- p_since (the batch's oldest created_at) spares the lookup of each id in the older partitions.
CREATE FUNCTION dispatch.event_mark_published(
    p_ids bigint[], p_now timestamptz DEFAULT now(), p_since timestamptz DEFAULT '-infinity'
) RETURNS integer
LANGUAGE sql VOLATILE AS $$
    WITH marked AS (
        UPDATE dispatch.task_events SET published_at = p_now
        WHERE id = ANY (p_ids) AND published_at IS NULL AND created_at >= p_since
        RETURNING 1
    )
    SELECT count(*)::integer FROM marked
$$;

-- Events NATS refuses for good (the relay tried them and JetStream answered with an error each
-- time) are set aside: marked published, with the reason, so one bad event never stops the
-- relay. `SELECT * FROM dispatch.task_events WHERE relay_error IS NOT NULL` lists them.
CREATE FUNCTION dispatch.event_set_aside(p_ids bigint[], p_error text, p_now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE sql VOLATILE AS $$
    WITH marked AS (
        UPDATE dispatch.task_events SET published_at = p_now, relay_error = p_error
        WHERE id = ANY (p_ids) AND published_at IS NULL
        RETURNING 1
    )
    SELECT count(*)::integer FROM marked
$$;
