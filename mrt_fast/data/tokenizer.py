"""The tiny tokenizer of the embedded task: characters, plus whole words of the task's text.

Built with the ``tokenizers`` library, deterministically, from code (no training corpus):

* pre-tokenisation isolates words of two letters or more together with one leading space
  (``" another"``), paragraph breaks (``"\\n\\n"``), and every other character on its own, so
  digits and key letters are always single tokens (the model copies them by attention, one
  token per fact) and the fixed text costs few tokens;
* a BPE model without merges over characters plus the words the task, the cues and the
  termination text use (``ignore_merges``: a piece that is a known word is one token, any
  other piece falls back to characters), so ``"Alternatively"`` is one token;
* byte fallback (``<0x..>`` tokens) for characters outside printable ASCII, so every string
  round-trips; offsets work (it is a ``PreTrainedTokenizerFast``);
* Qwen-style specials and chat template, and ``<think>``/``</think>`` as single added tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

from .chat import (
    ANSWER_LEAD_IN,
    CHAT_TEMPLATE,
    CUES,
    IM_END,
    IM_START,
    PAD_TOKEN,
    TERMINATION_TEXT,
    THINK_END,
    THINK_START,
)

ASSETS_DIR = Path(__file__).parent / "assets" / "tiny"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, UNK_TOKEN)
THINK_TOKENS = (THINK_START, THINK_END)
PRE_TOKEN_PATTERN = r"\n\n| ?[A-Za-z]{2,}|[\s\S]"

# Fixed phrases of the embedded task and of chat formatting whose words become single tokens.
TASK_PHRASES = (
    "Find the key whose value is",
    "Keys",
    "Let me try",
    "try",
    "is not",
    "so yes",
    "so no",
    "The answer is boxed",
    "user assistant system",
)


def task_words() -> list[str]:
    """Words (two letters or more) that get their own token, in a fixed order."""
    texts = (*TASK_PHRASES, *CUES, TERMINATION_TEXT, ANSWER_LEAD_IN)
    words: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"[A-Za-z]+", text):
            if len(word) > 1:
                words.setdefault(word, None)
    return list(words)


def build_tiny_tokenizer():
    """Build the tokenizer from code; returns a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for token in (*SPECIAL_TOKENS, *THINK_TOKENS):
        add(token)
    for byte in range(256):
        add(f"<0x{byte:02X}>")
    for char in [chr(c) for c in range(32, 127)] + ["\n", "\t"]:
        add(char)
    add("\n\n")
    for word in task_words():
        add(word)
        add(" " + word)

    # No merges: a pre-token that is in the vocabulary is one token (ignore_merges), anything
    # else splits into characters (bytes for characters outside the table).
    model = models.BPE(
        vocab=vocab, merges=[], unk_token=UNK_TOKEN, byte_fallback=True, ignore_merges=True
    )
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def load_tiny_tokenizer(path: str | Path | None = None):
    """The shipped tiny tokenizer (``mrt_fast/data/assets/tiny``), or the one saved at ``path``.

    Loads ``tokenizer.json`` as it is. Do not use ``AutoTokenizer`` on a directory that also
    holds the tiny model's ``config.json``: transformers 5 maps ``model_type="qwen2"`` to
    ``Qwen2Tokenizer``, which replaces our pre-tokenizer with Qwen's and tokenizes differently.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path) if path is not None else ASSETS_DIR
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}; build one with build_tiny_tokenizer()")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def load_tokenizer(path: str | Path, **kwargs):
    """Load any saved tokenizer correctly, the tiny one included: use this instead of AutoTokenizer.

    A directory whose ``tokenizer_config.json`` names the generic ``TokenizersBackend`` /
    ``PreTrainedTokenizerFast`` class is loaded from its ``tokenizer.json`` as it is (transformers 5's
    ``AutoTokenizer`` would substitute ``Qwen2Tokenizer`` next to a qwen2 ``config.json`` and change
    the tokenization); anything else goes through ``AutoTokenizer``.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(path) / "tokenizer_config.json"
    if config_file.is_file():
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(str(path), **kwargs)
    return AutoTokenizer.from_pretrained(str(path), **kwargs)
