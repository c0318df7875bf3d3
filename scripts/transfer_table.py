"""Per-class AP of several detection-transfer runs side by side (paper Table 1's layout), plus a bar chart.

    python transfer/voc07.py --ckpt runs/demo/final.safetensors
    python transfer/voc07.py --ckpt runs/demo/final.safetensors --init random
    python scripts/transfer_table.py runs/transfer/demo-pretrained runs/transfer/demo-random

Reads each run's results.json; prints a markdown table (AP in %, classes with positives only) and writes
the grouped bar chart to --figure (default: ap_bars.png beside the first run).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfer.figures import ap_bars  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories holding results.json")
    p.add_argument("--figure", default="", help="bar chart path (default: <first run>/figures/ap_bars.png)")
    args = p.parse_args(argv)
    results = {}
    for run in args.runs:
        path = Path(run) / "results.json"
        if not path.is_file():
            print(f"error: no results.json in {run}", file=sys.stderr)
            return 2
        results[Path(run).name] = json.loads(path.read_text())
    classes = [c for c in next(iter(results.values()))["ap"] if any(r["ap"].get(c) is not None for r in results.values())]
    names = list(results)
    print("| class | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for c in classes:
        cells = [r["ap"].get(c) for r in results.values()]
        print(f"| {c} | " + " | ".join("n/a" if v is None else f"{100 * v:.1f}" for v in cells) + " |")
    print("| **mAP** | " + " | ".join(f"**{100 * r['map']:.1f}**" for r in results.values()) + " |")
    figure = Path(args.figure) if args.figure else Path(args.runs[0]) / "figures" / "ap_bars.png"
    ap = {n: {c: (float("nan") if v is None else v) for c, v in r["ap"].items()} for n, r in results.items()}
    print(f"figure: {ap_bars(ap, figure)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
