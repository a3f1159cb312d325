-- Recipe: rename users.name to users.full_name by expand and contract.
-- A rename in one step breaks every running instance that still says "name". Instead:
--   sql       add full_name, a trigger that keeps name and full_name equal whichever one a
--             query writes, and a NOT VALID check that full_name is filled;
--   backfill  copy name into full_name for existing rows, in short batches;
--   APPLY     agents switch their queries to full_name (old and new code coexist meanwhile);
--   contract  drop the trigger and the old column, make full_name NOT NULL.
-- lockstep:sql
ALTER TABLE users ADD COLUMN full_name text;

-- Copy whichever column a query wrote into the other one: old code writes name, new code
-- writes full_name. An UPDATE that wrote neither leaves both as they are.
CREATE FUNCTION users_sync_full_name() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.name IS DISTINCT FROM OLD.name THEN
            NEW.full_name := NEW.name;
        ELSIF NEW.full_name IS DISTINCT FROM OLD.full_name THEN
            NEW.name := NEW.full_name;
        END IF;
    END IF;
    NEW.full_name := coalesce(NEW.full_name, NEW.name);
    NEW.name := coalesce(NEW.name, NEW.full_name);
    RETURN NEW;
END
$$;

CREATE TRIGGER users_sync_full_name BEFORE INSERT OR UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION users_sync_full_name();

ALTER TABLE users
    ADD CONSTRAINT users_full_name_not_null CHECK (full_name IS NOT NULL) NOT VALID;
-- lockstep:backfill
table=users set="full_name = name" where="full_name IS NULL" batch_size=500
-- lockstep:contract
-- VALIDATE first: it reads the table under SHARE UPDATE EXCLUSIVE, which blocks no
-- query, and the statements after it take their ACCESS EXCLUSIVE lock only briefly.
ALTER TABLE users VALIDATE CONSTRAINT users_full_name_not_null;
DROP TRIGGER users_sync_full_name ON users;
DROP FUNCTION users_sync_full_name();
ALTER TABLE users ALTER COLUMN full_name SET NOT NULL;
ALTER TABLE users DROP CONSTRAINT users_full_name_not_null;
ALTER TABLE users DROP COLUMN name;
-- lockstep:rollback
DROP TRIGGER IF EXISTS users_sync_full_name ON users;
DROP FUNCTION IF EXISTS users_sync_full_name();
ALTER TABLE users DROP CONSTRAINT IF EXISTS users_full_name_not_null;
ALTER TABLE users DROP COLUMN IF EXISTS full_name;
