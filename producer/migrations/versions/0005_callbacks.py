"""Completion callbacks: the URL and delivery state on each job (the job is the outbox), and
one row per delivery attempt.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("callback_url", sa.Text))
        batch.add_column(sa.Column("callback_due_at", sa.DateTime(timezone=True)))
        batch.add_column(
            sa.Column("callback_tries", sa.Integer, nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("callback_delivered_at", sa.DateTime(timezone=True)))
    op.create_index("ix_jobs_callback_due_at", "jobs", ["callback_due_at"])
    op.create_table(
        "callback_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("worker", sa.String(255)),
        sa.Column("next_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_callback_attempts_job_id", "callback_attempts", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_callback_attempts_job_id", table_name="callback_attempts")
    op.drop_table("callback_attempts")
    op.drop_index("ix_jobs_callback_due_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("callback_delivered_at")
        batch.drop_column("callback_tries")
        batch.drop_column("callback_due_at")
        batch.drop_column("callback_url")
