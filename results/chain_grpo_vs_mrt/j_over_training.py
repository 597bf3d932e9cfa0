"""J over training, per arm: the two progress tables of ``python -m mrt_fast.data.task_probe
--only-progress`` measured on the warm start (step 0) and on each run's exports (``hf-step_N``),
pooled over seeds. Writes j_training.md and j_training.json.

    python results/chain_grpo_vs_mrt/j_over_training.py RUNS OUT grpo mrt-rl mrt-online grpo-lp

Reads RUNS/warm-start-progress.json and RUNS/<arm>-<seed>/progress-step<N>.json.
"""

import json
import re
import sys
from pathlib import Path


def pooled(pairs) -> tuple[float, int]:
    """Mean of ``(mean, count)`` pairs weighted by their counts, and the total count."""
    total = sum(count for _, count in pairs)
    return (sum(mean * count for mean, count in pairs) / total if total else float("nan")), total


def summarise(probes: list[dict]) -> dict:
    """One row of the table from the probes of one arm at one step (one per seed)."""
    own = [p["progress"] for p in probes]
    scripted = [p["scripted_progress"] for p in probes]
    failed_counts = sorted({int(c) for s in scripted for c in s["j_failed"]})
    return {
        "seeds": len(probes),
        "trace_accuracy": pooled([(o["trace_accuracy"], p["problems"]) for o, p in zip(own, probes)])[0],
        "j_empty": pooled([tuple(o["j_by_last"]["0,productive"]) for o in own])[0],
        "delta_productive": pooled([(o["delta_productive"], o["n_productive"]) for o in own]),
        "delta_unproductive": pooled([(o["delta_unproductive"], o["n_unproductive"]) for o in own]),
        "unproductive_per_trace": sum(o["n_unproductive"] for o in own) / sum(p["problems"] for p in probes),
        "j_after_failed": {c: pooled([tuple(s["j_failed"][str(c)]) for s in scripted if str(c) in s["j_failed"]])[0]
                           for c in failed_counts},
        "j_found": pooled([(s["j_found"], p["problems"]) for s, p in zip(scripted, probes)])[0],
        "delta_recheck": pooled([(s["delta_recheck"], p["problems"]) for s, p in zip(scripted, probes)])[0],
    }


def main(runs: Path, out: Path, arms: list[str]) -> None:
    start = json.loads((runs / "warm-start-progress.json").read_text())
    rows: dict[str, dict[int, dict]] = {}
    for arm in arms:
        by_step: dict[int, list[dict]] = {0: [start]}
        for path in sorted(runs.glob(f"{arm}-[0-9]*/progress-step*.json")):
            step = int(re.search(r"progress-step(\d+)\.json$", path.name).group(1))
            by_step.setdefault(step, []).append(json.loads(path.read_text()))
        rows[arm] = {step: summarise(probes) for step, probes in sorted(by_step.items())}

    cs = sorted({c for arm in rows.values() for row in arm.values() for c in row["j_after_failed"]})
    lines = ["Own traces (T=1): J at the empty prefix, mean ΔJ over productive and unproductive episodes "
             "(count), unproductive episodes per trace. Task-written prefixes: J after c failed attempts "
             "(chance among the untried keys: " + ", ".join(f"{1 / (6 - c):.2f}" for c in cs) + "), "
             "J right after the find, ΔJ of a re-check.", "",
             "| arm | step | seeds | trace accuracy | J empty | ΔJ productive | ΔJ unproductive | unproductive / trace | "
             + " | ".join(f"J, {c} failed" for c in cs) + " | J after find | ΔJ re-check |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(cs) + "---|---|"]
    for arm, by_step in rows.items():
        for step, r in by_step.items():
            failed = " | ".join(f"{r['j_after_failed'][c]:.3f}" if c in r["j_after_failed"] else "-" for c in cs)
            (dp, np_), (du, nu) = r["delta_productive"], r["delta_unproductive"]
            lines.append(f"| {arm} | {step} | {r['seeds']} | {r['trace_accuracy']:.3f} | {r['j_empty']:.3f} | "
                         f"{dp:+.3f} ({np_}) | {du:+.3f} ({nu}) | {r['unproductive_per_trace']:.2f} | {failed} | "
                         f"{r['j_found']:.3f} | {r['delta_recheck']:+.3f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "j_training.md").write_text("\n".join(lines) + "\n")
    (out / "j_training.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
