"""Loading DeepSpeed checkpoints without unpickling code from storage.

DeepSpeed's own checkpoint engine reads every checkpoint file with ``torch.load(weights_only=False)``:
a full unpickler, so whoever can write the checkpoints prefix (run names are predictable) could run
code on every worker that resumes. GeoPix swaps in :class:`SafeCheckpointEngine`, which loads with
``weights_only=True``: tensors, containers and plain values, plus exactly the few DeepSpeed classes
that its ZeRO optimizer state holds (:data:`DEEPSPEED_STATE_GLOBALS`, found by loading checkpoints of
ZeRO-1 and -2, fp32 and bf16). Anything else in a checkpoint is refused with
:class:`CheckpointRefused` before it is constructed; nothing in it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# What a ZeRO-1/2 optimizer state file holds beyond tensors and plain values.
DEEPSPEED_STATE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


class CheckpointRefused(RuntimeError):
    """A checkpoint file holding a Python object no GeoPix/DeepSpeed checkpoint holds."""


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` (saving unchanged)."""

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(DEEPSPEED_STATE_GLOBALS):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            reason = str(exc).strip().splitlines()
            detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
            raise CheckpointRefused(
                f"checkpoint file {Path(path).name} was refused: it holds a Python object that no DeepSpeed "
                f"checkpoint holds ({detail.strip()[:300]}). Nothing of it was run. Someone other than this "
                "run's training may have written its checkpoints prefix (train.runs_uri); start a fresh run "
                "(another --name) and check who can write there"
            ) from None


def install(engine) -> None:
    """Make a DeepSpeed engine load its checkpoints through :class:`SafeCheckpointEngine`."""
    engine.checkpoint_engine = SafeCheckpointEngine(config_params=engine._config)
