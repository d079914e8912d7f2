"""GPU memory of jobs and their events (CUDA allocated and reserved, now and peak).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 13:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

COLUMNS = ("gpu_allocated_bytes", "gpu_reserved_bytes", "gpu_peak_allocated_bytes", "gpu_peak_reserved_bytes")


def upgrade() -> None:
    for table in ("job", "jobevent"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in COLUMNS:
                batch_op.add_column(sa.Column(column, sa.Integer(), nullable=True))


def downgrade() -> None:
    for table in ("job", "jobevent"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in COLUMNS:
                batch_op.drop_column(column)
