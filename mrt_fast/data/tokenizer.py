"""The tiny tokenizer of the embedded tasks: bytes, plus whole words of the tasks' text.

A byte-level BPE built deterministically from code (no training corpus), in exactly the format
of Qwen2's tokenizer (its pre-tokenisation regex, byte-level alphabet, NFC normalizer), so that
``transformers.AutoTokenizer`` - which loads every directory whose ``config.json`` says
``model_type="qwen2"`` as ``Qwen2Tokenizer`` - gives the same ids as the tokenizer built here:

* every word of the tasks, the cues and the termination text is one token: a lowercase word
  with or without its leading space (``" try"``), a capitalised one without (``"Alternatively"``);
  merges are added word by word, each at the lowest priority, so a word the merges already build
  keeps its tokens;
* no merge joins two capitals, or a space and a capital: the chain task's letters are capitals,
  so a link (``EQ``) is always the same two tokens, and a letter the same token, wherever it is
  written;
* digits, key letters and punctuation are single tokens (the model copies them by attention, one
  token per fact), a space before a key letter is its own token, ``"\\n\\n"`` is one token;
* any other text falls back to smaller pieces, down to bytes, so every string round-trips and
  offsets work (it is a fast tokenizer);
* Qwen-style specials and chat template, and ``<think>``/``</think>`` as single added tokens.
"""

from __future__ import annotations

from pathlib import Path

from .chat import (
    ANSWER_LEAD_IN,
    CHAT_TEMPLATE,
    CUES,
    IM_END,
    IM_START,
    PAD_TOKEN,
    PARAGRAPH_SEP,
    TERMINATION_TEXT,
    THINK_END,
    THINK_START,
)

ASSETS_DIR = Path(__file__).parent / "assets" / "tiny"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
THINK_TOKENS = (THINK_START, THINK_END)
# Qwen2's pre-tokenisation (transformers' Qwen2Tokenizer applies it to any qwen2 checkpoint).
PRE_TOKEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Fixed text of the embedded tasks and of chat formatting whose words become single tokens.
TASK_PHRASES = (
    "Find the key whose value is",
    "Keys",
    "Links",
    "Which of reaches in two three steps",
    "Let me try",
    "is not",
    "so yes",
    "so no",
    "The answer is \\boxed",
    "user assistant system",
)


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def task_words() -> list[str]:
    """Pre-tokens (in the byte-level alphabet) that become single tokens, in a fixed order.

    Every pre-token of the fixed texts with two letters or more, without its leading space and,
    if it starts with a lowercase letter, also with one; and the paragraph break.
    """
    pre = _pre_tokenizer()
    texts = (*TASK_PHRASES, *CUES, TERMINATION_TEXT, ANSWER_LEAD_IN)
    words: dict[str, None] = {}
    space = pre.pre_tokenize_str(" ")[0][0]
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            bare = piece[1:] if piece.startswith(space) else piece
            if len(bare) < 2 or not (bare.isascii() and bare.isalpha()):
                continue
            words.setdefault(bare, None)
            if bare[0].islower():
                words.setdefault(space + bare, None)
    words.setdefault(pre.pre_tokenize_str(PARAGRAPH_SEP)[0][0], None)
    return list(words)


def _bpe(piece: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one pre-token (symbols are characters of the byte-level alphabet)."""
    parts = list(piece)
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_tiny_tokenizer():
    """Build the tokenizer from code; returns a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for token in SPECIAL_TOKENS:
        add(token)
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c)):
        add(symbol)
    # Merges that build each word from the pieces the earlier merges leave, at the lowest
    # priority: the words added before keep their tokenization.
    merges: list[tuple[str, str]] = []
    for word in task_words():
        parts = _bpe(word, {m: r for r, m in enumerate(merges)})
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            add(parts[0])

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def load_tiny_tokenizer(path: str | Path | None = None):
    """The shipped tiny tokenizer (``mrt_fast/data/assets/tiny``), or the one saved at ``path``.

    Loads ``tokenizer.json`` as it is. ``AutoTokenizer`` on the same directory returns a
    ``Qwen2Tokenizer`` (the model's ``config.json`` says qwen2) that gives the same ids.
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
