"""Attempts may end "out of time": a batch system's time limit came, the trainer checkpointed.

SQLite stores the outcome as text without a constraint, so only PostgreSQL's native enum type
needs the new value.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 01:00:00
"""
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("ALTER TYPE attemptoutcome ADD VALUE IF NOT EXISTS 'out_of_time'")


def downgrade() -> None:
    # PostgreSQL cannot drop an enum value; rows keep theirs, and an older server cannot read them.
    pass
