"""Resumable flows: a step runs only when its outputs for the same inputs are not there yet.

A flow is a list of :class:`Step` s run in order. Each step has a *key*: a content hash of what
shapes its outputs (the config sections it reads, the content of external inputs such as a source
prefix, and the key of the step before it, so a change reaches every step downstream). When a step
finishes, the flow writes ``<state>/steps/<step>.json`` — one object PUT (locally a write-then-rename),
so a reader sees the old record or the new one, never half of one — with the key and where the
outputs went. A step runs under a lease (``<state>/leases/<step>.json``, geopix/leases.py), so two
submissions of one pipeline at once never run the same step together: the second stops, naming
the run that holds it. A later
submission with the same key finds the record, checks that the outputs still exist and skips the
step. Outputs are named from the key, so two configs never share or overwrite them, and a step that
was killed half-way (a training run) finds its own partial outputs and resumes them.

    --from-step S   steps before S must be current (their records are reused); S and later rerun
    --only S        the same, and the flow stops after S

Each step's work logs its own MLflow child run under the flow's parent; a skipped step logs a child
run tagged ``geopix.skipped`` with the outputs it reused, so every step of every submission is
visible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from geopix import storage
from geopix.leases import DEFAULT_TTL_S, Lease

log = logging.getLogger(__name__)

SKIPPED_TAG = "geopix.skipped"


class PipelineError(RuntimeError):
    """A flow that cannot go on: bad step flags, or an earlier step with no current outputs."""


def content_key(*parts: Any) -> str:
    """A short hash of JSON-able parts (pydantic models are dumped), stable across key order."""

    def plain(part: Any) -> Any:
        return part.model_dump(mode="json") if hasattr(part, "model_dump") else part

    canonical = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class StepRecord:
    step: str
    key: str
    outputs: dict[str, Any]
    seconds: float
    mlflow_run_id: str | None = None
    finished_at: str = ""


@dataclass
class Context:
    """What a step's functions see: the outputs of the steps before it, its key, whether it must
    redo work whose outputs exist (``fresh``: --from-step/--only named it or a step before it)."""

    outputs: dict[str, dict[str, Any]]
    key: str = ""
    fresh: bool = False


@dataclass
class Step:
    name: str
    # What shapes this step's outputs besides the previous step's key (config sections, the
    # fingerprint of an input prefix); called before deciding whether to run.
    inputs: Callable[[Context], Any]
    run: Callable[[Context], dict[str, Any]]  # does the work; returns where the outputs went
    # Whether recorded outputs are still there (a deleted prefix or model version reruns the step).
    exists: Callable[[dict[str, Any]], bool] = field(default=lambda outputs: True)


@dataclass
class StepOutcome:
    step: str
    status: str  # ran | skipped
    seconds: float
    key: str
    outputs: dict[str, Any]


def pipeline_root(state_uri: str, name: str) -> str:
    """Where the pipeline ``name`` keeps its step records, leases and run summaries."""
    return storage.join_uri(state_uri, name)


def step_record_uri(root: str, step: str) -> str:
    return storage.join_uri(root, "steps", f"{step}.json")


def read_step_record(root: str, step: str) -> StepRecord | None:
    """The record of ``step`` under a pipeline's ``root`` (:func:`pipeline_root`), or None when there
    is none — or none that can be read (a record cut short by a crash is reported and the step
    reruns, instead of every later run failing)."""
    uri = step_record_uri(root, step)
    try:
        return StepRecord(**json.loads(storage.read_bytes(uri)))
    except (storage.StorageError, FileNotFoundError):
        return None
    except (ValueError, TypeError) as exc:
        log.warning("step %s: its record %s is unreadable (%s); the step runs again", step, uri, exc)
        return None


class Pipeline:
    """Runs steps in order under ``<state_uri>/<name>/``; see the module docstring."""

    def __init__(
        self, name: str, state_uri: str, step_names: Sequence[str], *,
        from_step: str | None = None, only: str | None = None, lease_ttl_s: float = DEFAULT_TTL_S,
    ):  # fmt: skip
        for flag, value in (("--from-step", from_step), ("--only", only)):
            if value is not None and value not in step_names:
                raise PipelineError(f"{flag} {value!r} is not a step; steps: {', '.join(step_names)}")
        if from_step and only:
            raise PipelineError("give --from-step or --only, not both")
        self.name = name
        self.root = pipeline_root(state_uri, name)
        self.step_names = list(step_names)
        self.first_forced = self.step_names.index(from_step or only) if (from_step or only) else None
        self.last = self.step_names.index(only) if only else len(step_names) - 1
        self.outcomes: list[StepOutcome] = []
        self.lease_ttl_s = lease_ttl_s

    def record_uri(self, step: str) -> str:
        return step_record_uri(self.root, step)

    def record(self, step: str) -> StepRecord | None:
        return read_step_record(self.root, step)

    @staticmethod
    def is_current(record: StepRecord | None, step: Step, key: str) -> bool:
        """Whether a step's record stands: made with ``key``, and its outputs still there."""
        return record is not None and record.key == key and step.exists(record.outputs)

    def lease_uri(self, step: str) -> str:
        return storage.join_uri(self.root, "leases", f"{step}.json")

    def run(self, steps: Sequence[Step]) -> list[StepOutcome]:
        if [s.name for s in steps] != self.step_names:
            raise PipelineError(f"steps {[s.name for s in steps]} differ from {self.step_names}")
        import mlflow

        from geopix import tracking

        context = Context(outputs={})
        previous_key = ""
        for index, step in enumerate(steps[: self.last + 1]):
            key = content_key(step.name, step.inputs(context), previous_key)
            forced = self.first_forced is not None and index >= self.first_forced
            record = self.record(step.name)
            if not forced and self.is_current(record, step, key):
                log.info("step %s: outputs current (key %s), skipped", step.name, key)
                with tracking.step_run(step.name, params={"key": key}):
                    mlflow.set_tag(SKIPPED_TAG, "true")
                    mlflow.log_dict(asdict(record), "step.json")
                    mlflow.log_params({f"output.{k}": v for k, v in _flat(record.outputs).items()})
                self.outcomes.append(StepOutcome(step.name, "skipped", 0.0, key, record.outputs))
            elif self.first_forced is not None and index < self.first_forced:
                raise PipelineError(
                    f"step {step.name} has no current outputs under {self.root} for these inputs "
                    f"(key {key}, recorded {record.key if record else 'none'}); "
                    "run without --from-step/--only first"
                )
            else:
                context.key, context.fresh = key, forced
                record, ran = self._run_leased(step, context, key)
                self.outcomes.append(StepOutcome(step.name, "ran" if ran else "skipped", record.seconds if ran else 0.0,
                                                 key, record.outputs))  # fmt: skip
            context.outputs[step.name] = record.outputs
            previous_key = key
        return self.outcomes

    def _run_leased(self, step: Step, context: Context, key: str) -> tuple[StepRecord, bool]:
        """Run one step under its lease: a second submission of the same pipeline (a retry beside a
        running job) stops here, naming the run that holds the step, instead of doing it twice.
        Returns the step's record and whether this run did the work (not when another run finished
        it between our look at its record and our lease)."""
        lease = Lease(self.lease_uri(step.name), ttl_s=self.lease_ttl_s)
        if not lease.acquire():
            raise PipelineError(
                f"step {step.name} of pipeline {self.name} is being run by {lease.describe_holder()}; "
                "wait for that run to end (a killed run's lease is freed at once on its host, else when it expires)"
            )
        try:
            done = self.record(step.name)
            if not context.fresh and self.is_current(done, step, key):
                log.info("step %s: finished by another run meanwhile (key %s), skipped", step.name, key)
                return done, False
            log.info("step %s: running (key %s%s)", step.name, key, ", fresh" if context.fresh else "")
            started = time.perf_counter()
            outputs = step.run(context)
            seconds = round(time.perf_counter() - started, 1)
            lease.check()  # another run took the step over: its record, not ours, stands
            record = StepRecord(
                step.name, key, outputs, seconds, outputs.get("mlflow_run_id"),
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )  # fmt: skip
            storage.write_bytes(self.record_uri(step.name), json.dumps(asdict(record), indent=1).encode())
            return record, True
        finally:
            lease.release()

    def summary(self) -> dict[str, Any]:
        return {
            "pipeline": self.name,
            "state_uri": self.root,
            "steps": [asdict(o) for o in self.outcomes],
            "not_run": self.step_names[len(self.outcomes) :],  # after --only, or from a failed step on
        }


def _flat(outputs: dict[str, Any]) -> dict[str, str]:
    """Short scalar outputs as MLflow params (long values are in the step.json artifact)."""
    return {k: str(v) for k, v in outputs.items() if isinstance(v, (str, int, float, bool)) and len(str(v)) < 500}
