-- Experiment (BENCH_PATCH_SQL=bench/experiments/no_event_notify.sql): the event log row without
-- the NOTIFY on dispatch_events. Every transaction that NOTIFYs takes one database-wide lock from
-- PreCommit_Notify until its commit record is flushed, so all notifying transactions commit one
-- at a time (pg_stat_activity shows them waiting on Lock:object). The relay only needs the wake-up
-- when it runs (hermes.url set); it can poll the outbox otherwise.
CREATE OR REPLACE FUNCTION dispatch.event_write(
    p_task_id uuid, p_event text, p_actor text, p_payload jsonb, p_now timestamptz
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dispatch.task_events (task_id, event, actor, payload, created_at)
    VALUES (p_task_id, p_event, p_actor, coalesce(p_payload, '{}'), p_now);
END
$$;
