"""The `generation_tasks` table: one row per submitted job, shared by every instance through the records database.

Times are Unix seconds (a double) in both backends, so that lease arithmetic is the same SQL everywhere and no
time zone ever enters. Like `generated_images`, the table is created if missing and any column it lacks is added
in place (append new columns to COLUMNS; every added column is nullable).
"""
from __future__ import annotations

from dataclasses import dataclass

TABLE = "generation_tasks"
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
TYPES = ("txt2img", "img2img", "train-lora", "train-embedding")


@dataclass(frozen=True)
class Column:
    name: str
    mysql: str
    sqlite: str


def _text(name: str, length: int = 255) -> Column:
    return Column(name, f"varchar({length})", "TEXT")


def _real(name: str) -> Column:
    return Column(name, "double", "REAL")


def _int(name: str) -> Column:
    return Column(name, "int", "INTEGER")


COLUMNS = (
    _text("type", 16),
    _text("user", 128),
    _text("status", 16),
    _text("idempotency_key", 255),
    _text("payload_key", 512),          # the validated request body, in the outputs store
    _int("step"), _int("steps"), _real("progress"), _real("eta"),
    _text("preview_key", 512),
    _text("result_key", 512),           # the v1 response body, in the outputs store
    Column("error", "text", "TEXT"),
    _real("created_at"), _real("started_at"), _real("finished_at"),
    _text("instance", 128),             # who runs it
    _real("heartbeat_at"), _real("lease_until"),
    _int("attempts"),
    _int("cancel_requested"),
    _real("gpu_seconds"), _real("cost"),
    _real("loss"),                      # a training task's last loss
)
COLUMN_NAMES = tuple(c.name for c in COLUMNS)

# (name, columns, unique). (user, idempotency_key) makes a retried submit find its task; NULL keys never collide.
INDEXES = (
    ("uq_generation_tasks_idempotency", ("user", "idempotency_key"), True),
    ("ix_generation_tasks_status", ("status", "created_at"), False),
    ("ix_generation_tasks_user", ("user", "created_at"), False),
)


def mysql_statements(existing_columns: set[str] | None, existing_indexes: set[str] = frozenset()) -> list[str]:
    """DDL that brings a MySQL database to this schema, given what the table has (None: no table)."""
    if existing_columns is None:
        cols = ",\n  ".join(f"`{c.name}` {c.mysql}" for c in COLUMNS)
        keys = ",\n  ".join(f"{'UNIQUE ' if u else ''}KEY `{n}` ({', '.join(f'`{c}`' for c in cs)})"
                            for n, cs, u in INDEXES)
        return [f"CREATE TABLE IF NOT EXISTS `{TABLE}` (\n  `id` varchar(64) NOT NULL PRIMARY KEY,\n  {cols},\n"
                f"  {keys}\n) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"]
    statements = [f"ALTER TABLE `{TABLE}` ADD COLUMN `{c.name}` {c.mysql}" for c in COLUMNS
                  if c.name not in existing_columns]
    statements += [f"ALTER TABLE `{TABLE}` ADD {'UNIQUE ' if u else ''}KEY `{n}` ({', '.join(f'`{c}`' for c in cs)})"
                   for n, cs, u in INDEXES if n not in existing_indexes]
    return statements


def sqlite_statements(existing_columns: set[str] | None) -> list[str]:
    statements = []
    if existing_columns is None:
        cols = ",\n  ".join(f'"{c.name}" {c.sqlite}' for c in COLUMNS)
        statements.append(f'CREATE TABLE IF NOT EXISTS "{TABLE}" (\n  "id" TEXT NOT NULL PRIMARY KEY,\n  {cols}\n)')
    else:
        statements += [f'ALTER TABLE "{TABLE}" ADD COLUMN "{c.name}" {c.sqlite}' for c in COLUMNS
                       if c.name not in existing_columns]
    statements += [f'CREATE {"UNIQUE " if u else ""}INDEX IF NOT EXISTS "{n}" ON "{TABLE}" '
                   f'({", ".join(f"{chr(34)}{c}{chr(34)}" for c in cs)})' for n, cs, u in INDEXES]
    return statements
