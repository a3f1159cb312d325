"""PostgreSQL plumbing shared by the executor, backfill, history, locks and lint: one layer, no decisions."""
