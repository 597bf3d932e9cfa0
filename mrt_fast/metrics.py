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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

import torch
from torch import nn

from mrt_fast.distributed import all_gather_objects, all_reduce_sum

if TYPE_CHECKING:
    from mrt_fast.packing import PackedBatch

# Peak dense (no sparsity) bf16 tensor-core FLOP/s per GPU, for MFU, matched in order against
# torch.cuda.get_device_name(): the H100's PCIe and NVL boards run at lower clocks and power than the
# SXM board, whose name carries only the memory ("NVIDIA H100 80GB HBM3"), so they come first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


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


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a decoder-only LM.

    ``body_params``: every parameter except the input embedding and the LM head (whose FLOPs are
    counted per target, not per token); ``attention_width``: heads x head_dim of the queries.
    """

    layers: int
    hidden: int
    attention_width: int
    vocab: int
    body_params: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelShape":
        """From an HF causal LM (sharded or not: a DTensor's ``numel`` is the global size)."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        outside = {id(p) for p in (*embed.parameters(), *head.parameters())}
        body = sum(p.numel() for p in model.parameters() if id(p) not in outside)
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, attention_width=heads * head_dim,
                   vocab=head.weight.shape[0], body_params=body)


def attended_pairs(batch: PackedBatch) -> int:
    """(query, key) pairs the prefix-tree mask lets attend in a packed micro-batch, from its layout.

    A prefix of P tokens is causal among itself (P(P+1)/2 pairs), counted once however many
    continuations share it; a continuation of R tokens sees the whole prefix and itself causally
    (R*P + R(R+1)/2). Sliding windows are not subtracted (an upper bound for windowed models).
    """
    from mrt_fast.packing.balance import segment_runs

    lengths, prefix, is_prefix = segment_runs(batch)
    causal = lengths * (lengths + 1) // 2
    return int(causal.sum() + (lengths * prefix)[~is_prefix].sum())


def micro_batch_flops(shape: ModelShape, batch: PackedBatch, *, backward: bool = True) -> float:
    """Model FLOPs of one packed micro-batch: forward + backward, or forward only.

    Forward: 2·body_params·tokens (every packed token through the matmuls) + 2·V·H·targets (only
    targets compute logits) + 4·layers·width·pairs (QK^T and PV over the attended pairs); the
    backward costs twice the forward. Padding (rank-balancing filler, a padded stream) is not
    useful work and is not counted; nor is recomputation by gradient checkpointing.
    """
    if batch.is_padding:
        return 0.0
    forward = (2.0 * shape.body_params * batch.num_tokens + 2.0 * shape.vocab * shape.hidden * batch.num_targets
               + 4.0 * shape.layers * shape.attention_width * attended_pairs(batch))
    return 3.0 * forward if backward else forward


def peak_flops(device_name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a GPU by its name; None for a GPU not in the table."""
    for key, peak in PEAK_BF16_FLOPS:
        if key in device_name:
            return peak
    return None


def mfu(flops_per_s_per_gpu: float) -> Optional[float]:
    """Model FLOPs utilisation against this GPU's dense bf16 peak; None on CPU or unknown GPUs."""
    if not torch.cuda.is_available():
        return None
    peak = peak_flops(torch.cuda.get_device_name())
    return None if peak is None else flops_per_s_per_gpu / peak


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
