"""`make_engine`: pick a rollout backend by name."""

from __future__ import annotations

from typing import Any

from .protocol import RolloutEngine

BACKENDS = ("hf", "vllm")


def make_engine(backend: str = "hf", **kwargs: Any) -> RolloutEngine:
    """Build a rollout engine.

    - `make_engine("hf", model=..., tokenizer=None, **HFEngine options)`, or
      `make_engine("hf", model_path=DIR, device="cpu", dtype=None, **HFEngine options)` to load a
      local checkpoint (and its tokenizer, when the directory has one).
    - `make_engine("vllm", model_path=DIR, tokenizer=None, **VLLMEngine options)`: needs the
      optional `vllm` package (a supported version, see `vllm_engine.SUPPORTED_VLLM`) and a GPU;
      pass the run's tokenizer so that `Completion.text` is decoded with it.
    """
    if backend == "hf":
        from .hf_engine import HFEngine

        model = kwargs.pop("model", None)
        path = kwargs.pop("model_path", None)
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        if (model is None) == (path is None):
            raise ValueError("make_engine('hf'): pass exactly one of model= or model_path=")
        if path is not None:
            from transformers import AutoModelForCausalLM

            from ..data.tokenizer import load_tokenizer  # AutoTokenizer mis-loads the tiny task tokenizer

            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype) if dtype else AutoModelForCausalLM.from_pretrained(path)
            if kwargs.get("tokenizer") is None:
                try:
                    kwargs["tokenizer"] = load_tokenizer(path)
                except (OSError, ValueError):
                    kwargs["tokenizer"] = None  # a weights-only directory: token ids in, ids out
        if device is not None:
            model = model.to(device)
        return HFEngine(model, **kwargs)
    if backend == "vllm":
        from .vllm_engine import VLLMEngine

        if "model" in kwargs:
            raise ValueError(
                "make_engine('vllm') loads weights itself: pass model_path= (a checkpoint directory, e.g. "
                "from model.save_pretrained), not model=; sync later weights with update_weights()"
            )
        return VLLMEngine(**kwargs)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
