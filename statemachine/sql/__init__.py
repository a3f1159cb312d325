"""Pure SQL analysis for lockstep: split, classify, lint, derive rollbacks, parse files, plan.

Everything here works on text with PostgreSQL's own parser (pglast) and never touches a
database, so the coordinator, the CLI and the tests can all ask the same questions cheaply:
which statements must run outside a transaction, which locks they take and what they scan, what
would break old or new code, what undoes the expand step, and what exactly a migration would run
in each phase. Given a `Catalog` snapshot of a live database, lint knows table sizes, column
types and function volatility instead of assuming the worst.
"""

from statemachine.sql.catalog import Catalog, ColumnInfo, TableInfo, Volatility
from statemachine.sql.classify import (
    ExecutionGroup,
    StatementInfo,
    classify,
    classify_node,
    group_for_execution,
    needs_autocommit,
)
from statemachine.sql.files import (
    MigrationFileError,
    MigrationSource,
    migration_name_from_filename,
    parse_migration_source,
    parse_migration_text,
    sort_migration_filenames,
)
from statemachine.sql.lint import VOLATILE_FUNCTIONS, Finding, lint_migration, lint_statements
from statemachine.sql.locks import LockEffect, LockMode, lock_effect
from statemachine.sql.plan import PhasePlan, Plan, RollbackPlan, RollbackSource, build_plan
from statemachine.sql.rollback import (
    CannotDeriveRollback,
    RollbackDerivation,
    RollbackFailure,
    derive_rollback,
    try_derive_rollback,
)
from statemachine.sql.rules import PROFILES, RULES, Profile, Rule, Section, Severity
from statemachine.sql.split import SqlSyntaxError, Statement, parse_statement, split_statements

__all__ = [
    "PROFILES",
    "RULES",
    "VOLATILE_FUNCTIONS",
    "CannotDeriveRollback",
    "Catalog",
    "ColumnInfo",
    "ExecutionGroup",
    "Finding",
    "LockEffect",
    "LockMode",
    "MigrationFileError",
    "MigrationSource",
    "PhasePlan",
    "Plan",
    "Profile",
    "RollbackDerivation",
    "RollbackFailure",
    "RollbackPlan",
    "RollbackSource",
    "Rule",
    "Section",
    "Severity",
    "SqlSyntaxError",
    "Statement",
    "StatementInfo",
    "TableInfo",
    "Volatility",
    "build_plan",
    "classify",
    "classify_node",
    "derive_rollback",
    "group_for_execution",
    "lint_migration",
    "lint_statements",
    "lock_effect",
    "migration_name_from_filename",
    "needs_autocommit",
    "parse_migration_source",
    "parse_migration_text",
    "parse_statement",
    "sort_migration_filenames",
    "split_statements",
    "try_derive_rollback",
]
