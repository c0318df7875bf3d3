"""Ours against its floors (random weights, raw pixels, HOG): linear and k-NN accuracy side by side.

    python scripts/classify_table.py --ckpt runs/digits/final.safetensors --data runs/classify-data/digits
    python scripts/classify_table.py runs/classify/digits-pretrained runs/classify/digits-hog   # print only

With --ckpt and --data it runs `transfer/classify.py` once per variant (each in its own run directory
<run.root>/<run.name>-<variant>, so a rerun reuses their cached stages), then reads every results.json
and prints a markdown table (accuracy in %, mean ± std over the splits) and whether ours is above every
floor for each probe. Arguments after `--` go to every classify.py call (e.g. `-- --set data.splits=3`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfer import classify  # noqa: E402

VARIANTS = {"pretrained": ["--init", "pretrained"], "random": ["--init", "random"],
            "pixels": ["--features", "pixels"], "hog": ["--features", "hog"]}
PROBES = ("linear", "knn")


def run_variants(args, extra: list[str]) -> list[Path]:
    base = ["--ckpt", args.ckpt, "--data", args.data] + (["--protocol", args.protocol] if args.protocol else []) \
        + (["--config", args.config] if args.config else []) + extra
    dirs = []
    for v in args.variants:
        run_dir = Path(args.root) / f"{args.name}-{v}"
        if classify.main(base + VARIANTS[v] + ["--run-dir", str(run_dir)]) != 0:
            raise SystemExit(f"error: classify.py failed for {v}")
        dirs.append(run_dir)
    return dirs


def table(results: dict[str, dict]) -> tuple[str, dict]:
    """{variant: results.json} -> (markdown, {probe: ours above every floor?})."""
    lines = ["| features | dim | linear % | k-NN % |", "|---|---:|---:|---:|"]
    for v, r in results.items():
        cells = [f"{100 * r[p]['accuracy']:.2f} ± {100 * r[p]['accuracy_std']:.2f}" for p in PROBES]
        lines.append(f"| {r['features']['desc']} ({v}) | {r['features']['dim']} | " + " | ".join(cells) + " |")
    verdict = {}
    if "pretrained" in results:
        ours = results["pretrained"]
        floors = {v: r for v, r in results.items() if v != "pretrained"}
        verdict = {p: all(ours[p]["accuracy"] > r[p]["accuracy"] for r in floors.values()) for p in PROBES}
    return "\n".join(lines), verdict


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="run directories holding results.json (print only)")
    p.add_argument("--ckpt", default="", help="pretraining weights: run every variant first")
    p.add_argument("--data", default="", help="the data folder for the runs")
    p.add_argument("--protocol", default="", help="folder | stl10 | caltech101")
    p.add_argument("--config", default="", help="classify.py --config for every run")
    p.add_argument("--root", default="runs/classify", help="where the variants' run directories go")
    p.add_argument("--name", default="", help="run directory prefix (default: the data folder's name)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--json", action="store_true", help="also print one JSON line of the figures")
    args = p.parse_args(argv)
    if bool(args.ckpt) != bool(args.data) or not (args.runs or args.ckpt):
        p.error("give run directories, or --ckpt and --data to run the variants")
    args.name = args.name or Path(args.data.rstrip("/")).name
    dirs = [Path(r) for r in args.runs] + (run_variants(args, extra) if args.ckpt else [])
    results = {}
    for d in dirs:
        path = d / "results.json"
        if not path.is_file():
            print(f"error: no results.json in {d}", file=sys.stderr)
            return 2
        r = json.loads(path.read_text())
        results[r["variant"]] = r
    md, verdict = table(results)
    first = next(iter(results.values()))
    print(f"\n{first['protocol']}: {first['images_used']} images, {len(first['classes'])} classes, "
          f"{first['splits']} split(s)\n\n{md}")
    if verdict:
        print("\nours above every floor: " + ", ".join(f"{p} {'yes' if ok else 'NO'}" for p, ok in verdict.items()))
    if args.json:
        print(json.dumps({v: {p: round(r[p]["accuracy"], 4) for p in PROBES} for v, r in results.items()}
                         | {"ours_above_floors": verdict}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
