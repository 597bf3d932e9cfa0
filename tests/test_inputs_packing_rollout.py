"""Bad inputs to PrefixGroup / pack / packed_logprobs and SamplingParams: a clear error naming the
argument, never a silent truncation, broadcast or truthiness."""

import dataclasses
import math

import pytest
import torch

from mrt_fast.packing import PrefixGroup, pack, packed_logprobs
from mrt_fast.rollout import SamplingParams

GROUP_ERRORS = {
    "loss mask -1": (dict(loss_masks=[[1, -1]]), ValueError, r"loss_masks\[0\]\[1\] must be 0 or 1, got -1"),
    "loss mask 2": (dict(loss_masks=[[2, 1]]), ValueError, r"loss_masks\[0\]\[0\] must be 0 or 1, got 2"),
    "loss mask NaN": (dict(loss_masks=[[1, math.nan]]), ValueError, r"loss_masks\[0\]\[1\] must be 0 or 1, got nan"),
    "loss mask strings": (dict(loss_masks=[["1", "0"]]), TypeError, r"loss_masks\[0\]\[0\] must be 0 or 1, got str"),
    "episode id 1.7": (dict(episode_ids=[[0, 1.7]]), ValueError, r"episode_ids\[0\]\[1\] must be a whole number, got 1.7"),
    "episode id 0.7": (dict(episode_ids=[[0.7, 1]]), ValueError, r"episode_ids\[0\]\[0\] must be a whole number"),
    "episode id -1": (dict(episode_ids=[[0, -1]]), ValueError, r"episode_ids\[0\]\[1\] must be in \[0, 2\*\*63\)"),
    "episode id string": (dict(episode_ids=[[0, "1"]]), TypeError, r"episode_ids\[0\]\[1\] must be an int id, got str"),
    "sequence id 1.9": (dict(sequence_ids=[1.9]), ValueError, r"sequence_ids\[0\] must be a whole number, got 1.9"),
    "sequence ids None-like": (dict(sequence_ids="7"), TypeError, "sequence_ids must be a list of ints"),
    "token id 2**63": (dict(continuations=[[5, 2**63]]), ValueError,
                       r"continuations\[0\]\[1\] = 9223372036854775808 is not a valid token id \(expected 0 <= id < 2\*\*63\)"),
    "token id a string": (dict(continuations=[[5, "6"]]), TypeError, r"continuations\[0\]\[1\] must be an int token id"),
}


@pytest.mark.parametrize("case", list(GROUP_ERRORS))
def test_prefix_group_rejects(case):
    overrides, error, message = GROUP_ERRORS[case]
    args = dict(prefix=[1, 2], continuations=[[3, 4]], **{k: v for k, v in overrides.items() if k != "continuations"})
    if "continuations" in overrides:
        args["continuations"] = overrides["continuations"]
    with pytest.raises(error, match=message):
        PrefixGroup(**args)


def test_prefix_group_accepts_exact_values_of_other_types():
    import numpy as np

    group = PrefixGroup([1], [[3, 4]], loss_masks=[[True, np.float32(0.0)]], episode_ids=[[np.int64(2), 3.0]],
                        sequence_ids=[4.0])
    assert group.loss_masks == [[1.0, 0.0]] and group.episode_ids == [[2, 3]] and group.sequence_ids == [4]
    assert all(type(v) is int for v in group.episode_ids[0] + group.sequence_ids)


def test_packed_logprobs_rejects_a_batch_whose_arrays_disagree():
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32))
    batch = pack([PrefixGroup([1, 2], [[3, 4], [5]])])[0]
    assert len(packed_logprobs(model, batch)) == 2  # the batch as built is fine
    bad = {
        "stream": (dataclasses.replace(batch, position_ids=batch.position_ids[:-1]), "stream tensors disagree"),
        "target": (dataclasses.replace(batch, targets=batch.targets[:-1]), "target tensors disagree"),
        "counts": (dataclasses.replace(batch, target_counts=[1, 1]), "target_counts sum to 2 but the batch has 3"),
        "keys": (dataclasses.replace(batch, seq_ids=[0]), "per-continuation lists disagree"),
        "positions": (dataclasses.replace(batch, target_positions=batch.target_positions + 10),
                      r"target_positions must lie in \[0, 5\)"),
    }
    for what, (broken, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            packed_logprobs(model, broken)


SAMPLING_ERRORS = {
    "stop None": (dict(stop=None), TypeError, r"stop must be a string or a list of strings \(\[\] for none\), got NoneType"),
    "stop_token_ids None": (dict(stop_token_ids=None), TypeError, "stop_token_ids must be a list of ints"),
    "stop id 2**63": (dict(stop_token_ids=[2**63]), ValueError, r"stop_token_ids must be non-negative ints below 2\*\*63"),
    "temperature inf": (dict(temperature=math.inf), ValueError, "temperature must be 0 .greedy. or a finite number >= 1e-05"),
    "temperature 1e-45": (dict(temperature=1e-45), ValueError, "temperature must be 0 .greedy. or a finite number >= 1e-05"),
    "temperature NaN": (dict(temperature=math.nan), ValueError, "temperature must be 0 .greedy."),
    "temperature True": (dict(temperature=True), TypeError, "temperature must be a float, got bool"),
    "ignore_eos 'no'": (dict(ignore_eos="no"), TypeError, r"ignore_eos must be True or False, got str \('no'\)"),
    "skip_special_tokens 1": (dict(skip_special_tokens=1), TypeError, "skip_special_tokens must be True or False"),
    "max_new_tokens True": (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int, got bool"),
}


@pytest.mark.parametrize("case", list(SAMPLING_ERRORS))
def test_sampling_params_rejects(case):
    overrides, error, message = SAMPLING_ERRORS[case]
    with pytest.raises(error, match=message):
        SamplingParams(**overrides)


def test_sampling_params_edges_that_are_fine():
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=1e-5).greedy
    assert SamplingParams(stop="</s>").stop == ["</s>"] and SamplingParams(stop=()).stop == []
