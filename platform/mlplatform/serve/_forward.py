"""The model deployments' forward passes, free of Ray.

The deployments in _models.py wrap these in Serve (`@serve.batch`, metrics, drift); the
GPU check calls them directly on a machine that has no Ray, so what it measures is the
code a replica runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mlplatform.errors import ServeError


def run_batched(run, xs: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """One model call over the rows of several requests: (each request's outputs, the rows run)."""
    big = xs[0] if len(xs) == 1 else np.concatenate(xs)
    out = run(big)
    parts, start = [], 0
    for x in xs:
        parts.append(out[start : start + len(x)])
        start += len(x)
    return parts, big


class TorchForward:
    """The torch model of an artifact directory on CUDA in bf16/fp16, or on the CPU when asked."""

    def __init__(self, model_dir: str | Path, settings: dict[str, Any]):
        import torch

        from mlplatform.train import load_model

        want = settings.get("device", "auto")
        if want == "cuda" and not torch.cuda.is_available():
            raise ServeError(
                f"`{settings['role']}.device` is cuda but this replica sees no CUDA device; place it on a GPU "
                f"node group (label_selector) with num_gpus > 0, or set device: cpu for a CPU stand-in."
            )
        self.device = torch.device("cuda" if want != "cpu" and torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, settings.get("dtype", "bfloat16"))
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(settings["num_cpus"])))
        self.model = load_model(model_dir).to(self.device, self.dtype).eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, non_blocking=True)
            t = t.to(self.dtype) if t.is_floating_point() else t
            return self.model(t).float().cpu().numpy()

    def check_health(self) -> None:
        # A GPU that fell off the bus (or a spot node being reclaimed) fails here.
        if self.device.type == "cuda":
            import torch

            torch.ones(1, device=self.device).add_(1)
            torch.cuda.synchronize(self.device)
