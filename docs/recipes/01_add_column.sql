-- Recipe: add a nullable column.
-- Old code never names users.email, so it keeps working while the column appears. ADD COLUMN
-- without a default only edits the catalog: the ACCESS EXCLUSIVE lock lasts milliseconds and,
-- with lock_timeout, never queues the table's traffic for long. No rollback section: lockstep
-- derives it (ALTER TABLE users DROP COLUMN email).
-- lockstep:sql
ALTER TABLE users ADD COLUMN email text;
