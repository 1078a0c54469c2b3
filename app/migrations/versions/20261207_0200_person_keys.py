"""person keys: every recorded person also stored by the key they are compared under

`override.requested_by_key`, `override.extension_requested_by_key` and `vote.reviewer_key` hold
`app.core.person.person_key` of the name beside them, so SQL compares people the way the code does
(a requester's own overrides, the `requester` filter, one vote per person and round). Idempotency
records are re-keyed to the owner form `via|person key`.

Upgrading fails, naming them, if two votes of one round turn out to be by the same person under the new
key (a self-approval or a double vote the old comparison missed): a person decides which one stands.

Revision ID: 7a4c2e9d1f08
Revises: a68735ecc777
Create Date: 2026-12-07 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

from app.core.person import person_key

revision: str = "7a4c2e9d1f08"
down_revision: str | None = "a68735ecc777"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY = sqlmodel.sql.sqltypes.AutoString(length=200)


def _backfill(table: str, pairs: dict[str, str]) -> None:
    """Set each key column from its name column, row by row (the key is computed in Python)."""
    bind = op.get_bind()
    names = ", ".join(pairs)
    for row in bind.execute(sa.text(f"SELECT id, {names} FROM {table}")).mappings().all():  # noqa: S608
        values = {key: None if row[name] is None else person_key(row[name]) for name, key in pairs.items()}
        assignments = ", ".join(f"{key} = :{key}" for key in values)
        bind.execute(sa.text(f"UPDATE {table} SET {assignments} WHERE id = :id"), {**values, "id": row["id"]})  # noqa: S608


def _refuse_double_votes() -> None:
    doubles = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT override_id, round, reviewer_key, count(*) AS n FROM vote "
                "GROUP BY override_id, round, reviewer_key HAVING count(*) > 1"
            )
        )
        .all()
    )
    if doubles:
        listed = "; ".join(f"override {o} round {r}: {n} votes by '{k}'" for o, r, k, n in doubles)
        raise RuntimeError(
            f"Votes by one person under different spellings: {listed}. Decide which vote stands, delete the "
            "others from the vote table (the audit trail keeps them), and migrate again."
        )


def _rekey_idempotency_records() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id, principal, key FROM idempotency_record")).all()
    taken = {(principal, key) for _, principal, key in rows}
    for row_id, principal, key in rows:
        via, bar, actor = principal.partition("|")
        if not bar or "|" in actor:
            continue  # not a form this version wrote unambiguously; it expires with TLSO_IDEMPOTENCY_TTL
        owner = f"{via}|{person_key(actor)}"
        if owner != principal and (owner, key) not in taken:
            bind.execute(
                sa.text("UPDATE idempotency_record SET principal = :owner WHERE id = :id"),
                {"owner": owner, "id": row_id},
            )
            taken.add((owner, key))


def upgrade() -> None:
    # SQLite adds a NOT NULL column only with a default, and drops the default only by rebuilding the
    # table, which the foreign key from `vote` forbids for `override`: there the empty default stays
    # (every insert sets the key); PostgreSQL drops it. `vote` itself can be rebuilt.
    op.add_column("override", sa.Column("requested_by_key", KEY, nullable=False, server_default=""))
    op.add_column("override", sa.Column("extension_requested_by_key", KEY, nullable=True))
    _backfill("override", {"requested_by": "requested_by_key", "extension_requested_by": "extension_requested_by_key"})
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("override", "requested_by_key", server_default=None)
    op.drop_index("ix_override_requested_by", table_name="override")
    op.create_index("ix_override_requested_by_key", "override", ["requested_by_key"], unique=False)

    op.add_column("vote", sa.Column("reviewer_key", KEY, nullable=True))
    _backfill("vote", {"reviewer": "reviewer_key"})
    _refuse_double_votes()
    with op.batch_alter_table("vote") as batch_op:
        batch_op.alter_column("reviewer_key", existing_type=KEY, nullable=False)
        batch_op.drop_constraint("uq_vote_one_per_reviewer", type_="unique")
        batch_op.create_unique_constraint("uq_vote_one_per_reviewer", ["override_id", "round", "reviewer_key"])

    _rekey_idempotency_records()


def downgrade() -> None:
    # Idempotency records keep their keyed owners: for names already in key form they are the same,
    # the others are not replayed any more and expire with TLSO_IDEMPOTENCY_TTL.
    with op.batch_alter_table("vote") as batch_op:
        batch_op.drop_constraint("uq_vote_one_per_reviewer", type_="unique")
        batch_op.create_unique_constraint("uq_vote_one_per_reviewer", ["override_id", "round", "reviewer"])
        batch_op.drop_column("reviewer_key")

    op.drop_index("ix_override_requested_by_key", table_name="override")
    op.create_index("ix_override_requested_by", "override", ["requested_by"], unique=False)
    op.execute("ALTER TABLE override DROP COLUMN extension_requested_by_key")
    op.execute("ALTER TABLE override DROP COLUMN requested_by_key")
