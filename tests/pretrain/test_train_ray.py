"""`train_worker` under Ray Train: a 2-worker DDP run on CPUs (gloo), a relaunch that resumes a failed
run from its checkpoint (on a local path and in an S3 bucket), and a worker failure recovered within
one call (FailureConfig). The DDP runs check that both ranks trained in one process group of 2 and
ended with the same weights, the final checkpoint's."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from infra import storage
from pretrain.models.weights import load_weights
from pretrain.train.loop import train_worker
from infra.ray_edge import connect, ray_train
from tests.conftest import REPO
from tests.infra.ddp_probe import assert_ranks_agree, probe
from tests.pretrain.train_fixtures import PER_PHOTO, cluster_inputs, logged, spec_dict

pytestmark = pytest.mark.ray


class Crashed(RuntimeError):
    pass


class CrashingSession:
    """Wraps a session: a run that started without a checkpoint fails at the report of `crash_at`,
    before that checkpoint is handed over (every rank sees the same start, so all of them fail)."""

    def __init__(self, session, crash_at: int, fresh: bool):
        self._session, self._crash_at, self._fresh = session, crash_at, fresh
        self.rank, self.world_size, self.device = session.rank, session.world_size, session.device

    def latest_checkpoint(self):
        return self._session.latest_checkpoint()

    def report(self, metrics, checkpoint_dir):
        if self._fresh and metrics["step"] == self._crash_at:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
            raise Crashed(f"rank {self.rank} crashed at step {metrics['step']}")
        self._session.report(metrics, checkpoint_dir)


def crashing_worker(config: dict, session) -> dict:
    """train_worker, failing once as CrashingSession says; rank 0 appends the step it starts from to
    `starts.jsonl` in the out dir. Module level, so Ray workers import it by name."""
    config = dict(config)
    crash_at = config.pop("crash_at_step")
    ckpt = session.latest_checkpoint()
    start = json.loads((ckpt / "step.json").read_text())["step"] if ckpt else 0
    if session.rank == 0:
        os.makedirs(config["out_dir"], exist_ok=True)
        with open(os.path.join(config["out_dir"], "starts.jsonl"), "a") as fh:
            fh.write(json.dumps({"start": start}) + "\n")
    return train_worker(config, CrashingSession(session, crash_at, fresh=ckpt is None))


def starts(out_dir) -> list[int]:
    return [json.loads(line)["start"] for line in (out_dir / "starts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    """A private 2-CPU Ray instance for this module; its workers see the S3 server (the AWS_* variables
    are set before it starts)."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        # workers import this module (the train function travels by reference) and the package under test
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(REPO) not in paths:
            mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *paths]))
        mp.delenv("RAY_ADDRESS", raising=False)
        # about 6 s less per run on 2 cores: the controller polls its workers every 0.5 s instead of 2 s,
        # and starts no preemption watcher (an actor that polls for node drains; there is one node)
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        mp.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        connect(num_cpus=2)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def inputs(shard_dir, tmp_path_factory):
    return cluster_inputs(shard_dir, tmp_path_factory.mktemp("ray_inputs"), PER_PHOTO[:4])


def test_two_workers_train_and_checkpoint(ray_local, inputs, tmp_path):
    spec = spec_dict(*inputs, tmp_path / "out", steps=4, checkpoint_every=2, log_every=2)
    fn = probe(train_worker, "pretrain.train.loop", tmp_path / "ranks", state_fn="pretrain.train.loop:state_tensors")
    final = ray_train(fn, spec, name="ddp", storage_path=tmp_path / "ray", num_workers=2, use_gpu=False)
    assert not final.is_relative_to(tmp_path / "ray")  # a local copy, wherever the checkpoints are stored
    assert {"model.safetensors", "optimizer.pt", "step.json"} <= {p.name for p in final.iterdir()}
    assert json.loads((final / "step.json").read_text()) == {"step": 4}
    tensors, meta = load_weights(final / "model.safetensors")
    assert meta["step"] == 4 and tensors["classifier.fc.weight"].shape == (4, 128)
    assert_ranks_agree(tmp_path / "ranks", final, world_size=2)
    log = logged(tmp_path / "out")
    assert [m["step"] for m in log] == [2, 4]  # rank 0 alone writes the log
    assert all(m["samples_per_s"] > 0 for m in log)


def test_relaunch_resumes_a_failed_run_from_its_checkpoint(ray_local, inputs, tmp_path):
    spec = spec_dict(*inputs, tmp_path / "out", steps=4, checkpoint_every=2)
    kw = dict(name="resume", storage_path=tmp_path / "ray", num_workers=2, use_gpu=False, max_failures=0)
    with pytest.raises(Exception, match="crashed at step 4"):
        ray_train(crashing_worker, spec | {"crash_at_step": 4}, **kw)
    assert starts(tmp_path / "out") == [0]
    final = ray_train(train_worker, spec, **kw)  # the plain function, under the same name
    assert [m["step"] for m in logged(tmp_path / "out")] == [1, 2, 3, 4, 3, 4]  # steps 1-2 ran once
    assert json.loads((final / "step.json").read_text()) == {"step": 4}


def test_a_worker_failure_is_recovered_within_one_call(ray_local, inputs, tmp_path):
    spec = spec_dict(*inputs, tmp_path / "out", steps=4, checkpoint_every=2, crash_at_step=4)
    fn = probe(crashing_worker, "pretrain.train.loop", tmp_path / "ranks", state_fn="pretrain.train.loop:state_tensors")
    final = ray_train(fn, spec, name="retry", storage_path=tmp_path / "ray", num_workers=2,
                      use_gpu=False, max_failures=1)
    assert starts(tmp_path / "out") == [0, 2]
    assert [m["step"] for m in logged(tmp_path / "out")] == [1, 2, 3, 4, 3, 4]
    assert json.loads((final / "step.json").read_text()) == {"step": 4}
    assert load_weights(final / "model.safetensors")[1]["step"] == 4
    assert_ranks_agree(tmp_path / "ranks", final, world_size=2)  # the recovered attempt's two ranks


def test_checkpoints_in_a_bucket_resume_a_relaunch(ray_local, inputs, tmp_path, bucket):
    """Ray Train writes the checkpoints to S3 (through infra.storage's filesystem), the relaunch's
    workers download the step-2 checkpoint from there, and the caller gets the final one locally."""
    spec = spec_dict(*inputs, tmp_path / "out", steps=4, checkpoint_every=2, crash_at_step=4)
    store = storage.to_path(f"{bucket}/ray")
    kw = dict(name="s3run", storage_path=str(store), num_workers=2, use_gpu=False, max_failures=0)
    with pytest.raises(Exception, match="crashed at step 4"):
        ray_train(crashing_worker, spec, **kw)
    assert starts(tmp_path / "out") == [0]

    def saved_steps() -> list[int]:
        fs = store.fs
        keys = fs.find((store / "s3run").path)
        dirs = sorted({k.rsplit("/", 2)[-2] for k in keys if k.endswith("/step.json")})
        assert all(d.startswith("checkpoint_") for d in dirs), keys
        assert all(f"{(store / 's3run').path}/{d}/model.safetensors" in keys for d in dirs), keys
        return sorted(json.loads(fs.cat_file(f"{(store / 's3run').path}/{d}/step.json"))["step"] for d in dirs)

    assert saved_steps() == [2]  # the crashed run's checkpoint, in the bucket
    final = ray_train(crashing_worker, spec, **kw)  # the relaunch finds it and does not crash again
    assert starts(tmp_path / "out") == [0, 2]
    assert [m["step"] for m in logged(tmp_path / "out")] == [1, 2, 3, 4, 3, 4]
    assert saved_steps() == [2, 4]
    assert not str(final).startswith("s3:") and final.is_dir()
    assert json.loads((final / "step.json").read_text()) == {"step": 4}
    assert load_weights(final / "model.safetensors")[1]["step"] == 4
