"""Housekeeping: a job's current phase, deletions marked before their files go, a steady ETA.

``job.phase`` is the trainer's phase now (loading data, training, evaluating, ...), null when no
trainer runs. ``job.deleting_at`` and ``artifact.deleting_at`` mark a deletion in progress: the
files go next, then the rows, and a server that starts with a mark set finishes the deletion.
``attempt.step_s`` is the attempt's smoothed seconds per training step, which the ETA uses.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 04:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('phase', sa.String(), nullable=True))
        batch_op.add_column(sa.Column('deleting_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    with op.batch_alter_table('artifact', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleting_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    with op.batch_alter_table('attempt', schema=None) as batch_op:
        batch_op.add_column(sa.Column('step_s', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('attempt', schema=None) as batch_op:
        batch_op.drop_column('step_s')
    with op.batch_alter_table('artifact', schema=None) as batch_op:
        batch_op.drop_column('deleting_at')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_column('deleting_at')
        batch_op.drop_column('phase')
