"""The pre-registered lr rule: the largest lr whose run keeps the mean actor/entropy of its last
10 steps within [0.5x, 1.5x] of its first 5 steps' mean (README.md). Prints the lr.

    python results/chain_grpo_vs_mrt/pick_lr.py runs/chain_grpo_vs_mrt/sweep/grpo-lr*/metrics.jsonl
"""

import json
import re
import statistics
import sys
from pathlib import Path

FALLBACK = "1e-4"


def entropy_ratio(path: Path) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    entropy = [r["actor/entropy"] for r in sorted(rows, key=lambda r: r["step"]) if "actor/entropy" in r]
    if len(entropy) < 15:
        raise SystemExit(f"{path}: {len(entropy)} steps with actor/entropy, the rule needs at least 15")
    return statistics.fmean(entropy[-10:]) / statistics.fmean(entropy[:5])


def main(paths: list[str]) -> str:
    ok = []
    for p in map(Path, paths):
        lr = re.search(r"lr([0-9.e+-]+)", p.parent.name).group(1)
        ratio = entropy_ratio(p)
        print(f"lr {lr}: entropy last 10 / first 5 = {ratio:.3f}", file=sys.stderr)
        if 0.5 <= ratio <= 1.5:
            ok.append((float(lr), lr))
    return max(ok)[1] if ok else FALLBACK


if __name__ == "__main__":
    print(main(sys.argv[1:]))
