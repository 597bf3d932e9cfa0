"""The embedded task, the tiny tokenizer and the chat template."""

import random

import pytest

from mrt_fast.data import (
    CUES,
    PARAGRAPH_SEP,
    TERMINATION_TEXT,
    THINK_END,
    THINK_START,
    build_tiny_tokenizer,
    generate_problems,
    grade,
    load_tiny_tokenizer,
    sft_trace,
    tiny_model_config,
)
from mrt_fast.data.synthetic import (
    DEFAULT_DIFFICULTY,
    GRADER_KIND,
    MAX_DIFFICULTY,
    RECHECK_CUE,
    TraceStyle,
    iter_problems,
    key_value,
    read_attempts,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


# ---- problems --------------------------------------------------------------------------------


def test_problems_are_deterministic_per_seed_and_prefix_stable():
    a = generate_problems(20, seed=3)
    assert a == generate_problems(20, seed=3)
    assert a[:5] == generate_problems(5, seed=3)  # problem i does not depend on n
    assert a != generate_problems(20, seed=4)
    assert generate_problems(20, seed=3, difficulty=4) != generate_problems(20, seed=3, difficulty=5)


@pytest.mark.parametrize("difficulty", [2, DEFAULT_DIFFICULTY, 11, MAX_DIFFICULTY])
def test_problem_structure_and_difficulty_knob(difficulty):
    for p in generate_problems(50, seed=1, difficulty=difficulty):
        keys, values, target = p.meta["keys"], p.meta["values"], p.meta["target"]
        assert len(keys) == len(set(keys)) == difficulty
        assert [k for k in keys if values[k] == target] == [p.answer]  # exactly one solution
        assert p.prompt == f"Find the key whose value is {target}.\nKeys: {', '.join(keys)}."
        assert all(values[k] == key_value(k) for k in keys)


def test_key_value_is_the_last_digit_of_the_alphabet_position():
    assert [key_value(k) for k in "bjkstz"] == [2, 0, 1, 9, 0, 6]
    assert MAX_DIFFICULTY == 20  # c, m, w share 3: target 3 leaves 19 other keys
    with pytest.raises(ValueError, match="key must be one of"):
        key_value("a")


def test_problem_bad_input():
    with pytest.raises(ValueError, match="difficulty"):
        generate_problems(1, seed=0, difficulty=1)
    with pytest.raises(ValueError, match="difficulty"):
        generate_problems(1, seed=0, difficulty=MAX_DIFFICULTY + 1)
    with pytest.raises(TypeError, match="difficulty"):
        generate_problems(1, seed=0, difficulty=3.0)
    with pytest.raises(ValueError, match="n must"):
        generate_problems(-1, seed=0)
    with pytest.raises(TypeError, match="seed"):
        next(iter_problems(seed="0"))
    with pytest.raises(ValueError, match="give_up_prob"):
        TraceStyle(give_up_prob=1.0)


# ---- traces ----------------------------------------------------------------------------------


def _thinking(trace):
    assert trace.startswith(THINK_START + "\n")
    assert trace.count(THINK_END) == 1
    return trace[len(THINK_START) + 1 : trace.index(THINK_END)]


def test_trace_format_r1_style():
    rng = random.Random(0)
    problems = generate_problems(200, seed=0)
    traces = [sft_trace(p, rng) for p in problems]
    for p, trace in zip(problems, traces):
        thinking = _thinking(trace)
        paragraphs = thinking.rstrip("\n").split(PARAGRAPH_SEP)
        # Every paragraph after the first attempt's opening that starts an attempt starts with a cue.
        for par in paragraphs[1:]:
            if " try " in par or "double-check" in par:
                assert par.startswith(CUES), par
        assert trace.split(THINK_END)[1].startswith("\n\nThe answer is \\boxed{")
        attempts = read_attempts(p, thinking)
        # Three paragraphs per attempt (the episode splitter keeps >= 3 per episode).
        assert sum(1 for par in paragraphs if par[:1].isupper() and ("try" in par or "check" in par)) == len(attempts)
        if any(a.found for a in attempts):
            assert grade(trace, p.answer, kind=GRADER_KIND)
        else:
            assert TERMINATION_TEXT in trace  # gave up: the authors' termination text, then a guess
            guess = trace.rsplit("{", 1)[1].split("}")[0]
            assert guess in p.meta["keys"] and guess not in {a.key for a in attempts}
    # The mixture has what RL needs: successes, failures, re-checks, all cues.
    correct = sum(grade(t, p.answer, kind=GRADER_KIND) for t, p in zip(traces, problems))
    assert 0.3 < correct / len(traces) < 0.8
    text = "".join(traces)
    assert RECHECK_CUE in text
    for cue in CUES:
        assert f"\n\n{cue}" in text, cue


def test_traces_are_deterministic_per_rng():
    p = generate_problems(10, seed=0)
    assert [sft_trace(q, random.Random(5)) for q in p] == [sft_trace(q, random.Random(5)) for q in p]


def test_read_attempts_marks_productive_and_redundant_episodes():
    p = generate_problems(1, seed=0, difficulty=4)[0]
    keys, values, target = p.meta["keys"], p.meta["values"], p.meta["target"]
    wrong = [k for k in keys if k != p.answer]
    thinking = (
        f"Let me try {wrong[0]}.\n\n{wrong[0]}{values[wrong[0]]}.\n\n{values[wrong[0]]} is not {target}, so no."
        f"\n\nBut let me double-check {wrong[0]}.\n\n{wrong[0]}{values[wrong[0]]}.\n\n"
        f"{values[wrong[0]]} is not {target}, so no.\n\nWait, try {p.answer}.\n\n{p.answer}{target}.\n\n"
        f"{target} is {target}, so yes.\n\nWait, try {wrong[1]}.\n\n{wrong[1]}"
    )
    attempts = read_attempts(p, thinking)
    assert [a.key for a in attempts] == [wrong[0], wrong[0], p.answer, wrong[1]]
    assert [a.productive for a in attempts] == [True, False, True, True]
    assert [a.found for a in attempts] == [False, False, True, False]
    assert thinking[: attempts[0].end].endswith("so no.")
    assert thinking[: attempts[2].end].endswith("so yes.")
    assert attempts[3].end == len(thinking)  # cut short: ends at the end of the text


# ---- tokenizer and chat template --------------------------------------------------------------


def test_tokenizer_round_trip_and_offsets(tokenizer):
    rng = random.Random(1)
    texts = [sft_trace(p, rng) for p in generate_problems(20, seed=2)]
    texts += [TERMINATION_TEXT, "héllo wörld 😀 \t tabs\n\n\nand $\\frac{1}{2}$", ""]
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert tokenizer.decode(enc["input_ids"]) == text
        ends = [e for _, e in enc["offset_mapping"]]
        assert ends == sorted(ends) and (not text or ends[-1] == len(text))
        for (s, e), tid in zip(enc["offset_mapping"], enc["input_ids"]):
            piece = tokenizer.convert_ids_to_tokens(tid)
            if not piece.startswith("<0x"):  # byte-fallback pieces share their character's span
                assert text[s:e] == piece


def test_tokenizer_keeps_facts_as_single_tokens(tokenizer):
    tokens = tokenizer.tokenize("<think>\nWait, try k.\n\nk=7.\n</think>")
    assert tokens == ["<think>", "\n", "Wait", ",", " try", " ", "k", ".", "\n\n", "k", "=", "7", ".", "\n", "</think>"]
    assert tokenizer.tokenize("Alternatively") == ["Alternatively"]
    assert len(tokenizer.tokenize("Is there another way to think about this?")) == 9
    assert tokenizer.tokenize("Wa hello") == ["W", "a", " ", "h", "e", "l", "l", "o"]  # unknown: characters


def test_chat_template(tokenizer):
    p = generate_problems(1, seed=0)[0]
    messages = [{"role": "user", "content": p.prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>user\n{p.prompt}<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<|im_start|>"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_load_tokenizer_keeps_the_tiny_tokenizer_next_to_a_qwen2_config(tokenizer):
    from mrt_fast.data import load_tokenizer
    from mrt_fast.data.tokenizer import ASSETS_DIR

    assert (ASSETS_DIR / "config.json").is_file()  # the case where AutoTokenizer goes wrong
    text = "<think>\nLet me try k.\n\nk7.\n</think>"
    assert load_tokenizer(ASSETS_DIR)(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_shipped_tokenizer_matches_the_code(tokenizer):
    shipped = load_tiny_tokenizer()
    assert shipped.get_vocab() == tokenizer.get_vocab()
    text = sft_trace(generate_problems(1, seed=9)[0], random.Random(0))
    assert shipped(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert shipped.chat_template == tokenizer.chat_template


def test_tiny_model_config_is_small_and_matches_tokenizer(tokenizer):
    from transformers import AutoModelForCausalLM

    config = tiny_model_config()
    assert config.model_type == "qwen2" and config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
