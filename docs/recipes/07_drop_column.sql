-- Recipe: drop users.nickname.
-- Dropping it while old code runs breaks every query that names it. So:
--   sql       nothing destructive: only drop NOT NULL, because the new code stops writing it;
--   APPLY     agents stop using the column;
--   contract  drop it; no running code names it any more.
-- The rollback puts NOT NULL back, first filling rows that new code inserted without it.
-- lockstep:sql
ALTER TABLE users ALTER COLUMN nickname DROP NOT NULL;
-- lockstep:contract
ALTER TABLE users DROP COLUMN nickname;
-- lockstep:rollback
UPDATE users SET nickname = '' WHERE nickname IS NULL;
ALTER TABLE users ALTER COLUMN nickname SET NOT NULL;
