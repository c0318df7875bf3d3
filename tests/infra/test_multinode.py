"""Several raylets, no shared storage between them but the S3 server: the small pipeline end to end."""
import json

import pytest

from infra import storage
from tests.conftest import REPO, TOY_RUN, run_cli


@pytest.mark.slow
@pytest.mark.ray
def test_small_pipeline_on_three_raylets_with_everything_on_s3(bucket, tmp_path):
    from ray.cluster_utils import Cluster

    caches = {name: tmp_path / f"cache-{name}" for name in ("head", "w1", "w2", "driver")}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "env_vars": {"DISCOATTR_CACHE": str(caches["head"])}})
    try:
        for name in ("w1", "w2"):  # each raylet with its own node-local cache
            cluster.add_node(num_cpus=1, env_vars={"DISCOATTR_CACHE": str(caches[name])})
        cluster.wait_for_nodes()
        run_dir = f"{bucket}/runs/multi"
        r = run_cli(["pretrain/run.py", "--run-dir", run_dir, *TOY_RUN, "--set", "train.num_workers=2",
                     "--set", "train.cpus_per_worker=1"],
                    env_extra={"RAY_ADDRESS": cluster.address, "DISCOATTR_CACHE": str(caches["driver"])}, timeout=900)
        assert r.returncode == 0, r.stderr[-4000:]
        assert "3 node(s)" in r.stderr
        stages = json.loads((storage.to_path(run_dir) / "manifest.json").read_text())["stages"]
        assert {"shard", "features", "cluster_round0", "train_round0", "hash_k16", "eval"} <= set(stages)
        assert storage.size_of(f"{run_dir}/final.safetensors") > 0
        ckpts = [p for p in storage.to_path(f"{run_dir}/train/round0/ray").rglob("*") if p.name == "model.safetensors"]
        assert ckpts, "Ray Train kept its checkpoints in the bucket"
        assert not (REPO / "s3:").exists() and not any(tmp_path.glob("**/s3:"))  # nothing went to a local 's3:' folder
        fetched = [n for n in ("head", "w1", "w2") if any((caches[n] / "objects").rglob("*"))]
        assert len(fetched) >= 2, f"inputs fetched into the caches of {fetched} only: tasks ran on one node"
    finally:
        cluster.shutdown()
