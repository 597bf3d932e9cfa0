"""The tiny-model warm start: the shipped checkpoint's criteria, the drills, reproducibility, the CLI."""

import json

import pytest
import torch

from mrt_fast.data import THINK_END, extract_boxed, grade, load_warm_start
from mrt_fast.data.synthetic import GRADER_KIND, generate_problems
from mrt_fast.data.warm_start import (
    IGNORE_INDEX,
    WarmStartConfig,
    collate,
    encode_drill,
    encode_example,
    encode_guess_drill,
    main,
    sample_responses,
    sft_loss,
    train,
)

# Fresh problems: a seed used neither by training (0) nor by the warm start's own evaluation.
BAND_SEED = 777
MICRO_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2)


N_PROBLEMS = 48
MAX_NEW_TOKENS = 384  # warm-start traces are at most ~300 tokens long


@pytest.fixture(scope="module")
def shipped_samples():
    """One T=1 sample per fresh problem from the shipped checkpoint (shared by the tests below)."""
    torch.set_num_threads(2)
    model, tokenizer = load_warm_start()
    problems = generate_problems(N_PROBLEMS, seed=BAND_SEED)
    responses = sample_responses(model, tokenizer, [p.prompt for p in problems], temperature=1.0,
                                 seed=0, max_new_tokens=MAX_NEW_TOKENS)
    return problems, responses


@pytest.mark.slow  # the shared sampling fixture: ~40 s on 2 idle cores
def test_shipped_checkpoint_answers_within_the_band(shipped_samples):
    """RL headroom both ways: pass@1 at T=1 is 30-60% on 128 problems (docs/data.md); on these 48 the
    band is widened by two standard errors (about 0.07)."""
    problems, responses = shipped_samples
    accuracy = sum(grade(r, p.answer, kind=GRADER_KIND) for p, r in zip(problems, responses)) / len(problems)
    assert 0.2 <= accuracy <= 0.7, accuracy


@pytest.mark.slow
def test_shipped_checkpoint_reads_links_from_the_prompt():
    from mrt_fast.data.task_probe import hop_accuracy

    torch.set_num_threads(2)
    model, tokenizer = load_warm_start()
    assert hop_accuracy(model, tokenizer, generate_problems(32, seed=BAND_SEED)) >= 0.9


@pytest.mark.slow
def test_shipped_checkpoint_has_learned_the_trace_format(shipped_samples):
    """What the shipped warm start does reliably: R1-style traces that end in a gradeable answer."""
    problems, responses = shipped_samples
    closed = [r for r in responses if r.startswith("<think>\n") and THINK_END in r and extract_boxed(r)]
    assert len(closed) >= 0.8 * len(responses), len(closed)


def test_encode_example_masks_the_prompt_and_matches_joint_tokenisation():
    from mrt_fast.data import build_tiny_tokenizer, chat_prompt_text

    tok = build_tiny_tokenizer()
    ids, labels = encode_example(tok, "Find it.", "<think>\nok\n</think>\n\nThe answer is \\boxed{k}.")
    joint = tok(chat_prompt_text("Find it.") + "<think>\nok\n</think>\n\nThe answer is \\boxed{k}.<|im_end|>",
                add_special_tokens=False)["input_ids"]
    assert ids == joint
    n_prompt = len(tok(chat_prompt_text("Find it."), add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id


def test_drill_labels_only_the_looked_up_letters():
    import random

    from mrt_fast.data import build_tiny_tokenizer, chat_prompt_text
    from mrt_fast.data.synthetic import shorter_map

    tok = build_tiny_tokenizer()
    problem = generate_problems(1, seed=3)[0]
    ids, labels = encode_drill(tok, problem, random.Random(0), 12)
    text = tok.decode(ids)
    assert text.startswith(chat_prompt_text(problem.prompt) + "<think>\n")
    steps = text.split("<think>\n")[1].split("\n\n")
    assert len(steps) == 12
    links = problem.meta["links"]
    assert all(step == f"{step[0]}{links[step[0]]}." for step in steps)
    assert [tok.decode([t]) for t in labels if t != IGNORE_INDEX] == [step[1] for step in steps]
    # A shorter map lists fewer links, and its drills look up only those.
    small = shorter_map(problem, 3)
    assert small.prompt.count(",") == problem.prompt.count(",") - (len(links) - 3)
    ids, labels = encode_drill(tok, small, random.Random(1), 20)
    assert {s[0] for s in tok.decode(ids).split("<think>\n")[1].split("\n\n")} <= set(list(links)[:3])


def test_drills_with_verdicts_label_the_fact_and_the_whole_verdict():
    import random

    from mrt_fast.data import build_tiny_tokenizer
    from mrt_fast.data.synthetic import verdict

    tok = build_tiny_tokenizer()
    problem = generate_problems(1, seed=5)[0]
    target, links = problem.meta["target"], problem.meta["links"]
    ids, labels = encode_drill(tok, problem, random.Random(2), 30, verdict_share=0.5)
    paragraphs = tok.decode(ids).split("<think>\n")[1].split("\n\n")
    expected, verdicts = [], 0
    for i, paragraph in enumerate(paragraphs):
        if " so " in paragraph:  # a verdict closes the lookup just before it
            reached = paragraphs[i - 1][1]
            assert paragraph == verdict(reached, target)
            expected += [tok.decode([t]) for t in tok(paragraph)["input_ids"]]
            verdicts += 1
        else:
            assert paragraph == f"{paragraph[0]}{links[paragraph[0]]}."
            expected.append(paragraph[1])
    assert 5 <= verdicts <= 25 and any(p == verdict(target, target) for p in paragraphs)
    assert [tok.decode([t]) for t in labels if t != IGNORE_INDEX] == expected


def test_guess_drills_label_one_guess_among_the_keys_not_tried():
    import random
    from collections import Counter

    from mrt_fast.data import TERMINATION_TEXT, build_tiny_tokenizer, chat_prompt_text
    from mrt_fast.data.synthetic import answer_text, read_attempts

    tok = build_tiny_tokenizer()
    rng = random.Random(4)
    tried_counts, guessed_answer = Counter(), 0
    for problem in generate_problems(200, seed=9):
        ids, labels = encode_guess_drill(tok, problem, rng)
        text = tok.decode(ids)
        assert ids == tok(text, add_special_tokens=False)["input_ids"]  # the same ids as the whole text
        prompt = chat_prompt_text(problem.prompt) + "<think>\n"
        thinking, answer = text[len(prompt):].split(TERMINATION_TEXT)
        attempts = read_attempts(problem, thinking.rstrip("\n"))
        assert all(a.complete and a.key != problem.answer for a in attempts)
        tried = {a.key for a in attempts}
        guess = [tok.decode([t]) for t in labels if t != IGNORE_INDEX]
        assert len(guess) == 1 and guess[0] in problem.meta["keys"] and guess[0] not in tried
        assert answer == answer_text(guess[0]) + "<|im_end|>"
        tried_counts[len(tried)] += 1
        guessed_answer += guess[0] == problem.answer
    assert set(tried_counts) == set(range(6))  # from no attempt up to every wrong key
    assert 0.2 < guessed_answer / 200 < 0.6  # 1/(6 - c) on average over c


def test_sft_loss_matches_a_per_example_fp64_reference():
    from transformers import AutoModelForCausalLM

    from mrt_fast.data import build_tiny_tokenizer, tiny_model_config

    tok = build_tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_model_config(len(tok), **MICRO_MODEL)).double()
    examples = [encode_example(tok, "Find it.", "<think>\nno\n</think>"), encode_example(tok, "Go", "yes")]
    loss = sft_loss(model, collate(examples, tok.pad_token_id))
    total, count = 0.0, 0
    for ids, labels in examples:
        logits = model(torch.tensor([ids])).logits[0, :-1]
        target = torch.tensor(labels[1:])
        keep = target != IGNORE_INDEX
        total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        count += int(keep.sum())
    torch.testing.assert_close(loss, total / count)


def test_warm_start_is_reproducible_and_the_cli_writes_a_loadable_checkpoint(tmp_path):
    cfg = WarmStartConfig(drill_steps=2, drill_batch_size=3, steps=3, batch_size=4, model_overrides=MICRO_MODEL,
                          eval_problems=0)
    first, _, history = train(cfg, log=lambda *_: None)
    second, _, _ = train(cfg, log=lambda *_: None)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["phase"] for h in history] == ["drills"] * 2 + ["traces"] * 3 and all(h["loss"] > 0 for h in history)

    report = main(["--out", str(tmp_path), "--drill-steps", "2", "--drill-batch-size", "2", "--steps", "2",
                   "--batch-size", "2", "--eval-problems", "4", "--max-new-tokens", "8",
                   "--model-overrides", json.dumps(MICRO_MODEL)])
    model, tok = load_warm_start(path=tmp_path)
    written = json.loads((tmp_path / "warm_start.json").read_text())
    assert written["config"]["steps"] == 2 and written["config"]["task"] == "chain"
    assert 0.0 <= report["accuracy_t1"] <= 1.0 and 0.0 <= report["hop_accuracy"] <= 1.0
    assert report["wall_seconds"] >= report["train_seconds"] > 0
    assert model.config.vocab_size == len(tok)


def test_load_warm_start_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="warm_start"):
        load_warm_start(path=tmp_path)


@pytest.mark.slow  # samples traces and forced answers from the shipped model (~40 s on busy cores)
def test_task_probe_measures_j_at_every_attempt_boundary():
    from mrt_fast.data.task_probe import measure_progress

    torch.set_num_threads(2)
    model, tokenizer = load_warm_start()
    table = measure_progress(model, tokenizer, n_problems=3, k=2, max_new_tokens=160)
    assert table.j_by_productive[0][1] >= 3  # the empty prefix of every problem, at least
    assert all(0.0 <= j <= 1.0 and n > 0 for j, n in table.j_by_productive.values())
    boundaries = sum(n for _, n in table.j_by_productive.values())
    assert boundaries == 3 + table.n_productive + table.n_redundant  # one per attempt + empty prefixes
    assert "| productive attempts completed |" in table.markdown()


@pytest.mark.slow  # forced answers from the shipped model on scripted prefixes (~20 s)
def test_shipped_checkpoint_answers_the_found_key_when_forced_and_ignores_rechecks():
    """Progress is real: forced to answer right after the attempt that found the key, the model
    names it; a re-check of the last attempt leaves J where it was (docs/data.md)."""
    from mrt_fast.data.task_probe import scripted_progress

    torch.set_num_threads(2)
    model, tokenizer = load_warm_start()
    result = scripted_progress(model, tokenizer, n_problems=12, k=4, seed=BAND_SEED)
    assert result.j_found >= 0.9, result.markdown()
    assert abs(result.delta_recheck) <= 0.1, result.markdown()
    expected = result.j_by_productive()
    assert expected[3] > expected[0] + 0.2, result.markdown()  # finding the key is what raises J


def test_task_probe_only_progress_writes_both_progress_tables(tmp_path):
    """``--only-progress``: the J tables alone, as the experiment measures them over training."""
    from transformers import AutoModelForCausalLM

    from mrt_fast.data import build_tiny_tokenizer, tiny_model_config
    from mrt_fast.data.task_probe import main as probe

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    AutoModelForCausalLM.from_config(tiny_model_config(len(tok), **MICRO_MODEL)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "progress.json"
    probe(["--model", str(tmp_path / "m"), "--only-progress", "--problems", "2", "--k", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    assert set(results) == {"progress", "scripted_progress", "problems", "k"}
    assert results["progress"]["j_by_last"]["0,productive"][1] == 2  # the empty prefix of both problems
    assert 0.0 <= results["scripted_progress"]["j_found"] <= 1.0
    with pytest.raises(SystemExit):
        probe(["--model", str(tmp_path / "m"), "--only-progress", "--only-direct"])


def test_direct_answer_probe_fine_tunes_a_copy_on_answers_without_thinking():
    from transformers import AutoModelForCausalLM

    from mrt_fast.data import build_tiny_tokenizer, tiny_model_config
    from mrt_fast.data.task_probe import direct_accuracy, direct_answer_probe

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_model_config(len(tok), **MICRO_MODEL)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = direct_answer_probe(model, tok, steps=30, batch_size=8, lr=3e-3, n_eval=24, log=lambda *_: None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model itself is untouched
    assert result["direct_accuracy_before"] == direct_accuracy(model, tok, generate_problems(24, seed=result["seed"] + 1))
    assert 0.0 <= result["direct_accuracy_after"] <= 1.0 and result["chance"] == pytest.approx(1 / 6)
    assert result["final_loss"] < 0.8 * result["first_loss"]  # it trains
