"""Which outputs a job owns (wrote itself), so no job replaces an object it did not write;
an index on mask_output, so a submit can check that no other job writes there.

Jobs that succeeded before this revision wrote their outputs: they own them, and a re-run of
their backfill may write them again.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("owns_output", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(
            sa.Column("owns_mask", sa.Boolean, nullable=False, server_default=sa.false())
        )
    jobs = sa.table(
        "jobs",
        sa.column("status", sa.String),
        sa.column("mask_output", sa.Text),
        sa.column("owns_output", sa.Boolean),
        sa.column("owns_mask", sa.Boolean),
    )
    op.execute(
        jobs.update()
        .where(jobs.c.status == "succeeded")
        .values(owns_output=True, owns_mask=jobs.c.mask_output.is_not(None))
    )
    op.create_index("ix_jobs_mask_output", "jobs", ["mask_output"])


def downgrade() -> None:
    op.drop_index("ix_jobs_mask_output", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("owns_mask")
        batch.drop_column("owns_output")
