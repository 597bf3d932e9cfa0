"""Packing benchmarks: shared-prefix training step vs the alternatives, and the prefix finder.

Run: ``pytest bench/bench_packing.py`` (add ``--benchmark-json out.json`` to keep the figures).

1. Forward + backward of a causal LM over G continuations of one P-token prefix, loss through
   ``mrt_fast.loss.token_logprobs`` (no [N, V] logits) in every variant:
     * ``padded``          - a [G, P + R] batch through the stock model (SDPA, causal)
     * ``packed_unshared`` - one stream, each continuation with its own prefix copy (G*(P+R) tokens)
     * ``packed_shared``   - one stream, the prefix once (P + G*R tokens), prefix-tree attention
   GPU: Qwen2-1.5B-shaped model (random weights, bf16), P=8192, G=8, R=1024, FlexAttention for the
   packed variants, gradient checkpointing on (the padded batch does not fit without it).
   Target (issue 3): packed_shared at least 3x faster than packed_unshared (token ratio 4.5x).
   CPU: a tiny Qwen2 in fp32 with SDPA, P=512, G=4, R=64: the same comparison at a small shape.
   ``extra_info`` has tokens processed and tokens/s counted as the G*(P+R) tokens of the
   separate sequences (the work a user asked for), so the variants compare directly.

2. ``find_shared_prefixes`` core at ~1M tokens (128 prompts x 8 continuations, P=600, R=400,
   shuffled): native C++ vs the pure-Python reference, for token lists that share int objects
   (prompt lists concatenated, as a trainer builds them) and for lists of distinct int objects
   (e.g. decoded from tensors). Target (issue 3): native >= 20x faster. The public
   ``find_shared_prefixes`` end to end is also timed: it adds validation and PrefixGroup
   construction, Python-object work (every int object touched) that bounds its speedup.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
import transformers

from mrt_fast.loss import token_logprobs
import mrt_fast.packing.groups as groups_module
from mrt_fast.packing import (
    PrefixGroup,
    find_shared_prefixes,
    group_by_prefix_reference,
    native_available,
    pack,
    packed_hidden,
    prefix_finder,
)

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device: the Qwen2-1.5B-shaped bf16 step (P=8192, G=8, R=1024) needs a GPU"
VARIANTS = ["padded", "packed_unshared", "packed_shared"]

GPU_SHAPE = dict(P=8192, G=8, R=1024)
CPU_SHAPE = dict(P=512, G=4, R=64)


def qwen2_config(device: str) -> transformers.Qwen2Config:
    if device == "cuda":  # Qwen2-1.5B (DeepSeek-R1-Distill-Qwen-1.5B) shape
        return transformers.Qwen2Config(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
            tie_word_embeddings=False,
        )
    return transformers.Qwen2Config(
        vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )


class StepCase:
    """One shared-prefix group and a `step()` running forward + backward of one variant."""

    def __init__(self, variant: str, device: str):
        shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
        self.variant, self.device = variant, device
        config = qwen2_config(device)
        config._attn_implementation = "sdpa"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = transformers.AutoModelForCausalLM.from_config(config).to(device, dtype)
        if device == "cuda":
            self.model.gradient_checkpointing_enable()
        self.model.train()
        g = torch.Generator().manual_seed(0)
        p, n, r = shape["P"], shape["G"], shape["R"]
        prefix = torch.randint(0, config.vocab_size, (p,), generator=g).tolist()
        conts = [torch.randint(0, config.vocab_size, (r,), generator=g).tolist() for _ in range(n)]
        self.separate_tokens = n * (p + r)
        if variant == "padded":
            ids = torch.tensor([prefix + c for c in conts], device=device)
            self.ids, self.targets = ids, ids[:, p:].reshape(-1)
            self.tokens = ids.numel()
        else:
            (self.batch,) = pack([PrefixGroup(prefix, conts)], share_prefix=variant == "packed_shared")
            self.targets = self.batch.targets.to(device)
            self.tokens = self.batch.num_tokens
        self.p = p

    def step(self):
        head = self.model.get_output_embeddings()
        if self.variant == "padded":
            hidden = self.model.base_model(input_ids=self.ids, use_cache=False).last_hidden_state
            hidden = hidden[:, self.p - 1 : -1].reshape(-1, hidden.shape[-1])
        else:
            hidden = packed_hidden(self.model, self.batch)  # flex on GPU, sdpa on CPU
        logp = token_logprobs(hidden, head.weight, self.targets)
        (-logp.mean()).backward()
        self.model.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()


def _run_step(benchmark, variant, device, bench_device):
    case = StepCase(variant, device)
    case.step()  # warm-up (FlexAttention compiles, allocator settles)
    benchmark.pedantic(case.step, rounds=5 if device == "cuda" else 3, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(
        device=bench_device, variant=variant, tokens_processed=case.tokens, separate_tokens=case.separate_tokens,
        separate_tokens_per_s=case.separate_tokens / seconds, step_s=seconds,
    )


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_gpu(benchmark, variant, bench_device):
    _run_step(benchmark, variant, "cuda", bench_device)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_cpu(benchmark, variant, bench_device):
    _run_step(benchmark, variant, "cpu", bench_device)


# --- prefix finder -----------------------------------------------------------------------------


def million_token_sequences(distinct_objects: bool) -> list[list[int]]:
    rng = random.Random(0)
    seqs = []
    for _ in range(128):
        prompt = [rng.randrange(151936) for _ in range(600)]
        for _ in range(8):
            seqs.append(prompt + [rng.randrange(151936) for _ in range(400)])
    rng.shuffle(seqs)
    if distinct_objects:
        seqs = [torch.tensor(s).tolist() for s in seqs]
    return seqs


def best_time(fn, arg, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(arg)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("distinct_objects", [False, True], ids=["shared_int_objects", "distinct_int_objects"])
@pytest.mark.parametrize("impl", ["native", "python"])
def test_prefix_finder_1m_tokens(benchmark, impl, distinct_objects, bench_device):
    if impl == "native" and not native_available():
        pytest.skip("mrt_fast._native is not built (python setup.py build_ext --inplace)")
    seqs = million_token_sequences(distinct_objects)
    fn = prefix_finder._native.group_by_prefix if impl == "native" else group_by_prefix_reference
    benchmark.pedantic(fn, args=(seqs,), rounds=10 if impl == "native" else 3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(device=bench_device, tokens=sum(map(len, seqs)), sequences=len(seqs))


@pytest.mark.parametrize("distinct_objects", [False, True], ids=["shared_int_objects", "distinct_int_objects"])
@pytest.mark.parametrize("impl", ["native", "python"])
def test_find_shared_prefixes_end_to_end(benchmark, impl, distinct_objects, bench_device, monkeypatch):
    """The public call: validation + grouping + PrefixGroup construction (Python object work included)."""
    if impl == "native" and not native_available():
        pytest.skip("mrt_fast._native is not built (python setup.py build_ext --inplace)")
    if impl == "python":  # as installed without the extension: no native validation either
        monkeypatch.setattr(prefix_finder, "_native", None)
        monkeypatch.setattr(groups_module, "_native", None)
    seqs = million_token_sequences(distinct_objects)
    benchmark.pedantic(find_shared_prefixes, args=(seqs,), rounds=5 if impl == "native" else 3, iterations=1,
                       warmup_rounds=1)
    benchmark.extra_info.update(device=bench_device, tokens=sum(map(len, seqs)))


@pytest.mark.skipif(not native_available(), reason="mrt_fast._native is not built")
@pytest.mark.parametrize("distinct_objects", [False, True], ids=["shared_int_objects", "distinct_int_objects"])
def test_prefix_finder_native_speedup(distinct_objects, record_property):
    """The target itself: native >= 20x the Python reference (best of several runs, same process)."""
    seqs = million_token_sequences(distinct_objects)
    assert prefix_finder._native.group_by_prefix(seqs) == group_by_prefix_reference(seqs)
    native = best_time(prefix_finder._native.group_by_prefix, seqs, 15)
    python = best_time(group_by_prefix_reference, seqs, 3)
    record_property("speedup", python / native)
    print(f"\nprefix finder, 1M tokens, {'distinct' if distinct_objects else 'shared'} int objects: "
          f"python {python * 1e3:.1f} ms, native {native * 1e3:.2f} ms, speedup {python / native:.1f}x")
    assert python / native >= 20
