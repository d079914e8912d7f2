"""Each attempt of a job is its own row: the per-attempt fields leave the job table.

A job's process handle, trainer token, heartbeat, stop request, memory now and its ETA
reference belonged to whichever attempt ran; they move to ``attempt``. Existing jobs get one
row per attempt they counted; the newest carries what the job row held (so a trainer running
across the upgrade stays re-attachable), the older ones say they predate attempt records.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 22:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

OUTCOMES = ('succeeded', 'failed', 'paused', 'cancelled', 'stopped', 'interrupted', 'lost', 'crashed',
            'out_of_memory', 'not_started')
MEMORY = ('rss_bytes', 'peak_rss_bytes', 'gpu_allocated_bytes', 'gpu_reserved_bytes', 'gpu_peak_allocated_bytes',
          'gpu_peak_reserved_bytes')
# Job columns that were the running attempt's, with the attempt column each one becomes.
MOVED = {'pid': 'handle', 'token_sha256': 'token_sha256', 'last_heartbeat_at': 'last_heartbeat_at',
         'stop_request': 'stop_request', 'stop_requested_at': 'stop_requested_at',
         'attempt_start_step': 'start_step', 'attempt_started_at': 'started_at',
         'eta_from_step': 'eta_from_step', 'eta_from_at': 'eta_from_at', **{m: m for m in MEMORY}}
EARLIER = "recorded before NeuroLens kept attempts"


def job_columns() -> list[sa.Column]:
    return [sa.Column('pid', sa.Integer(), nullable=True),
            sa.Column('token_sha256', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
            sa.Column('last_heartbeat_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
            sa.Column('stop_request', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
            sa.Column('stop_requested_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
            sa.Column('attempt_start_step', sa.Integer(), nullable=False, server_default='0'),
            sa.Column('attempt_started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
            sa.Column('eta_from_step', sa.Integer(), nullable=True),
            sa.Column('eta_from_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
            *[sa.Column(m, sa.Integer(), nullable=True) for m in MEMORY]]


def upgrade() -> None:
    op.create_table('attempt',
    *[sa.Column(m, sa.Integer(), nullable=True) for m in MEMORY],
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('executor', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('handle', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('ended_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('start_step', sa.Integer(), nullable=False),
    sa.Column('end_step', sa.Integer(), nullable=True),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('outcome', sa.Enum(*OUTCOMES, name='attemptoutcome'), nullable=True),
    sa.Column('message', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('token_sha256', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('last_heartbeat_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('stop_request', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('stop_requested_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('killed_by_us', sa.Boolean(), nullable=False),
    sa.Column('eta_from_step', sa.Integer(), nullable=True),
    sa.Column('eta_from_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['job.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'number')
    )
    with op.batch_alter_table('attempt', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_attempt_job_id'), ['job_id'], unique=False)

    connection = op.get_bind()
    old_job = sa.table('job', sa.column('id'), sa.column('status'), sa.column('attempts'), sa.column('step'),
                       sa.column('started_at'), sa.column('finished_at'), sa.column('created_at'),
                       *[sa.column(c) for c in MOVED])
    attempt = sa.table('attempt', *[sa.column(c) for c in (
        'job_id', 'number', 'executor', 'started_at', 'ended_at', 'end_step', 'message', 'killed_by_us',
        *set(MOVED.values()))])
    for job in connection.execute(sa.select(old_job).where(old_job.c.attempts > 0)).mappings():
        running = job['status'] == 'running'
        for number in range(1, job['attempts'] + 1):
            row = {'job_id': job['id'], 'number': number, 'executor': 'local', 'killed_by_us': False,
                   'start_step': 0, 'started_at': job['started_at'] or job['created_at']}
            if number == job['attempts']:  # the newest: what the job row held was its
                row.update({MOVED[c]: job[c] for c in MOVED if job[c] is not None})
                row['handle'] = str(job['pid']) if job['pid'] is not None else None
            if number < job['attempts'] or not running:
                row.update(ended_at=job['finished_at'] or row['started_at'], end_step=job['step'], message=EARLIER,
                           token_sha256=None, stop_request=None, stop_requested_at=None)
                row.update({m: None for m in MEMORY if 'peak' not in m})
            connection.execute(attempt.insert().values(**row))

    with op.batch_alter_table('job', schema=None) as batch_op:
        for column in MOVED:
            batch_op.drop_column(column)


def downgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        for column in job_columns():
            batch_op.add_column(column)
    connection = op.get_bind()
    job = sa.table('job', sa.column('id'), *[sa.column(c) for c in MOVED])
    attempt = sa.table('attempt', sa.column('job_id'), sa.column('number'), *[sa.column(c) for c in set(MOVED.values())])
    newest = sa.select(attempt.c.job_id, sa.func.max(attempt.c.number).label('number')).group_by(attempt.c.job_id)
    for job_id, number in connection.execute(newest).all():
        row = connection.execute(sa.select(attempt).where(attempt.c.job_id == job_id,
                                                          attempt.c.number == number)).mappings().one()
        values = {c: row[MOVED[c]] for c in MOVED}
        values['pid'] = int(row['handle']) if row['handle'] and row['handle'].isdigit() else None
        values['attempt_start_step'] = values['attempt_start_step'] or 0
        connection.execute(job.update().where(job.c.id == job_id).values(**values))
    with op.batch_alter_table('attempt', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_attempt_job_id'))
    op.drop_table('attempt')
    sa.Enum(name='attemptoutcome').drop(connection, checkfirst=True)
