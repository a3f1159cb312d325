-- Recipe: add a foreign key in two steps.
-- NOT VALID makes PostgreSQL enforce the key for new and updated rows at once but skip the scan
-- of existing rows, so the SHARE ROW EXCLUSIVE lock on both tables is brief. VALIDATE CONSTRAINT
-- then checks the old rows under a SHARE UPDATE EXCLUSIVE lock, which lets reads and writes
-- continue. Old code only ever writes existing customer ids, so the key never rejects it.
-- lockstep:sql
ALTER TABLE orders
    ADD CONSTRAINT orders_customer_id_fkey FOREIGN KEY (customer_id) REFERENCES customers (id)
    NOT VALID;
-- lockstep:contract
ALTER TABLE orders VALIDATE CONSTRAINT orders_customer_id_fkey;
