"""Background lip-sync jobs: records, their store, their files and the manager that runs them."""

from .files import JOBS_DIRNAME, OUTPUT_NAME, JobFiles, is_plain_name
from .manager import INTERNAL_ERROR, Executor, JobContext, JobManager, JobOutcome
from .records import JOB_ID_RE, JobKind, JobParams, JobRecord, JobStatus, is_job_id, new_job_id, utcnow
from .store import JobStore, SQLiteJobStore, open_store

__all__ = [
    "INTERNAL_ERROR",
    "JOBS_DIRNAME",
    "JOB_ID_RE",
    "OUTPUT_NAME",
    "Executor",
    "JobContext",
    "JobFiles",
    "JobKind",
    "JobManager",
    "JobOutcome",
    "JobParams",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "SQLiteJobStore",
    "is_job_id",
    "is_plain_name",
    "new_job_id",
    "open_store",
    "utcnow",
]
