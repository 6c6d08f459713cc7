-- Experiment (BENCH_PATCH_SQL=bench/experiments/custom_plans.sql): plan the claim and assignment
-- queries for their actual arguments on every call. After five calls PL/pgSQL may switch to a
-- cached generic plan; for the claim's `available_at <= $now ... ORDER BY priority DESC,
-- created_at LIMIT 1` that generic plan scans every pending row by available_at and sorts them
-- (O(pending)) instead of walking tasks_pending_order_idx and stopping at the first row.
ALTER FUNCTION dispatch.task_claim(text, text[], timestamptz) SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION dispatch.task_assign(integer, timestamptz) SET plan_cache_mode = force_custom_plan;
