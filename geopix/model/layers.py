"""Small layers shared by the encoder and the mask predictor."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def local_path(path: str | Path, what: str) -> Path:
    """``path`` as a local path: the model reads local files only (``geopix.weights`` fetches the
    S3 locations a config names before the model is built)."""
    if str(path).lower().startswith(("s3://", "s3a://")):
        raise ValueError(f"{what} is {path}: the model reads local files only; fetch it first "
                         "(geopix.weights.local_weights for a config, storage.local_copy for a saved model)")  # fmt: skip
    if not Path(path).exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    return Path(path)


class Float32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises in fp32 whatever the dtype of its input and weights.

    Mixed precision (DeepSpeed bf16, ``model.to(bfloat16)``) casts parameters but keeps buffers,
    so the affine weights end up bf16 next to fp32 running statistics, a mix ``F.batch_norm``
    rejects; statistics kept in bf16 would also drift. Computing in fp32 avoids both, and the
    running statistics stay fp32 even through ``module.to(torch.bfloat16)``.
    """

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in ("running_mean", "running_var"):
            stats = getattr(self, name)
            if stats is not None and stats.dtype != torch.float32:
                setattr(self, name, stats.float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = 0.0 if self.momentum is None else self.momentum
        use_batch_stats = self.training or not self.track_running_stats
        out = F.batch_norm(
            x.float(),
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            None if self.weight is None else self.weight.float(),
            None if self.bias is None else self.bias.float(),
            use_batch_stats,
            momentum,
            self.eps,
        )
        return out.to(x.dtype)


def use_float32_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every ``nn.BatchNorm2d`` inside ``module`` (e.g. a third-party backbone) into
    :class:`Float32BatchNorm2d` in place; parameters and statistics are kept as they are."""
    for child in module.modules():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = Float32BatchNorm2d
    return module
