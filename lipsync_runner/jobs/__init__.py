"""Background lip-sync jobs: records, their store, their files and the manager that runs them."""

from lipsync_runner.storage.job_files import JOBS_DIRNAME, OUTPUT_NAME, JobFiles, is_plain_name
from lipsync_runner.jobs.manager import INTERNAL_ERROR, Executor, JobContext, JobManager, JobOutcome
from lipsync_runner.params import JOB_ID_RE, is_job_id
from lipsync_runner.jobs.records import JobKind, JobParams, JobRecord, JobStatus, new_job_id, utcnow
from lipsync_runner.jobs.store import JobStore, SQLiteJobStore
from lipsync_runner.jobs.store_factory import open_store

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
