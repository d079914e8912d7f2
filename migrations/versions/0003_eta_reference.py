"""The step and time a job's ETA is measured from (its attempt's first reported step).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 14:25:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("eta_from_step", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("eta_from_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("eta_from_at")
        batch_op.drop_column("eta_from_step")
