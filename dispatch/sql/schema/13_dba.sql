-- The DBA surface: functions that behave exactly like the API, and views to look at the queue from
-- psql.
CREATE FUNCTION dispatch.create_task(
    title text,
    description text DEFAULT '',
    requester text DEFAULT NULL,
    owner text DEFAULT NULL,
    required_capabilities text[] DEFAULT '{}',
    priority integer DEFAULT 0,
    timeout_seconds integer DEFAULT NULL,
    heartbeat_seconds integer DEFAULT NULL,
    max_retries integer DEFAULT 3,
    metadata jsonb DEFAULT '{}',
    parent_task_id uuid DEFAULT NULL,
    available_at timestamptz DEFAULT NULL,
    source text DEFAULT 'sql',
    idempotency_key text DEFAULT NULL,
    concurrency_key text DEFAULT NULL,
    rate_key text DEFAULT NULL,
    cost integer DEFAULT 1,
    depends_on jsonb DEFAULT NULL,
    approval text DEFAULT NULL
) RETURNS dispatch.tasks
LANGUAGE sql AS $$
    SELECT (dispatch.task_create(title, description, requester, owner, required_capabilities,
                                 priority, timeout_seconds, heartbeat_seconds, max_retries,
                                 metadata, parent_task_id, available_at, source, idempotency_key,
                                 concurrency_key, rate_key, cost, depends_on,
                                 approval)).task
$$;

CREATE FUNCTION dispatch.cancel_task(task_id uuid, actor text DEFAULT NULL, reason text DEFAULT NULL)
RETURNS dispatch.tasks
LANGUAGE sql AS $$
    SELECT dispatch.task_cancel(task_id, coalesce(actor, dispatch.session_actor()), reason, true)
$$;

CREATE FUNCTION dispatch.requeue_task(task_id uuid, actor text DEFAULT NULL)
RETURNS dispatch.tasks
LANGUAGE sql AS $$
    SELECT dispatch.task_requeue(task_id, coalesce(actor, dispatch.session_actor()))
$$;

CREATE FUNCTION dispatch.drain_agent(agent_id text, drained boolean DEFAULT true)
RETURNS dispatch.agents
LANGUAGE sql AS $$
    SELECT dispatch.agent_drain(agent_id, drained)
$$;

CREATE VIEW dispatch.queue_depth AS
SELECT s.status,
       count(t.task_id)::bigint AS count,
       now() - min(t.created_at) AS oldest_age
FROM unnest(enum_range(NULL::dispatch.task_status)) AS s (status)
LEFT JOIN dispatch.tasks t ON t.status = s.status
GROUP BY s.status
ORDER BY s.status;

-- The pending queue by capability (a task that requires several counts under each; one that
-- requires none under '(any)') or by tenant (owner, else requester): the p_top keys with the most
-- pending tasks, the rest summed as 'other', so that a gauge of it has at most p_top + 1 series.
-- pending counts scheduled tasks too; ready those available now, oldest_wait_seconds the longest
-- a ready one has waited. agents: by capability, the agents not stopped nor drained that have it
-- (all of them for '(any)'); the supply beside the demand.
CREATE FUNCTION dispatch.pending_by(
    p_dimension text, p_top integer DEFAULT 20, p_now timestamptz DEFAULT now()
) RETURNS TABLE (key text, pending bigint, ready bigint, oldest_wait_seconds float8, agents bigint)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_dimension NOT IN ('capability', 'tenant') THEN
        RAISE EXCEPTION 'pending_by: the dimension is capability or tenant (got %)',
            left(p_dimension, 40) USING ERRCODE = 'UD400';
    END IF;
    RETURN QUERY
    WITH keyed AS (
        SELECT coalesce(tk.owner, tk.requester) AS key, tk.available_at, tk.created_at
        FROM dispatch.tasks tk
        WHERE p_dimension = 'tenant' AND tk.status = 'pending'
        UNION ALL
        SELECT c.key, tk.available_at, tk.created_at
        FROM dispatch.tasks tk,
             unnest(CASE WHEN tk.required_capabilities = '{}' THEN '{(any)}'::text[]
                         ELSE tk.required_capabilities END) AS c (key)
        WHERE p_dimension = 'capability' AND tk.status = 'pending'
    ),
    per AS (
        SELECT k.key, count(*) AS pending,
               count(*) FILTER (WHERE k.available_at <= p_now) AS ready,
               min(greatest(k.created_at, k.available_at))
                   FILTER (WHERE k.available_at <= p_now) AS since
        FROM keyed k
        GROUP BY k.key
    ),
    shown AS (
        SELECT CASE WHEN rank <= p_top THEN r.key ELSE 'other' END AS key,
               sum(r.pending)::bigint AS pending, sum(r.ready)::bigint AS ready,
               min(r.since) AS since
        FROM (SELECT per.*, row_number() OVER (ORDER BY per.pending DESC, per.key) AS rank
              FROM per) r
        GROUP BY 1
    )
    SELECT s.key, s.pending, s.ready,
           coalesce(extract(epoch FROM p_now - s.since)::float8, 0),
           CASE WHEN p_dimension = 'capability' AND s.key <> 'other' THEN
               (SELECT count(*) FROM dispatch.agents a
                WHERE a.status <> 'stopped' AND NOT a.drained
                  AND (s.key = '(any)' OR s.key = ANY (a.capabilities)))
           END
    FROM shown s
    ORDER BY s.key = 'other', s.pending DESC, s.key;
END
$$;

-- Flow control is on: a tenant weight, a concurrency limit or a rate limit is set.
CREATE FUNCTION dispatch.flow_control_on() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT FROM dispatch.tenant_weights)
        OR EXISTS (SELECT FROM dispatch.concurrency_limits)
        OR EXISTS (SELECT FROM dispatch.rate_limits)
$$;

CREATE VIEW dispatch.agent_load AS
SELECT a.agent_id, a.status, a.drained, a.source, a.owner, a.capabilities,
       dispatch.agent_active(a.agent_id) AS active_tasks,
       coalesce(a.max_concurrent, c.max_concurrent_per_agent) AS max_concurrent,
       (SELECT count(DISTINCT t.slot) FROM dispatch.tasks t
        WHERE t.status IN ('assigned', 'running') AND t.assigned_agent = a.agent_id)::integer
           AS slots_held,
       a.last_assigned_at, a.last_seen_at
FROM dispatch.agents a CROSS JOIN dispatch.config c
ORDER BY a.agent_id;

CREATE VIEW dispatch.overdue AS
SELECT t.task_id, t.title, t.status, t.assigned_agent, t.deadline_at,
       now() - t.deadline_at AS overdue_by,
       CASE WHEN t.deadline_at <= now() THEN 'deadline'
            WHEN t.status = 'assigned' AND t.wake_deadline_at <= now() THEN 'wake_timeout'
            ELSE 'heartbeat' END AS reason
FROM dispatch.tasks t
WHERE t.status IN ('assigned', 'running')
  AND (t.deadline_at <= now()
       OR (t.status = 'assigned' AND t.wake_deadline_at <= now())
       OR t.heartbeat_seconds IS NOT NULL
          AND coalesce(t.last_progress_at, t.started_at, t.assigned_at)
              + make_interval(secs => t.heartbeat_seconds) <= now());
