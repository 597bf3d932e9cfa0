"""The run-directory rules: no silent rerun over a run, one config per segment, changes said (and
refused where a resume cannot honour them), metrics without duplicate steps after a resume,
a lost ``latest`` pointer that resumes (and exports) the newest step, never step 0, and no
checkpoint of non-finite weights."""

import json

import pytest
import torch
from test_train import assets, sft_config  # noqa: F401 - the module fixture is used by name

from mrt_fast import run_dir, train
from mrt_fast.metrics import read_metrics


def cli(assets, out, *extra):  # noqa: F811
    argv = ["--model.path", str(assets / "model"), "--data.source", str(assets / "data.jsonl"),
            "--algo.name", "sft", "--train.global_batch_size", "2", "--train.mini_batch_size", "2",
            "--optim.lr", "1e-3", "--eval.num_problems", "0", "--log.progress_bar", "false",
            "--checkpoint.every", "1", "--checkpoint.export_hf", "false", "--output-dir", str(out), *extra]
    return train.main(argv)


def snapshot(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_rerun_without_resume_is_refused_and_changes_nothing(assets, tmp_path, capsys):  # noqa: F811
    assert cli(assets, tmp_path, "--train.steps", "2") == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli(assets, tmp_path, "--train.steps", "2") == 2
    err = capsys.readouterr().err
    assert "already holds a run (config.yaml, metrics.jsonl, checkpoints/step_1, checkpoints/step_2)" in err
    assert "--resume auto" in err and "new --output-dir" in err
    assert cli(assets, tmp_path, "--export-only") == 2
    assert "--export-only exports a checkpoint: add --resume auto" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_resume_keeps_each_segments_config_and_refuses_unhonoured_changes(assets, tmp_path, capsys):  # noqa: F811
    assert cli(assets, tmp_path, "--train.steps", "1") == 0
    first = (tmp_path / "config.yaml").read_text()
    capsys.readouterr()

    assert cli(assets, tmp_path, "--train.steps", "2", "--resume", "auto", "--algo.name", "grpo") == 2
    out, err = capsys.readouterr()
    assert "algo.name: 'sft' -> 'grpo'" in out and "cannot honour a change of algo.name" in err
    assert cli(assets, tmp_path, "--train.steps", "2", "--resume", "auto", "--optim.lr", "5e-4") == 2
    assert "optim.lr: 0.001 -> 0.0005" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]  # nothing ran

    assert cli(assets, tmp_path, "--train.steps", "2", "--resume", "auto", "--optim.lr", "5e-4",
               "--allow-config-change") == 0
    assert "train.steps: 1 -> 2" in capsys.readouterr().out
    assert (tmp_path / "config.yaml").read_text() == first  # the first segment's record is kept
    second = (tmp_path / "config.resume-1.yaml").read_text()
    assert "lr: 0.0005" in second and "steps: 2" in second
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_resume_after_a_lost_step_logs_each_step_once(assets, tmp_path, capsys):  # noqa: F811
    train.run(sft_config(assets, tmp_path, steps=3))
    root = tmp_path / "checkpoints"
    import shutil

    shutil.rmtree(root / "step_3")  # lost: the pointer now names nothing, step_2 is the newest
    summary = train.run(sft_config(assets, tmp_path, steps=3, resume="auto"))
    assert "names step_3, which is not a complete checkpoint; using the newest complete checkpoint, step_2" \
        in capsys.readouterr().err
    assert summary["step"] == 3 and [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]

    (root / "latest").unlink()  # --export-only exports the newest step, not the initial weights
    summary = train.run(sft_config(assets, tmp_path, resume="auto"), export_only=True)
    assert summary["step"] == 3


def test_truncate_metrics_drops_later_steps_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval/accuracy": 0.1}, {"step": 1}, {"step": 2}, {"step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "actor/pg')
    assert run_dir.truncate_metrics(path, 2) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert run_dir.truncate_metrics(path, 2) == 0


@pytest.mark.parametrize("old, new, refused", [
    ({"algo": {"name": "sft"}}, {"algo": {"name": "grpo"}}, ["algo.name"]),
    ({"optim": {"lr": 1e-3}, "train": {"steps": 2}}, {"optim": {"lr": 2e-3}, "train": {"steps": 9}}, ["optim.lr"]),
    ({"data": {"source": "a"}, "output_dir": "x"}, {"data": {"source": "b"}, "output_dir": "y"}, ["data.source"]),
    ({"rollout": {"temperature": 1.0}}, {"rollout": {"temperature": 0.7}}, []),
])
def test_which_changes_a_resume_cannot_honour(old, new, refused):
    changes = run_dir.config_changes(old, new)
    assert "output_dir" not in changes
    assert [k for k in changes if run_dir._not_honoured(k)] == refused


def test_a_run_whose_weights_turn_non_finite_saves_no_checkpoint_of_them(assets, tmp_path, monkeypatch, capsys):  # noqa: F811
    step = torch.optim.AdamW.step
    calls = {"n": 0}

    def blow_up(self, *args, **kwargs):  # fault injection: the second update leaves an inf weight
        out = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", blow_up)
    assert cli(assets, tmp_path, "--train.steps", "3") == 2
    err = capsys.readouterr().err
    assert "refusing to save step 2: the weights are not all finite" in err
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'step_1'}" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_1"]
