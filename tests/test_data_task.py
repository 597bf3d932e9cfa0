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
    chat_prompt_text,
    extract_boxed,
    generate_problems,
    grade,
    load_tiny_tokenizer,
    sft_trace,
    tiny_model_config,
)
from mrt_fast.data.synthetic import (
    CHAIN_LINKS,
    DEFAULT_DIFFICULTY,
    GRADER_KIND,
    MAX_DIFFICULTY,
    RECHECK_CUE,
    TASKS,
    TraceStyle,
    chain_end,
    iter_problems,
    key_value,
    lookups,
    read_attempts,
    untried_text,
)
from mrt_fast.mrt.episodes import response_episodes, split_episodes


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


# ---- problems --------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_problems_are_deterministic_per_seed_and_prefix_stable(task):
    a = generate_problems(20, seed=3, task=task)
    assert a == generate_problems(20, seed=3, task=task)
    assert a[:5] == generate_problems(5, seed=3, task=task)  # problem i does not depend on n
    assert a != generate_problems(20, seed=4, task=task)
    assert generate_problems(20, seed=3, difficulty=4, task=task) != generate_problems(20, seed=3, difficulty=5, task=task)


def test_the_default_task_is_the_chain_search():
    assert generate_problems(3, seed=0) == generate_problems(3, seed=0, task="chain")


@pytest.mark.parametrize("difficulty", [2, DEFAULT_DIFFICULTY, 11, MAX_DIFFICULTY["chain"]])
def test_chain_problem_structure_and_difficulty_knob(difficulty):
    for p in generate_problems(50, seed=1, difficulty=difficulty):
        keys, links, target, hops = p.meta["keys"], p.meta["links"], p.meta["target"], p.meta["hops"]
        assert len(keys) == len(set(keys)) == difficulty and hops in (2, 3)
        # Exactly one key reaches the target in `hops` steps, following the listed links.
        assert [k for k in keys if chain_end(links, k, hops) == target] == [p.answer]
        assert target not in keys and target.isdigit() and len(target) == 1
        # The target is the only node named by a digit; every other node is a capital.
        assert all(c == target or c.isupper() for link in links.items() for c in link)
        listed = ", ".join(f"{a}{b}" for a, b in links.items())
        words = {2: "two", 3: "three"}[hops]
        assert p.prompt == f"Links: {listed}.\nWhich of {', '.join(keys)} reaches {target} in {words} steps?"
        assert len(links) >= CHAIN_LINKS


def test_chain_maps_are_not_one_to_one_and_do_not_point_at_the_answer():
    problems = generate_problems(400, seed=2)
    merged = sum(len(set(p.meta["links"].values())) < len(p.meta["links"]) for p in problems)
    assert merged > 0.9 * len(problems)  # several letters go to the same letter
    assert all(len(p.meta["links"]) >= 14 for p in problems)
    # The target is often reached by more than one link: its in-links do not single out the path.
    several = sum(sum(b == p.meta["target"] for b in p.meta["links"].values()) > 1 for p in problems)
    assert several > 0.2 * len(problems)
    # The answer's place in the key list is uniform (no positional shortcut).
    places = [p.meta["keys"].index(p.answer) for p in problems]
    assert all(40 < places.count(i) < 95 for i in range(DEFAULT_DIFFICULTY))


@pytest.mark.parametrize("difficulty", [2, DEFAULT_DIFFICULTY, 11, MAX_DIFFICULTY["recall"]])
def test_recall_problem_structure_and_difficulty_knob(difficulty):
    for p in generate_problems(50, seed=1, difficulty=difficulty, task="recall"):
        keys, values, target = p.meta["keys"], p.meta["values"], p.meta["target"]
        assert len(keys) == len(set(keys)) == difficulty
        assert [k for k in keys if values[k] == target] == [p.answer]  # exactly one solution
        assert p.prompt == f"Find the key whose value is {target}.\nKeys: {', '.join(keys)}."
        assert all(values[k] == key_value(k) for k in keys)


def test_key_value_is_the_last_digit_of_the_alphabet_position():
    assert [key_value(k) for k in "bjkstz"] == [2, 0, 1, 9, 0, 6]
    assert MAX_DIFFICULTY["recall"] == 20  # c, m, w share 3: target 3 leaves 19 other keys
    with pytest.raises(ValueError, match="key must be one of"):
        key_value("a")


def test_problem_bad_input():
    with pytest.raises(ValueError, match="difficulty"):
        generate_problems(1, seed=0, difficulty=1)
    with pytest.raises(ValueError, match="difficulty"):
        generate_problems(1, seed=0, difficulty=MAX_DIFFICULTY["chain"] + 1)
    with pytest.raises(TypeError, match="difficulty"):
        generate_problems(1, seed=0, difficulty=3.0)
    with pytest.raises(ValueError, match="n must"):
        generate_problems(-1, seed=0)
    with pytest.raises(TypeError, match="seed"):
        next(iter_problems(seed="0"))
    with pytest.raises(ValueError, match="task must be one of"):
        generate_problems(1, seed=0, task="sums")
    with pytest.raises(ValueError, match="give_up_prob"):
        TraceStyle(give_up_prob=1.0)


# ---- traces ----------------------------------------------------------------------------------


def _thinking(trace):
    assert trace.startswith(THINK_START + "\n")
    assert trace.count(THINK_END) == 1
    return trace[len(THINK_START) + 1 : trace.index(THINK_END)]


@pytest.mark.parametrize("task", TASKS)
def test_trace_format_r1_style(task):
    rng = random.Random(0)
    problems = generate_problems(200, seed=0, task=task)
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
        assert all(a.complete for a in attempts)
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


def test_chain_attempt_follows_the_links_one_paragraph_per_step():
    p = generate_problems(1, seed=0)[0]
    links, target, hops = p.meta["links"], p.meta["target"], p.meta["hops"]
    trace = sft_trace(p, random.Random(1))
    thinking = _thinking(trace)
    for attempt in read_attempts(p, thinking):
        opening_end = thinking.rfind("try", 0, attempt.end)
        body = thinking[thinking.index(PARAGRAPH_SEP, opening_end) + 2 : attempt.end].split(PARAGRAPH_SEP)
        node = attempt.key
        for step in body[:-1]:
            assert step == f"{node}{links[node]}."
            node = links[node]
        assert len(body) == hops + 1
        assert body[-1] == (f"{node} is {target}, so yes." if node == target else f"{node} is not {target}, so no.")
        assert (node == target) == attempt.found


@pytest.mark.parametrize("task", TASKS)
def test_the_default_splitter_cuts_one_episode_per_attempt(task):
    rng = random.Random(3)
    for p in generate_problems(200, seed=5, task=task):
        trace = sft_trace(p, rng)
        thinking = _thinking(trace)
        attempts = read_attempts(p, thinking)
        episodes = split_episodes(thinking)
        if not attempts:  # gave up before any attempt: one (empty) episode
            assert episodes == [(0, len(thinking))]
            continue
        assert len(episodes) == len(attempts)
        # Each episode ends right after one attempt's verdict (plus the paragraph break); the last
        # one also holds the termination text of a trace that gives up.
        ends = [end for _, end in episodes]
        assert [thinking[:e].rstrip("\n") for e in ends[:-1]] == [thinking[: a.end] for a in attempts[:-1]]
        assert ends[-1] == len(thinking)
        assert len(response_episodes(trace)) == len(attempts)


def test_listed_traces_try_the_first_untried_key_and_write_the_rest():
    """``TraceStyle(list_untried=True)``: every failed attempt is followed by the keys not tried
    yet, in the question's order; the next new attempt tries the first of them; a give-up guesses
    among them; and the attempts read back as in the default format."""
    rng = random.Random(3)
    style = TraceStyle(list_untried=True)
    gave_up = found = 0
    for problem in generate_problems(300, seed=5):
        keys, trace = problem.meta["keys"], sft_trace(problem, rng, style)
        thinking = trace[len(THINK_START) + 1:].split(TERMINATION_TEXT)[0].split("\n" + THINK_END)[0]
        tried, untried = [], list(keys)
        paragraphs = thinking.split("\n\n") if thinking else []
        for attempt in read_attempts(problem, thinking):
            if attempt.productive:
                assert attempt.key == untried[0]  # the first key of the last list (or of the question)
                tried.append(attempt.key)
                untried.remove(attempt.key)
            else:
                assert attempt.key in tried  # a re-check
            if attempt.key != problem.answer:
                after = thinking[attempt.end:].lstrip("\n").split("\n")[0]
                assert after == untried_text(problem, tried) == "Keys not tried: " + ", ".join(untried) + "."
        assert sum(p.startswith("Keys not tried:") for p in paragraphs) == sum(
            a.key != problem.answer for a in read_attempts(problem, thinking))
        if TERMINATION_TEXT in trace and problem.answer not in tried:
            gave_up += 1
            assert extract_boxed(trace) in untried
        found += problem.answer in tried
    assert gave_up > 50 and found > 100
    # The default format is unchanged: no lists, keys in a random order.
    default = [sft_trace(p, random.Random(0)) for p in generate_problems(50, seed=5)]
    assert not any("Keys not tried" in t for t in default)


def test_lookups_are_the_steps_of_the_traces():
    p = generate_problems(1, seed=4)[0]
    assert sorted(lookups(p)) == sorted((a, b) for a, b in p.meta["links"].items())
    q = generate_problems(1, seed=4, task="recall")[0]
    assert sorted(lookups(q)) == sorted((k, str(key_value(k))) for k in q.meta["keys"])


@pytest.mark.parametrize("task", TASKS)
def test_traces_are_deterministic_per_rng(task):
    p = generate_problems(10, seed=0, task=task)
    assert [sft_trace(q, random.Random(5)) for q in p] == [sft_trace(q, random.Random(5)) for q in p]


def test_read_attempts_marks_productive_and_redundant_episodes():
    p = generate_problems(1, seed=0, difficulty=4)[0]
    keys, links, target, hops = p.meta["keys"], p.meta["links"], p.meta["target"], p.meta["hops"]
    wrong = [k for k in keys if k != p.answer]

    def attempt(opening, key):
        steps, node = [], key
        for _ in range(hops):
            steps.append(f"{node} {links[node]}.")
            node = links[node]
        verdict = f"{node} is {target}, so yes." if node == target else f"{node} is not {target}, so no."
        return PARAGRAPH_SEP.join([f"{opening} {key}.", *steps, verdict])

    thinking = PARAGRAPH_SEP.join([
        attempt("Let me try", wrong[0]), attempt("But let me double-check", wrong[0]),
        attempt("Wait, try", p.answer), f"Wait, try {wrong[1]}.\n\n{wrong[1]} {links[wrong[1]]}.",
    ])
    attempts = read_attempts(p, thinking)
    assert [a.key for a in attempts] == [wrong[0], wrong[0], p.answer, wrong[1]]
    assert [a.productive for a in attempts] == [True, False, True, True]
    assert [a.found for a in attempts] == [False, False, True, False]
    assert [a.complete for a in attempts] == [True, True, True, False]
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
        if text.isascii():  # one byte per character: every token's span is its text
            for (s, e), tid in zip(enc["offset_mapping"], enc["input_ids"]):
                assert text[s:e] == tokenizer.decode([tid])


def test_tokenizer_keeps_facts_as_single_tokens(tokenizer):
    pieces = [tokenizer.decode([i]) for i in tokenizer("<think>\nWait, try K.\n\nKQ.\n</think>")["input_ids"]]
    assert pieces == ["<think>", "\n", "Wait", ",", " try", " ", "K", ".", "\n\n", "K", "Q", ".", "\n", "</think>"]
    assert len(tokenizer.tokenize("Alternatively")) == 1
    assert len(tokenizer.tokenize("Is there another way to think about this?")) == 9
    prompt = [tokenizer.decode([i]) for i in tokenizer("Links: BK, E7.\nWhich of B, E reaches 7 in two steps?")["input_ids"]]
    assert prompt == ["Links", ":", " ", "B", "K", ",", " ", "E", "7", ".", "\n", "Which", " of", " ", "B", ",", " ",
                      "E", " reaches", " ", "7", " in", " two", " steps", "?"]
    verdicts = [tokenizer.decode([i]) for i in tokenizer("S is not 7, so no.\n\n7 is 7, so yes.")["input_ids"]]
    assert verdicts == ["S", " is", " not", " ", "7", ",", " so", " no", ".", "\n\n",
                        "7", " is", " ", "7", ",", " so", " yes", "."]
    assert len(tokenizer.tokenize(" hello")) == 6  # not a task word: characters
    # No merge joins a space and a single letter: a key is the same token wherever it stands.
    assert [tokenizer.decode([i]) for i in tokenizer(" a b I")["input_ids"]] == [" ", "a", " ", "b", " ", "I"]


def test_every_link_is_two_tokens_wherever_it_is_written(tokenizer):
    """No merge joins two capitals or a space and a capital: the prompt's ``, EQ`` and a step's
    ``EQ.`` give the model the same two tokens for every pair of the chain task's nodes (the
    letters and the target digits)."""
    from mrt_fast.data.synthetic import CHAIN_ALPHABET, CHAIN_GOALS

    def pieces(text):
        return [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]

    nodes = CHAIN_ALPHABET + CHAIN_GOALS
    for a in nodes:
        for b in nodes:
            assert pieces(f"Links: {a}{b}, {a}{b}.")[2:] == [" ", a, b, ",", " ", a, b, "."]
            assert pieces(f"\n\n{a}{b}.") == ["\n\n", a, b, "."]
        assert pieces(f"Let me try {a}.")[-3:] == [" ", a, "."]
        assert pieces(f"{{{a}}}") == ["{", a, "}"]


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

    assert (ASSETS_DIR / "config.json").is_file()
    text = "<think>\nLet me try K.\n\nKQ.\n</think>"
    assert load_tokenizer(ASSETS_DIR)(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_shipped_tokenizer_matches_the_code(tokenizer):
    shipped = load_tiny_tokenizer()
    assert shipped.get_vocab() == tokenizer.get_vocab()
    text = sft_trace(generate_problems(1, seed=9)[0], random.Random(0))
    assert shipped(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert shipped.chat_template == tokenizer.chat_template


def _assert_same_tokenization(loaded, tokenizer):
    rng = random.Random(2)
    texts = [chat_prompt_text(p.prompt) + sft_trace(p, rng) + "<|im_end|>" for p in generate_problems(8, seed=6)]
    texts += [chat_prompt_text(p.prompt) for p in generate_problems(4, seed=6, task="recall")]
    texts += [TERMINATION_TEXT, "héllo wörld 😀 \t tabs\n\n\nand $\\frac{1}{2}$"]
    for text in texts:
        assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    messages = [{"role": "user", "content": "q"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_auto_tokenizer_on_the_shipped_model_gives_the_same_ids(tokenizer):
    """transformers' AutoTokenizer loads a qwen2 directory as Qwen2Tokenizer: the tiny tokenizer is built
    in that format, so plain AutoTokenizer gives the ids the model was trained with."""
    from transformers import AutoTokenizer

    from mrt_fast.data.tokenizer import ASSETS_DIR

    _assert_same_tokenization(AutoTokenizer.from_pretrained(str(ASSETS_DIR)), tokenizer)


def test_auto_tokenizer_on_an_hf_export_gives_the_same_ids(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mrt_fast.checkpoint import export_hf

    config = tiny_model_config(len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    export_hf(tmp_path, model.state_dict(), model, tokenizer=tokenizer)
    assert (tmp_path / "config.json").is_file()
    _assert_same_tokenization(AutoTokenizer.from_pretrained(str(tmp_path)), tokenizer)


def test_tiny_model_config_is_small_and_matches_tokenizer(tokenizer):
    from transformers import AutoModelForCausalLM

    config = tiny_model_config()
    assert config.model_type == "qwen2" and config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
