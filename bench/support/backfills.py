"""What the bench scripts read of a running backfill."""

from __future__ import annotations

from sqlalchemy import select

from producer.db import session_scope
from producer.models import Backfill
from producer.settings import Settings


def submitted(settings: Settings, backfill_id: str) -> int:
    """Jobs the backfill has queued so far."""
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Backfill.submitted).where(Backfill.id == backfill_id)) or 0
