"""scripts/bench_gpu.py at its CPU size: the lines the planner reads, and the planner reading them."""
from __future__ import annotations

import json

from tests.conftest import REPO, run_cli
from tests.scripts.test_scale import plan


def test_the_gpu_bench_prints_lines_the_planner_takes_as_measured_on_their_device(tmp_path, capsys):
    out = tmp_path / "gpu.jsonl"
    run = run_cli(["scripts/bench_gpu.py", "--small", "--only", "kmeans,export,classify", "--out", str(out)], timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(d["bench"], d["device"]) for d in lines] == [("kmeans", "cpu"), ("export", "cpu"), ("classify", "cpu")]
    assert lines[0]["wall_s"] > 0 and (lines[0]["n"], lines[0]["k"], lines[0]["d"]) == (20000, 200, 256)
    assert lines[1]["images_per_s"] > 0 and lines[1]["images"] == 128
    assert lines[2]["stl10_images_per_s"] > 0 and lines[2]["caltech101_images_per_s"] > 0
    # a line measured on a CPU never stands in for the plan's GPU
    (line := dict(lines[0]))["device"] = "NVIDIA H100 80GB HBM3"
    (tmp_path / "h100.jsonl").write_text(json.dumps(line) + "\n")
    for files, measured in (([out], False), ([tmp_path / "h100.jsonl"], True)):
        rows = {r["stage"]: r for r in plan(capsys, "--gpu", "h100", "--measured",
                                            str(REPO / "scripts/measured/rehearse_scale_full.jsonl"),
                                            *map(str, files))["rows"]}
        assert any(f"measured: {files[0].name}:1" in s for s in rows["clustering: init_kmeans"]["sources"]) == measured
