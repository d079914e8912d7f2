"""Ids, steps and byte counts become 64-bit on PostgreSQL; an attempt records its server.

PostgreSQL's INTEGER is 32-bit: a trainer using 3 GB, an upload of 2 GiB or an id past 2**31
was a database error there. SQLite's INTEGER already holds 64 bits (and its auto-incrementing
ids must stay INTEGER PRIMARY KEY), so on SQLite only the new column is added. On PostgreSQL
the id sequences are widened too: a sequence keeps its own type when its column changes.

``attempt.server_url`` names the server that started the attempt, so that two servers sharing
one database can tell their own attempts from each other's at start-up.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 01:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

MEMORY = ('rss_bytes', 'peak_rss_bytes', 'gpu_allocated_bytes', 'gpu_reserved_bytes', 'gpu_peak_allocated_bytes',
          'gpu_peak_reserved_bytes')
# Every column that can pass 2**31, by table (ids, the foreign keys to them, steps, bytes).
WIDE = {
    'job': ('id', 'after_job_id', 'encoder_artifact_id', 'checkpoint_artifact_id', 'step', 'total',
            'predicted_peak_bytes'),
    'attempt': ('id', 'job_id', 'start_step', 'end_step', 'eta_from_step', *MEMORY),
    'artifact': ('id', 'job_id', 'size_bytes'),
    'jobevent': ('id', 'job_id', 'step', 'total', *MEMORY),
}


def _widen(to: type[sa.types.TypeEngine], sequence_type: str) -> None:
    if op.get_bind().dialect.name == 'sqlite':
        return
    for table, columns in WIDE.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in columns:
                batch_op.alter_column(column, type_=to())
        if op.get_bind().dialect.name == 'postgresql':
            op.execute(f'ALTER SEQUENCE IF EXISTS {table}_id_seq AS {sequence_type}')


def upgrade() -> None:
    with op.batch_alter_table('attempt', schema=None) as batch_op:
        batch_op.add_column(sa.Column('server_url', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    _widen(sa.BigInteger, 'bigint')


def downgrade() -> None:
    _widen(sa.Integer, 'integer')
    with op.batch_alter_table('attempt', schema=None) as batch_op:
        batch_op.drop_column('server_url')
