-- Flow control, concurrency keys: at most concurrency_limits.max_active tasks of one
-- concurrency_key are assigned or running at once. Every busy key is touched by every assignment
-- of its tasks, so it may not be one row locked until commit (on a busy key, assignments would
-- then commit one after another). Instead a key counts its active tasks
-- (tasks_active_concurrency_idx) under a transaction-level advisory lock, its gate. Far below its
-- cap, an assignment takes the gate shared plus one of flow_tickets() ticket locks per task it
-- gives, tried without waiting, and gives when the count plus flow_tickets() is within the cap:
-- what other transactions give meanwhile holds tickets too, so it is at most flow_tickets() in
-- all. Near the cap, it takes the gate exclusive (waiting for every shared holder to commit) and
-- counts exactly.

CREATE TABLE dispatch.concurrency_limits (
    key          text PRIMARY KEY
                 CONSTRAINT concurrency_limits_key_length CHECK (char_length(key) BETWEEN 1 AND 256),
    -- 0 pauses the key.
    max_active   integer NOT NULL
                 CONSTRAINT concurrency_limits_max_active_range CHECK (max_active BETWEEN 0 AND 1000000),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- The tasks of a concurrency key assigned or running now.
CREATE FUNCTION dispatch.concurrency_used(p_key text) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT count(*) FROM dispatch.tasks tk
            WHERE tk.status IN ('assigned', 'running') AND tk.concurrency_key = p_key);
END
$$;

-- How many tasks of one concurrency key may be in flight on its fast path at once (see above):
-- room for about six agents claiming ten tasks each at the same instant. (With 32, four such
-- agents of one key found every ticket held about a third of the time and took fewer tasks than
-- they asked for.) Keys with a cap under 64 above their active count take the exact path.
CREATE FUNCTION dispatch.flow_tickets() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 64 $$;

-- The advisory lock class of a concurrency key (objid -1: its gate; 0 .. flow_tickets() - 1: its
-- tickets).
CREATE FUNCTION dispatch.concurrency_lock(p_key text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT hashtext('dispatch.concurrency_key ' || p_key) $$;

-- The concurrency keys' half of dispatch.flow_grant (07_admission.sql): of these tasks (p_ckeys:
-- their keys, NULL for none), holds back (admitted[i] false) those whose key has no room, by the
-- gate and tickets above, key by key in key order. p_seen_keys, p_seen_used: the keys the walk
-- counted and their counts (a key it did not see is counted here). p_waits: no flow lock taken
-- by an earlier call of this transaction, so it may wait for a gate. pos: the ticket tries this
-- transaction has made (a ticket it tried before is never tried again: it may hold it).
CREATE FUNCTION dispatch.concurrency_grant(
    p_ckeys text[], p_seen_keys text[], p_seen_used integer[], p_waits boolean,
    INOUT admitted boolean[], INOUT pos integer
)
LANGUAGE plpgsql AS $$
DECLARE
    tickets integer := dispatch.flow_tickets();
    keys    text[];
    k       text;
    idx     integer[];
    g       integer;
    cap     integer;
    used    integer;
    got     integer;
    lk      integer;
    one     boolean := cardinality(admitted) = 1;  -- a single task (most claims): no key to sort
BEGIN
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
        g := array_position(p_seen_keys, k);
        used := CASE WHEN g IS NOT NULL THEN p_seen_used[g]
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
            IF p_waits THEN
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
END
$$;
