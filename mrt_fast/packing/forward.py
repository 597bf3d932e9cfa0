"""Packed forward of an HF causal LM: hidden states at loss-target positions, and log-probs.

`packed_hidden` runs the model's decoder (not its LM head) on one packed stream with
prefix-tree attention and gathers the final hidden state that predicts each target. The loss then
goes through the fused log-prob provider (`mrt_fast.loss`) with the LM head weight, so no
`[tokens, vocab]` logits exist. That is only right when the model's logits are `hidden @ W^T (+ b)`:
models that soft-cap or scale logits, or whose layers are not all attention layers we can mask,
are refused with a clear error rather than silently mis-scored.
"""

from __future__ import annotations

import torch
from torch import nn

from mrt_fast.packing.attention import (
    CONTEXT_KWARG,
    FLEX_PAD_MULTIPLE,
    PackedAttentionContext,
    default_backend,
    pad_stream,
    padded_length,
    route_packed_attention,
)
from mrt_fast.packing.batch import PackedBatch

# Config attributes that change logits beyond `hidden @ W^T`, with the value meaning "off".
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma2/3
    "logit_scale": None,  # Cohere (multiplies logits)
    "logits_scaling": 1.0,  # Granite (divides logits)
    "dim_model_base": None,  # MiniCPM (scales hidden before the head)
    "output_multiplier_scale": None,
}
# Config attributes of attention variants the prefix-tree mask does not model.
_ATTENTION_VARIANTS = {
    "attn_logit_softcapping": None,  # Gemma2
    "attention_chunk_size": None,  # Llama4 chunked attention
}
_SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


def check_model(model: nn.Module) -> None:
    """Raise if the packed path cannot reproduce this model's outputs exactly."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model must be a transformers PreTrainedModel with a config, got {type(model).__name__}")
    for name, off in {**_LOGIT_TRANSFORMS, **_ATTENTION_VARIANTS}.items():
        value = getattr(config, name, off)
        if value != off:
            raise ValueError(
                f"{type(model).__name__} has config.{name}={value!r}: its logits/attention are not plain "
                "`hidden @ W^T` with standard attention, which packed training assumes; not supported"
            )
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not set(layer_types) <= _SUPPORTED_LAYER_TYPES:
        raise ValueError(
            f"{type(model).__name__} has layer types {sorted(set(layer_types) - _SUPPORTED_LAYER_TYPES)}; "
            f"packed attention supports only {sorted(_SUPPORTED_LAYER_TYPES)}"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"model must be a causal LM whose output embedding is an nn.Linear LM head, got {type(head).__name__}"
        )
    if getattr(model, "base_model", model) is model:
        raise TypeError(f"model must be a *ForCausalLM with a separate decoder (base_model), got {type(model).__name__}")


def _check_batch_fits(model: nn.Module, batch: PackedBatch) -> None:
    batch.check_consistent()
    vocab = model.get_input_embeddings().num_embeddings
    head_vocab = model.get_output_embeddings().out_features
    if batch.num_tokens == 0:
        raise ValueError("batch is empty")
    top = int(batch.input_ids.max())
    if top >= vocab:
        raise ValueError(f"batch.input_ids contains token id {top}, outside the model's vocabulary of {vocab}")
    if batch.num_targets and int(batch.targets.max()) >= head_vocab:
        raise ValueError(f"batch.targets contains token id {int(batch.targets.max())}, outside the LM head's {head_vocab}")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and batch.max_sequence_length > max_positions:
        raise ValueError(
            f"a prefix + continuation in the batch has {batch.max_sequence_length} tokens, more than the "
            f"model's max_position_embeddings={max_positions}"
        )


def packed_hidden(
    model: nn.Module, batch: PackedBatch, *, backend: str = "auto", pad_to_multiple: int | None | str = "auto"
) -> torch.Tensor:
    """Final hidden states `[T, H]` at the positions that predict `batch.targets` (target order).

    The shared last-prefix position is gathered once per continuation, so its gradient is the sum
    over the continuations, as with separate sequences. Works with gradient checkpointing on:
    recomputed layers take the packed path too (see `route_packed_attention`).

    Args:
        model: an HF causal LM (Llama, Qwen2, Qwen3, Mistral, ... with standard attention).
        batch: one micro-batch from `pack`.
        backend: "flex", "sdpa", "flash_varlen" or "auto" (flex on GPU, sdpa on CPU).
        pad_to_multiple: run the stream padded to a multiple of this many tokens (an isolated
            padding group; results are unchanged). "auto": `FLEX_PAD_MULTIPLE` for flex on a GPU,
            where every new length would cost a compile, and no padding otherwise; None: none.
    """
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"batch must be a PackedBatch, got {type(batch).__name__}")
    check_model(model)
    _check_batch_fits(model, batch)
    device = model.get_input_embeddings().weight.device
    if backend == "auto":
        backend = default_backend(device)
    if pad_to_multiple != "auto" and pad_to_multiple is not None and (
            isinstance(pad_to_multiple, bool) or not isinstance(pad_to_multiple, int) or pad_to_multiple < 1
    ):
        raise ValueError(f"pad_to_multiple must be 'auto', None or a positive int, got {pad_to_multiple!r}")
    if pad_to_multiple == "auto":
        pad_to_multiple = FLEX_PAD_MULTIPLE if backend == "flex" and device.type == "cuda" else None
    b = batch.to(device)
    length = padded_length(b.num_tokens, pad_to_multiple)
    ctx = PackedAttentionContext.from_batch(b, backend, length=length)
    input_ids, position_ids, _, _ = pad_stream(b, length)
    route_packed_attention(model)
    out = model.base_model(
        input_ids=input_ids[None],
        position_ids=position_ids[None],
        use_cache=False,
        **{CONTEXT_KWARG: ctx},
    )
    # Every layer must have gone through our attention; a layer that mixed tokens any other way
    # (a forked attention class, a recurrent layer) would leak across groups unnoticed.
    layers = getattr(model.config, "num_hidden_layers", None)
    if ctx.calls == 0 or (layers is not None and ctx.calls != layers):
        raise RuntimeError(
            f"{type(model).__name__}: packed attention ran in {ctx.calls} of {layers} layers; this model does not "
            "dispatch all attention through transformers' AttentionInterface, so packing would be wrong"
        )
    return out.last_hidden_state[0].index_select(0, b.target_positions)


def packed_logprobs(
    model: nn.Module,
    batch: PackedBatch,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
    pad_to_multiple: int | None | str = "auto",
) -> list[torch.Tensor]:
    """Per continuation in `batch.sequence_keys` order: log-probs of its target tokens.

    fp32, as `token_logprobs` returns them (fp64 for an fp64 model on the PyTorch path).

    Computed by `mrt_fast.loss.token_logprobs` from the hidden states and the LM head (tied
    embeddings included: the head weight is the embedding, and its gradients add up).
    """
    from mrt_fast.loss import token_logprobs

    hidden = packed_hidden(model, batch, backend=backend, pad_to_multiple=pad_to_multiple)
    head = model.get_output_embeddings()
    targets = batch.targets.to(hidden.device)
    logprobs = token_logprobs(hidden, head.weight, targets, temperature=temperature, bias=head.bias)
    return list(logprobs.split(batch.target_counts))
