"""The MFU count: model FLOPs of a packed micro-batch against a hand count, and the peak table."""

import pytest
import torch
import transformers

from mrt_fast.metrics import ModelShape, attended_pairs, micro_batch_flops, peak_flops
from mrt_fast.packing import PrefixGroup, dense_mask, pack, prefix_tree_mask


def tiny_qwen2(tied: bool):
    config = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return transformers.AutoModelForCausalLM.from_config(config)


# Per layer: q 32x32 + 32 bias, k and v 32x16 + 16 bias each, o 32x32, MLP 3 x 32x48, two norms of 32.
LAYER = (32 * 32 + 32) + 2 * (32 * 16 + 16) + 32 * 32 + 3 * 32 * 48 + 2 * 32
BODY = 2 * LAYER + 32  # + the final norm; embedding and LM head are not body parameters


@pytest.mark.parametrize("tied", [False, True])
def test_model_shape_excludes_embedding_and_head(tied):
    shape = ModelShape.of(tiny_qwen2(tied))
    assert shape == ModelShape(layers=2, hidden=32, attention_width=32, vocab=97, body_params=BODY)


def test_flops_of_a_hand_counted_tree():
    # A prefix of 3 shared by continuations of 2 and 4, and a plain sequence of 5.
    (batch,) = pack([PrefixGroup([1, 2, 3], [[4, 5], [6, 7, 8, 9]]), PrefixGroup([], [[10, 11, 12, 13, 14]])])
    assert batch.num_tokens == 14
    assert batch.num_targets == 2 + 4 + 4  # the plain sequence's first token predicts nothing
    # Prefix: 3*4/2 = 6. Continuation of 2: 2*3 + 3 = 9. Of 4: 4*3 + 10 = 22. Plain 5: 15.
    assert attended_pairs(batch) == 6 + 9 + 22 + 15
    shape = ModelShape.of(tiny_qwen2(False))
    forward = 2 * BODY * 14 + 2 * 97 * 32 * 10 + 4 * 2 * 32 * 52
    assert micro_batch_flops(shape, batch, backward=False) == forward == 513536
    assert micro_batch_flops(shape, batch) == 3 * forward
    assert micro_batch_flops(shape, batch.as_padding()) == 0.0  # filler is not useful work


def test_attended_pairs_equal_the_mask():
    g = torch.Generator().manual_seed(0)

    def toks(n):
        return torch.randint(0, 50, (n,), generator=g).tolist()

    groups = [PrefixGroup(toks(p), [toks(r) for r in rs]) for p, rs in
              [(7, [3, 5, 1]), (0, [4]), (0, [2, 6]), (12, [9]), (1, [1, 1, 1])]]
    for batch in pack(groups, max_tokens=24):
        mask = dense_mask(prefix_tree_mask(batch.group_ids, batch.segment_ids), batch.num_tokens)
        assert attended_pairs(batch) == int(mask.sum())


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 3090", None),
])
def test_peak_by_device_name(name, peak):
    assert peak_flops(name) == peak


def test_trainer_counts_each_epoch_and_the_no_grad_forwards():
    """`perf/model_flops` of an update with 2 PPO epochs: every micro-batch's forward + backward
    twice, and its no-grad forward (old log-probs) once; nothing multiplied by the epochs twice."""
    from mrt_fast import train
    from mrt_fast.config import from_dict

    model = tiny_qwen2(False)
    model.config.use_cache = False
    shape = ModelShape.of(model)
    cfg = from_dict({"algo": {"name": "grpo", "ppo_epochs": 2}, "rollout": {"n": 2},
                     "train": {"global_batch_size": 2, "mini_batch_size": 2, "max_tokens_per_micro_batch": 8}})
    groups = [PrefixGroup([1, 2, 3], [[4, 5], [6, 7, 8, 9]]), PrefixGroup([10, 11], [[12, 13, 14], [15]])]
    plan = train.Plan(groups, [[0.5, -0.5], [1.0, -1.0]], "sequence", {})
    env = train.init_distributed()
    try:
        actor = train.build_actor(model, cfg, env)
        optimizer, _ = train.build_optimizer(actor, cfg)
        metrics = train.update(actor, optimizer, plan, cfg, env)
    finally:
        train.destroy_distributed()
    batches = pack(groups, max_tokens=8)
    assert len(batches) >= 2
    want = sum(2 * micro_batch_flops(shape, b) + micro_batch_flops(shape, b, backward=False) for b in batches)
    assert metrics["perf/model_flops"] == pytest.approx(want, rel=1e-12)
