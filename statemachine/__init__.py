"""lockstep's pure core: phases, the migration and agent state machines, the wire protocol.

Nothing in this package performs I/O or imports trio, psycopg or sockets, so every decision it
makes can be tested with plain function calls.
"""

from statemachine.migration import Backfill, InvalidMigration, Migration
from statemachine.phases import ACKED_PHASES, MigrationState, MigrationStatus, Phase

__all__ = [
    "ACKED_PHASES",
    "Backfill",
    "InvalidMigration",
    "Migration",
    "MigrationState",
    "MigrationStatus",
    "Phase",
]
