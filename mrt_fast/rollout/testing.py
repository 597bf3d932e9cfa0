"""Tiny random models and a tiny tokenizer, built offline, for rollout tests and benchmarks."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

_CORPUS = [
    "Let me add the numbers: 3 + 4 = 7. Wait, check again: 3 + 4 = 7.",
    "Alternatively, multiply: 7 * 6 = 42. </think> The answer is \\boxed{42}.",
    "But hold on, is 12 - 5 = 7? Yes. Time is up. </think> So the result is 7.",
]


def tiny_causal_lm(
    kind: Literal["qwen2", "llama"] = "qwen2",
    *,
    vocab_size: int = 100,
    hidden_size: int = 32,
    num_layers: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A randomly initialised Qwen2- or Llama-shaped causal LM (eval mode, fp32, CPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[kind]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 96):
    """A small BPE tokenizer trained in memory (multi-character tokens, so stop strings can
    span token boundaries), wrapped as a `PreTrainedTokenizerFast`; id 1 is `<eos>`."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(set("".join(_CORPUS)))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()  # tokens concatenate back into the text
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run with `n` intra-op torch threads, then restore the previous count.

    Tiny models on a CPU shared with other jobs: OpenMP threads spin-waiting for each other
    make each small matmul 10-100x slower than on one thread, so tests and CPU benchmarks of
    the sampling loop pin one thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
