"""The tiny Qwen2-shaped model of the embedded task and its shipped warm-started checkpoint."""

from __future__ import annotations

from pathlib import Path

from .tokenizer import ASSETS_DIR, load_tiny_tokenizer

# Sized by measurement (docs/data.md): two layers are what a lookup in the prompt needs (one
# head finds the link, one copies its letter); at width 128 they learned it from drills, where a
# 4-layer width-256 model had not started to by step 800.
TINY_MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)


def tiny_model_config(vocab_size: int | None = None, **overrides):
    """A tiny ``Qwen2Config`` matching the tiny tokenizer (tied embeddings, 2048 positions).

    ``vocab_size`` defaults to the tiny tokenizer's size; ``overrides`` replace any field
    (tests use them for even smaller shapes).
    """
    from transformers import Qwen2Config

    tok = None
    if vocab_size is None:
        from .tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        vocab_size = len(tok)
    fields = dict(
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        attention_dropout=0.0,
        use_sliding_window=False,
        torch_dtype="float32",
    )
    fields.update(TINY_MODEL_SHAPE)
    if tok is not None:
        fields.update(
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None
        )
    fields.update(overrides)
    return Qwen2Config(**fields)


def load_warm_start(device: str = "cpu", path: str | Path | None = None):
    """The shipped warm-started tiny model and its tokenizer: ``(model, tokenizer)``.

    ``path`` loads a directory written by ``python -m mrt_fast.data.warm_start --out DIR``
    instead of the copy shipped in the package.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path) if path is not None else ASSETS_DIR
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no model.safetensors in {path}; produce one with "
            "`python -m mrt_fast.data.warm_start --out DIR`"
        )
    model = AutoModelForCausalLM.from_pretrained(str(path)).to(device)
    model.eval()
    return model, load_tiny_tokenizer(path)
