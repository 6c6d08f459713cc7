-- Experiment (BENCH_PATCH_SQL=bench/experiments/notify_when_full.sql): a completion (or any end of
-- an attempt) NOTIFYs dispatch_work only when its agent was at its concurrency limit. Every
-- notification also costs the LISTENing `serve` one transaction to read the queue (counted in
-- pg_stat_database.xact_commit) and takes the database-wide notify lock at commit.

CREATE OR REPLACE FUNCTION dispatch.tasks_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    was_active boolean := OLD.status IN ('assigned', 'running');
    is_active  boolean := NEW.status IN ('assigned', 'running');
    via_sql    boolean := coalesce(current_setting('dispatch.via', true), '') <> 'fn';
    was_full   boolean := false;
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NOT dispatch.status_edge_allowed(OLD.status, NEW.status) THEN
            RAISE EXCEPTION 'illegal task status transition from % to % (task %)',
                OLD.status, NEW.status, OLD.task_id
                USING ERRCODE = 'UD409',
                      HINT = 'see the lifecycle in SPEC section 3; use the dispatch.* functions';
        END IF;
        IF via_sql THEN
            IF NEW.status IN ('completed', 'failed', 'timed_out', 'cancelled') THEN
                NEW.completed_at := coalesce(NEW.completed_at, now());
            END IF;
            IF NEW.status = 'assigned' AND NEW.assigned_agent IS NULL THEN
                RAISE EXCEPTION 'an assigned task needs an assigned_agent'
                    USING ERRCODE = 'UD400', COLUMN = 'assigned_agent';
            END IF;
            PERFORM dispatch.event_write(OLD.task_id,
                CASE NEW.status
                    WHEN 'pending'   THEN CASE WHEN was_active THEN 'reassigned' ELSE 'requeued' END
                    WHEN 'assigned'  THEN 'assigned'
                    WHEN 'running'   THEN 'started'
                    WHEN 'timed_out' THEN 'timeout'
                    ELSE NEW.status::text
                END,
                dispatch.session_actor(),
                jsonb_build_object('from', OLD.status, 'to', NEW.status, 'via', 'sql',
                                   'assigned_agent', NEW.assigned_agent),
                now());
        END IF;
        NEW.updated_at := greatest(NEW.updated_at, OLD.updated_at);
    END IF;
    IF was_active AND (NOT is_active OR NEW.assigned_agent IS DISTINCT FROM OLD.assigned_agent) THEN
        UPDATE dispatch.agents SET active_count = greatest(active_count - 1, 0)
        WHERE agent_id = OLD.assigned_agent
        RETURNING active_count + 1 >= coalesce(max_concurrent,
                  (SELECT c.max_concurrent_per_agent FROM dispatch.config c))
        INTO was_full;
        -- Freed capacity matters to the assigner only when the agent was at its limit (else it
        -- already had room); the tick covers anything else.
        IF was_full THEN
            PERFORM pg_notify('dispatch_work', '');
        END IF;
    END IF;
    IF is_active AND (NOT was_active OR NEW.assigned_agent IS DISTINCT FROM OLD.assigned_agent) THEN
        UPDATE dispatch.agents
        SET active_count = active_count + 1,
            last_assigned_at = coalesce(NEW.assigned_at, now())
        WHERE agent_id = NEW.assigned_agent;
    END IF;
    IF NEW.status = 'pending' AND OLD.status <> 'pending' AND via_sql THEN
        PERFORM pg_notify('dispatch_work', '');
    END IF;
    RETURN NEW;
END
$$;
