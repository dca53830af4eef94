"""Backfills, and the job columns that tie a job to its backfill and its input version.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backfills",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("output_prefix", sa.Text, nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("max_in_flight", sa.Integer, nullable=False),
        sa.Column("listed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
        sa.Column("submitted", sa.Integer, nullable=False, server_default="0"),
        sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cursor", sa.Text),
        sa.Column("listing_done", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("report", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_backfills_created_at", "backfills", ["created_at"])
    with op.batch_alter_table("jobs") as batch:
        # No foreign key: jobs outlive their backfill's record, and TRUNCATE jobs stays simple.
        batch.add_column(sa.Column("backfill_id", sa.String(36)))
        batch.add_column(sa.Column("input_etag", sa.String(200)))
        batch.add_column(sa.Column("fingerprint", sa.String(64)))
    op.create_index("ix_jobs_backfill_status", "jobs", ["backfill_id", "status"])
    op.create_index("ix_jobs_fingerprint", "jobs", ["fingerprint"])


def downgrade() -> None:
    op.drop_index("ix_jobs_fingerprint", "jobs")
    op.drop_index("ix_jobs_backfill_status", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("fingerprint")
        batch.drop_column("input_etag")
        batch.drop_column("backfill_id")
    op.drop_table("backfills")
