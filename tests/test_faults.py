"""Fault injection against the real checkpoint code: a SIGKILL while an existing step is re-saved,
a lost ``latest`` pointer, damaged checkpoint files, a full disk, non-finite weights.

The model is a tiny embedding + LM-head network trained with AdamW (the checkpoint code only sees
``state_dict``s, and importing transformers in every killed subprocess would cost seconds each).
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from mrt_fast import checkpoint

MODEL = "torch.nn.Sequential(torch.nn.Embedding(67, 16), torch.nn.Linear(16, 67))"


def make(seed=0):
    torch.manual_seed(seed)
    model = eval(MODEL)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model, opt, seed):
    ids = torch.randint(0, 67, (8,), generator=torch.Generator().manual_seed(seed))
    torch.nn.functional.cross_entropy(model(ids), ids.roll(1)).backward()
    opt.step()
    opt.zero_grad()


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load_latest(run_dir):
    model, opt = make(seed=123)
    path = checkpoint.resolve_resume(run_dir, "auto")
    state = checkpoint.load(path, model, opt)
    return path, state, weights(model)


# --------------------------------------------------------------------------------------------
# A kill while an existing step is re-saved (subprocess + SIGKILL at each rename of the commit)
# --------------------------------------------------------------------------------------------

RESAVE = textwrap.dedent(f"""
    import os, signal, sys, torch
    from mrt_fast import checkpoint
    run_dir, kill_at = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = {MODEL}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train_step(seed):
        ids = torch.randint(0, 67, (8,), generator=torch.Generator().manual_seed(seed))
        torch.nn.functional.cross_entropy(model(ids), ids.roll(1)).backward()
        opt.step()
        opt.zero_grad()

    train_step(1)
    checkpoint.save(run_dir, 1, model, opt)
    train_step(2)
    checkpoint.save(run_dir, 2, model, opt)
    torch.save(model.state_dict(), os.path.join(run_dir, "old.pt"))
    train_step(3)
    torch.save(model.state_dict(), os.path.join(run_dir, "new.pt"))

    real_replace = os.replace
    def replace(src, dst):  # the real rename, then SIGKILL right after the chosen one
        real_replace(src, dst)
        src, dst = str(src), str(dst)
        if ((kill_at == "old_moved_aside" and dst.endswith("step_2.previous"))
                or (kill_at == "new_renamed_in" and src.endswith("step_2.incomplete"))
                or (kill_at == "pointer_moved" and dst.endswith("latest"))):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    checkpoint.save(run_dir, 2, model, opt)  # the final save of a resumed, finished run
""")


@pytest.mark.parametrize("kill_at, expect", [("old_moved_aside", "old.pt"), ("new_renamed_in", "new.pt"),
                                             ("pointer_moved", "new.pt")])
def test_kill_during_resave_leaves_a_complete_latest_checkpoint(tmp_path, capfd, kill_at, expect):
    proc = subprocess.run([sys.executable, "-c", RESAVE, str(tmp_path), kill_at], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    path, state, got = load_latest(tmp_path)
    assert state["step"] == 2 and checkpoint.verify(path) == []
    assert same(got, torch.load(tmp_path / expect))
    if kill_at == "old_moved_aside":
        assert path.name == "step_2.previous" and "re-saved" in capfd.readouterr().err

    # The next save cleans the debris and moves on.
    model, opt = make()
    checkpoint.load(path, model, opt)
    checkpoint.save(tmp_path, 3, model, opt)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2", "step_3"]
    assert checkpoint.verify(root / "step_2") == [] and same(load_latest(tmp_path)[2], weights(model))


# --------------------------------------------------------------------------------------------
# A lost pointer
# --------------------------------------------------------------------------------------------


def saved_run(tmp_path, steps=(1, 2), keep_last=3):
    """Checkpoints of a real AdamW run; returns the weights at each saved step."""
    model, opt = make()
    saved = {}
    for step in steps:
        train_step(model, opt, step)
        checkpoint.save(tmp_path, step, model, opt, keep_last=keep_last)
        saved[step] = weights(model)
    return saved


def test_lost_pointer_falls_back_to_the_newest_complete_step(tmp_path, capfd):
    saved = saved_run(tmp_path, steps=(1, 2, 3))
    (tmp_path / "checkpoints" / "latest").unlink()
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoints" / "step_3"
    path, state, got = load_latest(tmp_path)
    assert state["step"] == 3 and same(got, saved[3])
    assert "latest is missing; using the newest complete checkpoint, step_3" in capfd.readouterr().err

    # A pointer naming a deleted directory: same fallback, said as such.
    (tmp_path / "checkpoints" / "latest").write_text("step_9\n")
    assert checkpoint.resolve_resume(tmp_path, "auto").name == "step_3"
    assert "names step_9, which is not a complete checkpoint" in capfd.readouterr().err


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    saved_run(tmp_path, steps=(1, 2, 3))
    model, opt = make()
    checkpoint.load(tmp_path / "checkpoints" / "step_1", model, opt)  # an explicit, older resume
    checkpoint.save(tmp_path, 2, model, opt, keep_last=1)
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoints" / "step_2"
    assert checkpoint.verify(checkpoint.latest(tmp_path)) == []


# --------------------------------------------------------------------------------------------
# Damaged files: detected by the manifest, the previous checkpoint is used
# --------------------------------------------------------------------------------------------


def _shard(path):
    return next(path.glob("*.distcp"))


def truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def zero(f):
    f.write_bytes(bytes(f.stat().st_size))


def flip64(f):
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": (_shard, truncate),
    "zeroed shard": (_shard, zero),
    "64 flipped bytes in a shard": (_shard, flip64),
    "truncated .metadata": (lambda p: p / ".metadata", truncate),
    "zeroed trainer_state.pt": (lambda p: p / "trainer_state.pt", zero),
    "truncated rng_rank0.pt": (lambda p: p / "rng_rank0.pt", truncate),
    "deleted rng_rank0.pt": (lambda p: p / "rng_rank0.pt", lambda f: f.unlink()),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capfd, case):
    saved = saved_run(tmp_path)
    step_2 = tmp_path / "checkpoints" / "step_2"
    pick, damage = DAMAGE[case]
    target = pick(step_2)
    damage(target)
    assert checkpoint.verify(step_2) and target.name in checkpoint.verify(step_2)[0]

    path, state, got = load_latest(tmp_path)
    assert path.name == "step_1" and state["step"] == 1 and same(got, saved[1]) and state["rng_restored"]
    err = capfd.readouterr().err
    assert f"checkpoint {step_2} is damaged ({target.name}" in err and "trying the previous one" in err
    with pytest.raises(checkpoint.CheckpointError, match=f"step_2 is damaged: {target.name}"):
        checkpoint.resolve_resume(tmp_path, str(step_2))  # an explicit path is never swapped silently


def test_all_damaged_is_an_error_not_a_fresh_start(tmp_path):
    saved_run(tmp_path)
    for step in (1, 2):
        zero(_shard(tmp_path / "checkpoints" / f"step_{step}"))
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint"):
        checkpoint.resolve_resume(tmp_path, "auto")


def test_checkpoint_without_manifest_still_fails_clearly(tmp_path):
    """Checkpoints written before manifests existed load as before; damage there is a clear error."""
    saved = saved_run(tmp_path, steps=(1,))
    step_1 = tmp_path / "checkpoints" / "step_1"
    (step_1 / "manifest.json").unlink()
    assert same(load_latest(tmp_path)[2], saved[1])
    (step_1 / "rng_rank0.pt").unlink()
    model, opt = make()
    state = checkpoint.load(step_1, model, opt)
    assert not state["rng_restored"] and state["rng_note"].startswith("rng_rank0.pt is missing")
    zero(step_1 / "trainer_state.pt")
    with pytest.raises(checkpoint.CheckpointError, match="trainer_state.pt is unreadable"):
        checkpoint.load(step_1, model, opt)
    zero(_shard(step_1))
    step_1.joinpath("trainer_state.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(tmp_path, str(step_1))


# --------------------------------------------------------------------------------------------
# Non-finite weights and a full disk
# --------------------------------------------------------------------------------------------


def test_non_finite_weights_are_never_saved(tmp_path):
    saved_run(tmp_path, steps=(1,))
    model, opt = make()
    with torch.no_grad():
        model[1].weight[3, 4] = float("inf")
        model[0].weight[0, :2] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match=r"refusing to save step 2: the weights are not all finite "
                                                         r"\(non-finite values in 0.weight \(2\), 1.weight \(1\)\)"):
        checkpoint.save(tmp_path, 2, model, opt)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name != "latest"] == ["step_1"]
    assert checkpoint.latest(tmp_path).name == "step_1"


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs (needs root and a kernel that lets us mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_says_so_and_removes_the_partial_directory(small_disk):
    saved = saved_run(small_disk, steps=(1,))
    import shutil

    free = shutil.disk_usage(small_disk).free
    filler = small_disk / "filler"
    filler.write_bytes(bytes(max(0, free - 24 * 1024)))  # leave less than a checkpoint needs
    model, opt = make()
    train_step(model, opt, 5)
    with pytest.raises(checkpoint.CheckpointError, match="the disk is full: checkpoint step 2 could not be written"):
        checkpoint.save(small_disk, 2, model, opt)
    root = small_disk / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1"]  # no .incomplete left behind
    path, _, got = load_latest(small_disk)
    assert path.name == "step_1" and same(got, saved[1])

    filler.unlink()
    checkpoint.save(small_disk, 2, model, opt)
    assert checkpoint.latest(small_disk).name == "step_2" and checkpoint.verify(root / "step_2") == []
