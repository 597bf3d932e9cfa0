"""The trainer with `rollout.engine: vllm`, over the fake `vllm` of tests/fake_vllm: the embedded
model (tied embeddings) through a real MRT-RL step, sleep mode around the update, the sync and the
cross-rank weights check on the engine's own weights."""

import json

import fake_vllm
import pytest

from mrt_fast import train
from mrt_fast.config import parse_args
from mrt_fast.rollout.testing import torch_threads


@pytest.fixture(autouse=True)
def _fake_vllm_one_thread():
    with torch_threads(1), fake_vllm.installed():
        yield


def _args(tmp_path, *extra):
    return ["--rollout.engine", "vllm", "--train.steps", "1", "--train.global_batch_size", "2",
            "--train.mini_batch_size", "2", "--rollout.n", "2", "--rollout.max_new_tokens", "48",
            "--rollout.meta_k", "2", "--rollout.meta_max_new_tokens", "8", "--eval.num_problems", "0",
            "--log.progress_bar", "false", "--log.tensorboard", "false", "--checkpoint.export_hf", "false",
            "--output-dir", str(tmp_path), *extra]


def test_an_mrt_rl_step_with_the_vllm_engine_in_sleep_mode(tmp_path, monkeypatch):
    import vllm

    calls = []
    for name in ("sleep", "wake_up", "collective_rpc"):
        method = getattr(vllm.LLM, name)
        monkeypatch.setattr(vllm.LLM, name, lambda self, *a, _m=method, _n=name, **k: calls.append(_n) or _m(self, *a, **k))
    cfg = parse_args(_args(tmp_path, "--vllm.enable_sleep_mode", "true", "--log.check_weights", "true")).config
    summary = train.run(cfg)
    assert summary["status"] == "completed" and summary["step"] == 1
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert "reward/progress/mean" in row and len(row["debug/weights_sha256"]) == 64
    # Initial sync, then per step: sleep for the update, wake the weights, sync, wake the KV cache.
    assert calls == ["collective_rpc", "sleep", "wake_up", "collective_rpc", "wake_up"]


@pytest.mark.parametrize("override, message", [
    (["--vllm.gpu_memory_utilization", "1.5"], "vllm.gpu_memory_utilization must lie in"),
    (["--vllm.max_model_len", "32"], "vllm.max_model_len .32. must exceed rollout.max_new_tokens"),
    (["--vllm.dtype", "fp8"], "vllm.dtype must be one of"),
    (["--model.attn_backend", "flash_varlen", "--model.dtype", "float32"], "flash_varlen needs model.dtype"),
])
def test_bad_vllm_settings_fail_when_the_config_is_read(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        parse_args(_args(tmp_path, *override))


def test_main_reports_an_unsupported_vllm_as_an_error(tmp_path, monkeypatch, capsys):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.8.5")
    assert train.main(_args(tmp_path)) == 2
    assert "supports vllm>=0.20,<0.34" in capsys.readouterr().err


def test_flash_varlen_updates_pack_each_continuation_with_its_own_prefix(tmp_path):
    """flash-attn's varlen kernels cannot share a prefix, so with that backend the trainer packs
    unshared; the update is the same (checked here with SDPA running the attention: no flash-attn
    on a CPU)."""
    import copy

    import torch
    import transformers

    from mrt_fast.data import build_tiny_tokenizer, tiny_model_config
    from mrt_fast.packing import PrefixGroup

    config = tiny_model_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    build_tiny_tokenizer().save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(1)
    groups = [PrefixGroup(torch.randint(5, 400, (9,), generator=g).tolist(),
                          [torch.randint(5, 400, (r,), generator=g).tolist() for r in (3, 7)]) for _ in range(2)]
    plan = train.Plan(groups, [[0.5, -1.0], [1.5, 0.25]], "sequence", {})
    cfg = parse_args(["--model.path", str(tmp_path / "model"), "--algo.name", "grpo", "--rollout.n", "2",
                      "--train.global_batch_size", "2", "--train.mini_batch_size", "2", "--model.attn_backend", "sdpa",
                      "--output-dir", str(tmp_path / "run")]).config
    flash = copy.deepcopy(cfg)
    flash.model.attn_backend = "flash_varlen"  # what packs; the actor below still attends with SDPA
    results = []
    for run_cfg in (cfg, flash):
        env = train.init_distributed()
        try:
            model, _ = train.load_model_and_tokenizer(cfg)
            actor = train.build_actor(model, cfg, env)
            optimizer, _ = train.build_optimizer(actor, cfg)
            metrics = train.update(actor, optimizer, plan, run_cfg, env)
            results.append((metrics, {n: p.grad.full_tensor().clone() for n, p in actor.named_parameters()}))
        finally:
            train.destroy_distributed()
    (shared, shared_grads), (unshared, unshared_grads) = results
    assert shared["perf/packed_num_tokens"] < shared["perf/total_num_tokens"]
    assert unshared["perf/packed_num_tokens"] == unshared["perf/total_num_tokens"]
    for name in shared_grads:
        torch.testing.assert_close(unshared_grads[name], shared_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_two_ranks_under_torchrun_each_run_their_own_engine(tmp_path):
    """torchrun, 2 ranks: each rank builds its engine with the external launcher (the fake reads
    RANK / LOCAL_RANK as vLLM does), samples its own prompts, and after the step the engines'
    weights agree (log.check_weights digests them through apply_model)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MRT_FAST_KERNEL_BACKEND": "torch", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), fake_vllm.DIR])}
    args = _args(tmp_path, "--log.check_weights", "true", "--train.global_batch_size", "4",
                 "--train.mini_batch_size", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "mrt_fast.train", *args]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["step"] == 1 and len(row["debug/weights_sha256"]) == 64
