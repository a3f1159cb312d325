-- Recipe: change events.payload from text to jsonb through a new column.
-- ALTER COLUMN ... TYPE rewrites the table under an ACCESS EXCLUSIVE lock and changes what old
-- code reads. Instead, the same expand/contract as a rename:
--   sql       add payload_json jsonb, a trigger converting in both directions, a NOT VALID
--             check that payload_json is filled;
--   backfill  convert existing rows in short batches;
--   APPLY     agents switch to payload_json;
--   contract  drop the trigger and the text column, make payload_json NOT NULL.
-- lockstep:sql
ALTER TABLE events ADD COLUMN payload_json jsonb;

-- Convert whichever column a query wrote into the other one: old code writes the text,
-- new code the jsonb.
CREATE FUNCTION events_sync_payload_json() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.payload IS DISTINCT FROM OLD.payload THEN
            NEW.payload_json := NEW.payload::jsonb;
        ELSIF NEW.payload_json IS DISTINCT FROM OLD.payload_json THEN
            NEW.payload := NEW.payload_json::text;
        END IF;
    END IF;
    NEW.payload_json := coalesce(NEW.payload_json, NEW.payload::jsonb);
    NEW.payload := coalesce(NEW.payload, NEW.payload_json::text);
    RETURN NEW;
END
$$;

CREATE TRIGGER events_sync_payload_json BEFORE INSERT OR UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION events_sync_payload_json();

ALTER TABLE events
    ADD CONSTRAINT events_payload_json_not_null CHECK (payload_json IS NOT NULL) NOT VALID;
-- lockstep:backfill
table=events set="payload_json = payload::jsonb" where="payload_json IS NULL" batch_size=500
-- lockstep:contract
-- VALIDATE first: it reads the table under SHARE UPDATE EXCLUSIVE, which blocks no
-- query, and the statements after it take their ACCESS EXCLUSIVE lock only briefly.
ALTER TABLE events VALIDATE CONSTRAINT events_payload_json_not_null;
DROP TRIGGER events_sync_payload_json ON events;
DROP FUNCTION events_sync_payload_json();
ALTER TABLE events ALTER COLUMN payload_json SET NOT NULL;
ALTER TABLE events DROP CONSTRAINT events_payload_json_not_null;
ALTER TABLE events DROP COLUMN payload;
-- lockstep:rollback
DROP TRIGGER IF EXISTS events_sync_payload_json ON events;
DROP FUNCTION IF EXISTS events_sync_payload_json();
ALTER TABLE events DROP CONSTRAINT IF EXISTS events_payload_json_not_null;
ALTER TABLE events DROP COLUMN IF EXISTS payload_json;
