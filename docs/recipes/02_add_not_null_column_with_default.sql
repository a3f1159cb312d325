-- Recipe: add a NOT NULL column with a constant default.
-- Since PostgreSQL 11 a constant default is stored in the catalog, so the table is not
-- rewritten and existing rows read 'active' at once. Old code's INSERTs do not name the column
-- and get the default, so NOT NULL never fails for them. The rollback is derived.
-- lockstep:sql
ALTER TABLE users ADD COLUMN status text NOT NULL DEFAULT 'active';
