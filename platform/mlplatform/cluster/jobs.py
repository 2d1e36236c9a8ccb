"""Submit a job through Ray's job API (what `ray job submit` does) and wait for its end."""

from __future__ import annotations

import time
from dataclasses import dataclass

import tenacity

from mlplatform.cluster.connect import authenticate
from mlplatform.errors import ClusterError


@dataclass(frozen=True)
class JobResult:
    """How a submitted job ended: its id, final status and everything it printed."""

    job_id: str
    status: str
    logs: str
    seconds: float

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"


def submit_job(
    entrypoint: str, working_dir: str = ".", *, name: str | None = None, timeout_s: float = 1800.0
) -> JobResult:
    """Submit `entrypoint` to local cluster `name` (or the only one) and wait for it.

    Raises:
        ClusterError: the job did not end within `timeout_s` (it is stopped).
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(authenticate(name).dashboard_url)
    start = time.monotonic()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": working_dir})
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}

    def give_up(_: tenacity.RetryCallState) -> None:
        client.stop_job(job_id)
        raise ClusterError(f"Job {job_id} ({entrypoint}) did not finish within {timeout_s:.0f}s; it was stopped.")

    status = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda s: s not in terminal),
        stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_fixed(1),
        retry_error_callback=give_up,
    )(client.get_job_status, job_id)
    return JobResult(job_id, status.value, client.get_job_logs(job_id), time.monotonic() - start)
