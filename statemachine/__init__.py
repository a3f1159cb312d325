"""lockstep's pure core: phases, the migration and agent state machines, the wire protocol.

Nothing in this package performs I/O or imports trio, psycopg or sockets, so every decision it
makes can be tested with plain function calls. Where things are decided:

- `migration_fsm.MigrationMachine`: which phase a migration is in and when it may move on.
- `ledger.AckLedger`: which agents of a phase's cohort answered.
- `agent_fsm.AgentMachine`: which schema an agent may use.
- `protocol`: every frame on the wire, encoded and strictly decoded.
"""

from statemachine.agent_fsm import AgentMachine, AgentState
from statemachine.credentials import agent_credential
from statemachine.failure import Failure, FailureKind
from statemachine.ledger import AckLedger, AckOutcome
from statemachine.migration import Backfill, InvalidMigration, Migration
from statemachine.migration_fsm import MigrationMachine
from statemachine.phases import ACKED_PHASES, MigrationState, MigrationStatus, Phase
from statemachine.result import MigrationResult, PhaseRecord, SqlAttempt

__all__ = [
    "ACKED_PHASES",
    "AckLedger",
    "AckOutcome",
    "AgentMachine",
    "AgentState",
    "Backfill",
    "Failure",
    "FailureKind",
    "InvalidMigration",
    "Migration",
    "MigrationMachine",
    "MigrationResult",
    "MigrationState",
    "MigrationStatus",
    "Phase",
    "PhaseRecord",
    "SqlAttempt",
    "agent_credential",
]
