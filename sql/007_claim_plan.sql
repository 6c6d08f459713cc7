-- The claim and the assignment must walk tasks_pending_order_idx in order and stop at LIMIT. The
-- planner rates their eligibility filters (capabilities, ownership, previous agents) as very
-- selective and, especially in the generic plans plpgsql caches, prefers reading every pending row
-- through tasks_pending_available_idx and sorting them: O(pending) per call. Measured by the
-- benchmark: a 3,000-task drain read 9.28 M index tuples and never used the order index; with this
-- setting push assignment went from 225 to 549 tasks/s and pull from 194 to 474 tasks/s.
-- With sorting disabled inside these two functions the ordered index is the cheapest path; a sort
-- is still used where nothing else gives the order (choosing among the candidate agents).
ALTER FUNCTION dispatch.task_claim(text, text[], timestamptz) SET enable_sort = off;
ALTER FUNCTION dispatch.task_assign(integer, timestamptz) SET enable_sort = off;
