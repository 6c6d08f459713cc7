-- Experiment (BENCH_PATCH_SQL=bench/experiments/claim_no_sort.sql): make the claim and the
-- assignment walk tasks_pending_order_idx instead of reading every pending row and sorting.
--
-- Why: the planner estimates the claim's filters (`required_capabilities <@ caps`,
-- dispatch.agent_belongs(...), the previous_agents pass) as very selective, concludes that
-- LIMIT 1 / LIMIT batch would have to walk most of the ordered index anyway, and picks a full scan
-- of tasks_pending_available_idx plus a sort: O(pending) per call. Measured after a 3,000-task
-- pull drain: tasks_pending_available_idx 3,094 scans, 9.28 M index tuples read;
-- tasks_pending_order_idx 0 scans. Forcing custom plans alone does not change that choice.
-- enable_sort = off inside these two functions leaves the ordered index as the cheapest path
-- (a sort is still used where nothing else can produce the order, as for the agent choice).
ALTER FUNCTION dispatch.task_claim(text, text[], timestamptz) SET enable_sort = off;
ALTER FUNCTION dispatch.task_assign(integer, timestamptz) SET enable_sort = off;
