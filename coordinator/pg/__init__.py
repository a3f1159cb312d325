"""PostgreSQL plumbing shared by the executor, backfill, history, locks and lint.

One layer, no decisions: connections in worker threads (`thread`), error text and
`SqlFailure` (`errors`), lock-safe attempts with retries (`attempts`) and who blocks a lock
(`locks`).
"""
