"""One job per output location: no job can overwrite another job's result.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ux_jobs_output", "jobs", ["output"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_jobs_output", table_name="jobs")
