"""Job history: an output keeps every job that ran for it. At most one unfinished (queued or
running) job per output, instead of one job per output; a plain index on output for the
lookups. The fingerprint index goes: a backfill now compares a photo's fingerprint with the
newest job of its output, found through the output.

A downgrade restores one job per output, and so fails once an output has several runs.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UNFINISHED = sa.text("status IN ('queued', 'running')")


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
    op.drop_index("ux_jobs_output_unfinished", table_name="jobs")
    op.drop_index("ix_jobs_output", table_name="jobs")
    op.create_index("ix_jobs_fingerprint", "jobs", ["fingerprint"])
    op.create_index("ux_jobs_output", "jobs", ["output"], unique=True)
