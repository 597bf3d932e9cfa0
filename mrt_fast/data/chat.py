"""R1-style text conventions shared by every part of mrt-fast.

The thinking part of an assistant turn sits between ``THINK_START`` and ``THINK_END``; the
final answer follows. Episodes are cut at paragraphs that start with one of ``CUES``
(the MRT authors' cues, docs/mrt.md). ``TERMINATION_TEXT`` is what the meta-prover appends to force the model to stop
thinking (the MRT authors' default); it is not the model's text, so it is masked out of losses.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"
PARAGRAPH_SEP = "\n\n"

# The exploration cues of the MRT authors' analysis code, in their order. A paragraph starting with one
# of them may start a new episode.
CUES: tuple[str, ...] = (
    "Wait",
    "But wait",
    "Alternatively",
    "Is there another way to think about this?",
    "But let me double-check",
    "But hold on",
)

TERMINATION_TEXT = (
    "Time is up.\n\nGiven the time I've spent and the approaches I've tried, I should stop "
    "thinking and formulate a final answer based on what I already have.\n</think>\n\n"
)
# Optional lead-in some setups append after TERMINATION_TEXT for math answers.
ANSWER_LEAD_IN = "**Step-by-Step Explanation and Answer:**\n\n1. **"

# Qwen-style chat template. The generation prompt opens the assistant turn; the model itself
# writes "<think>\n" first (every warm-start trace starts that way).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


def chat_prompt_text(user_content: str) -> str:
    """The text ``CHAT_TEMPLATE`` renders for one user turn plus the generation prompt."""
    if not isinstance(user_content, str):
        raise TypeError(f"user_content must be a str, got {type(user_content).__name__}")
    return f"{IM_START}user\n{user_content}{IM_END}\n{IM_START}assistant\n"
