"""What a flow knows about the Ray job it runs in."""

from __future__ import annotations

import json
import os
import uuid

# Ray's job supervisor hands the driver its job config (with the submission id in its metadata)
# through this variable; it is absent when a flow runs as a plain `python flows/x.py`.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_submission_id() -> str | None:
    """The id `ray job submit` printed for this job (``raysubmit_…``), or None outside a Ray job."""
    try:
        config = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV, "{}"))
    except json.JSONDecodeError:
        return None
    return (config.get("metadata") or {}).get("job_submission_id")


def run_id() -> str:
    """A name for this execution's outputs: the Ray job id, or a fresh ``local-…`` id."""
    return job_submission_id() or f"local-{uuid.uuid4().hex[:12]}"


def connect_ray(**init_kwargs) -> None:
    """``ray.init`` unless this process is connected already (a flow's ``main`` called from a driver
    that is: a notebook, a test, another flow)."""
    import ray

    if not ray.is_initialized():
        ray.init(**init_kwargs)
