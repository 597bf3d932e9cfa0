"""Training metrics: ``<run_dir>/metrics.jsonl``, TensorBoard when installed, a rank-0 progress bar.

Names follow verl (``reward/mean``, ``actor/pg_loss``, ``perf/throughput``, ``timing_s/gen`` ...), so
dashboards built for verl read our runs. Only rank 0 writes; values must already be reduced over
ranks (see :func:`reduce_mean`).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

from mrt_fast.distributed import all_gather_objects, all_reduce_sum

# Peak dense bf16 throughput, for MFU. Matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


class MetricsWriter:
    """Appends one JSON line per step to ``metrics.jsonl`` (and TensorBoard scalars)."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # keep the jsonl strictly parseable
    return value


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reduce_mean(metrics: Mapping[str, float], weights: Optional[Mapping[str, float]] = None) -> dict[str, float]:
    """Weighted mean of scalar metrics over ranks.

    ``weights[k]`` is this rank's weight for ``metrics[k]`` (default 1; e.g. its token count), so a
    rank with no tokens contributes nothing instead of a zero. Ranks may hold different keys (a
    rank whose micro-batches were all padding has no loss): the union is reduced, and every rank
    takes part in the same collectives whatever it holds.
    """
    keys = sorted({k for part in all_gather_objects(sorted(metrics)) for k in part})
    if not keys:
        return {}
    w = torch.tensor([float((weights or {}).get(k, 1.0)) if k in metrics else 0.0 for k in keys],
                     dtype=torch.float64)
    v = torch.tensor([float(metrics[k]) if k in metrics else 0.0 for k in keys], dtype=torch.float64)
    total = all_reduce_sum(torch.cat([v * w, w]))
    sums, wsum = total[: len(keys)], total[len(keys):]
    return {k: (s / n).item() if n > 0 else float("nan") for k, s, n in zip(keys, sums, wsum)}


class Timer:
    """Accumulates wall time per name; ``with timer("gen"): ...`` -> ``timing_s/gen``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"timing_s/{k}": v for k, v in self.totals.items()}
        self.totals = {}
        return out


def transformer_flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·H·S for attention (PaLM appendix B)."""
    return 6.0 * num_params + 12.0 * num_layers * hidden * seq_len


def mfu(tokens_per_s_per_gpu: float, flops_per_token: float) -> Optional[float]:
    """Model FLOPs utilisation against the GPU's dense bf16 peak; None on CPU or unknown GPUs."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return tokens_per_s_per_gpu * flops_per_token / peak
    return None


class ProgressBar:
    """tqdm bar on rank 0 showing step, reward and tokens/s; silent elsewhere."""

    def __init__(self, total: int, initial: int, *, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._bar is None:
            return
        post = {"step": step}
        if "reward/mean" in metrics:
            post["reward"] = f"{metrics['reward/mean']:.3f}"
        if "perf/throughput" in metrics:
            post["tok/s"] = f"{metrics['perf/throughput']:.0f}"
        for key in ("actor/pg_loss", "train/loss"):
            if key in metrics:
                post["loss"] = f"{metrics[key]:.4f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def unpause(self) -> None:
        """Restart the clock from now: time spent since the last update (an evaluation) is not a step's."""
        if self._bar is not None:
            self._bar.unpause()

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
