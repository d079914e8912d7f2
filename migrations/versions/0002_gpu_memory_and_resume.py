"""GPU memory of jobs and their events (CUDA allocated and reserved, now and peak), and the
checkpoint artifact a job resumes from.

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
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("checkpoint_artifact_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key("fk_job_checkpoint_artifact_id_artifact", "artifact",
                                    ["checkpoint_artifact_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_constraint("fk_job_checkpoint_artifact_id_artifact", type_="foreignkey")
        batch_op.drop_column("checkpoint_artifact_id")
    for table in ("job", "jobevent"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in COLUMNS:
                batch_op.drop_column(column)
