"""Stop strings over token streams.

A stop string can be split across several tokens ("</th" + "ink>"), so it is matched against
decoded text, never against single tokens. Decoding the whole generation at every step would be
quadratic; instead each step decodes only a tail window of tokens that is long enough to hold any
stop string ending in the newest token, and the final text is decoded once at the end.
"""

from __future__ import annotations

from typing import Any


class StopStrings:
    """Detects stop strings in a growing list of generated token ids."""

    def __init__(self, tokenizer: Any, stops: list[str], *, skip_special_tokens: bool = True):
        if tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.skip_special_tokens = skip_special_tokens
        self._longest = max(len(s) for s in self.stops)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(
            token_ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def hit(self, token_ids: list[int]) -> bool:
        """Whether a stop string appears in the text of the tail ending at the newest token.

        Called after every new token, so any occurrence that ended earlier would already have
        stopped the sample: it is enough to look at a window holding the newest token plus at
        least `longest` characters before it (one more than a stop string needs, so that a
        tokenizer which drops a leading space at the start of a decode cannot hide the first
        character). Most tokens decode to >= 1 character, so `longest + 1` tokens usually do;
        the window doubles while the text before the newest token is still too short.
        """
        window = self._longest + 1
        while window < len(token_ids) and len(self.decode(token_ids[-window:-1])) < self._longest:
            window *= 2
        text = self.decode(token_ids[-window:])
        return any(s in text for s in self.stops)

    def cut(self, text: str) -> tuple[str, str | None]:
        """Text before the earliest stop string, and which stop string it was."""
        best, which = len(text), None
        for s in self.stops:
            pos = text.find(s)
            if pos != -1 and pos < best:
                best, which = pos, s
        return text[:best], which
