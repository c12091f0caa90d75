"""The `generated_images` table: the original service's columns, our additive ones, and how both are created.

The original columns and their types are kept exactly, so that SQL written against the original service keeps
working. Every column we add is nullable (rows written by the original service have none of them) and listed
in ADDED_COLUMNS: adding a column later means appending it there; `ensure_schema` adds whatever an existing
table lacks.
"""
from __future__ import annotations

from dataclasses import dataclass

TABLE = "generated_images"


@dataclass(frozen=True)
class Column:
    name: str
    mysql: str
    sqlite: str
    max_bytes: int | None  # what the MySQL type holds (UTF-8 bytes for text, characters for varchar)
    chars: bool = False    # True when max_bytes counts characters (varchar), not bytes (text)


TEXT_BYTES = 65_535            # `text`
MEDIUMTEXT_BYTES = 16_777_215  # `mediumtext`


def _varchar(name: str, length: int = 255) -> Column:
    return Column(name, f"varchar({length})", "TEXT", length, chars=True)


# The original service's columns, in its order (its DDL declared the primary key twice; ours once).
ORIGINAL_COLUMNS = (
    Column("prompt", "text", "TEXT", TEXT_BYTES),
    Column("negative_prompt", "text", "TEXT", TEXT_BYTES),
    _varchar("steps"), _varchar("seed"), _varchar("sampler"), _varchar("cfg_scale"), _varchar("size"),
    _varchar("model_hash"), _varchar("model"),
    Column("image_base64", "mediumtext", "TEXT", MEDIUMTEXT_BYTES),
)

# Added for the product; all nullable so that legacy rows stay valid.
ADDED_COLUMNS = (
    _varchar("request_id", 128),                       # the generation's request id (FC's x-fc-request-id)
    Column("image_index", "int", "INTEGER", None),     # position of the image in its request
    Column("created_at", "datetime(3)", "TEXT", None),  # when the image was generated (UTC)
    _varchar("image_key", 512),                        # the image file's key in the outputs store
    _varchar("image_format", 16),                      # png, jpg or webp: the bytes in image_base64
    Column("infotext", "mediumtext", "TEXT", MEDIUMTEXT_BYTES),  # A1111's full "parameters" text
    _varchar("user", 128),                             # the Basic-auth user ("" on a server without auth)
    Column("gpu_seconds", "double", "REAL", None),     # this image's share of the engine's seconds
    Column("cost", "double", "REAL", None),            # their estimated price (Settings.pricing)
    _varchar("task_id", 64),                           # the task it came from (task API), else NULL
)

ALL_COLUMNS = ORIGINAL_COLUMNS + ADDED_COLUMNS
COLUMN_BY_NAME = {c.name: c for c in ALL_COLUMNS}

# (name, columns, unique). The unique (request_id, image_index) pair is the idempotency key: a redelivered
# event updates its row instead of adding one. NULLs (legacy rows) never collide.
INDEXES = (
    ("uq_generated_images_record", ("request_id", "image_index"), True),
    ("ix_generated_images_created", ("created_at",), False),
    ("ix_generated_images_model", ("model",), False),
    ("ix_generated_images_user_created", ("user", "created_at"), False),  # a user's gallery and usage
)


def mysql_create_table(collation: str | None) -> str:
    cols = ",\n  ".join(f"`{c.name}` {c.mysql}" for c in ALL_COLUMNS)
    keys = ",\n  ".join(f"{'UNIQUE ' if unique else ''}KEY `{name}` ({', '.join(f'`{c}`' for c in columns)})"
                        for name, columns, unique in INDEXES)
    collate = f" COLLATE={collation}" if collation else ""
    return (f"CREATE TABLE IF NOT EXISTS `{TABLE}` (\n  `id` int NOT NULL AUTO_INCREMENT PRIMARY KEY,\n  {cols},\n"
            f"  {keys}\n) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4{collate}")


def sqlite_create_table() -> str:
    cols = ",\n  ".join(f'"{c.name}" {c.sqlite}' for c in ALL_COLUMNS)
    return f'CREATE TABLE IF NOT EXISTS "{TABLE}" (\n  "id" INTEGER PRIMARY KEY AUTOINCREMENT,\n  {cols}\n)'


def sqlite_create_index(name: str, columns: tuple[str, ...], unique: bool) -> str:
    cols = ", ".join(f'"{c}"' for c in columns)
    return f'CREATE {"UNIQUE " if unique else ""}INDEX IF NOT EXISTS "{name}" ON "{TABLE}" ({cols})'


def mysql_add_column(column: Column) -> str:
    return f"ALTER TABLE `{TABLE}` ADD COLUMN `{column.name}` {column.mysql}"


def sqlite_add_column(column: Column) -> str:
    return f'ALTER TABLE "{TABLE}" ADD COLUMN "{column.name}" {column.sqlite}'


def mysql_add_index(name: str, columns: tuple[str, ...], unique: bool) -> str:
    cols = ", ".join(f"`{c}`" for c in columns)
    return f"ALTER TABLE `{TABLE}` ADD {'UNIQUE ' if unique else ''}KEY `{name}` ({cols})"
