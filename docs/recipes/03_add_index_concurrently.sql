-- Recipe: add an index without blocking writes.
-- CREATE INDEX CONCURRENTLY takes only a SHARE UPDATE EXCLUSIVE lock, so reads and writes go on
-- while it builds. It cannot run inside a transaction: lockstep runs it alone on an autocommit
-- connection and drops an INVALID leftover before a retry. The rollback is derived
-- (DROP INDEX CONCURRENTLY IF EXISTS users_email_idx).
-- lockstep:sql
CREATE INDEX CONCURRENTLY users_email_idx ON users (email);
