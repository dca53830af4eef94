"""Job history: an output keeps every job that ran for it. At most one unfinished (queued or
running) job per output, instead of one job per output; a plain index on output for the
lookups. The fingerprint index goes: a backfill now compares a photo's fingerprint with the
newest job of its output, found through the output.

A downgrade restores one job per output, so it deletes the rest of each output's history (and
their callback attempts), keeping per output the unfinished job if there is one, else the job
that owns the object there, else the newest.

Revision ID: 0006
Revises: 0005
"""

import logging

import sqlalchemy as sa
from alembic import op

log = logging.getLogger("alembic.runtime.migration")

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UNFINISHED_SQL = "status IN ('queued', 'running')"
UNFINISHED = sa.text(UNFINISHED_SQL)
# Jobs that are not the first of their output in the order of what to keep.
SUPERSEDED = f"""
    SELECT id FROM (
        SELECT id, ROW_NUMBER() OVER (
            PARTITION BY output
            ORDER BY CASE WHEN {UNFINISHED_SQL} THEN 0 ELSE 1 END,
                     CASE WHEN owns_output THEN 0 ELSE 1 END,
                     created_at DESC, id DESC
        ) AS place
        FROM jobs
    ) AS ranked WHERE place > 1
"""


def upgrade() -> None:
    op.drop_index("ux_jobs_output", table_name="jobs")
    op.drop_index("ix_jobs_fingerprint", table_name="jobs")
    op.create_index("ix_jobs_output", "jobs", ["output"])
    op.create_index(
        "ux_jobs_output_unfinished",
        "jobs",
        ["output"],
        unique=True,
        postgresql_where=UNFINISHED,
        sqlite_where=UNFINISHED,
    )


def downgrade() -> None:
    connection = op.get_bind()
    connection.execute(sa.text(f"DELETE FROM callback_attempts WHERE job_id IN ({SUPERSEDED})"))
    deleted = connection.execute(sa.text(f"DELETE FROM jobs WHERE id IN ({SUPERSEDED})"))
    if deleted.rowcount:
        log.warning(
            "deleted %d earlier runs of outputs: 0005 keeps one job per output", deleted.rowcount
        )
    op.drop_index("ux_jobs_output_unfinished", table_name="jobs")
    op.drop_index("ix_jobs_output", table_name="jobs")
    op.create_index("ix_jobs_fingerprint", "jobs", ["fingerprint"])
    op.create_index("ux_jobs_output", "jobs", ["output"], unique=True)
