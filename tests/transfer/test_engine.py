"""Fine-tuning and testing: exact resume, frozen conv1, boxes back in image pixels, DDP on Ray Train."""
import os
import shutil

import numpy as np
import pytest
import torch

from pretrain.models.weights import load_weights
from infra.session import LocalSession
from tests.conftest import REPO
from tests.infra.ddp_probe import assert_ranks_agree, probe
from tests.transfer.test_data import _scene
from transfer.data import read_roidb, write_roidb
from transfer.engine import DetectorSpec, detect, detect_all, load_detector, train_detector


@pytest.fixture
def roidb(tmp_path):
    anns = [_scene(tmp_path, f"im{i}", rect=(20 + 7 * i, 30, 100 + 7 * i, 90)) for i in range(4)]
    rng = np.random.default_rng(0)
    props = {}
    for a in anns:
        xy = rng.uniform(0, 120, (80, 2))
        wh = rng.uniform(20, 80, (80, 2))
        props[a.image_id] = np.concatenate([a.boxes + rng.normal(0, 3, (1, 4)), np.hstack([xy, xy + wh])]).astype(
            np.float32)
    return write_roidb(tmp_path / "db.npz", anns, props)


def _spec(tmp_path, roidb, **kw) -> dict:
    base = dict(roidb=str(roidb), out_dir=str(tmp_path / "out"), init="random", width=0.25, fc_dim=32, iterations=4,
                checkpoint_every=2, log_every=1, scale_px=128, max_size_px=200, loader_workers=0, progress=False)
    return DetectorSpec(**{**base, **kw}).__dict__


def test_a_resumed_run_ends_with_the_straight_runs_weights(tmp_path, roidb):
    cpu = torch.device("cpu")  # bit-exact on CPU; CUDA's RoI pooling backward adds atomically, in any order
    straight = LocalSession(tmp_path / "straight", keep=5, device=cpu)
    train_detector(_spec(tmp_path, roidb), straight)
    final, _ = load_weights(straight.latest_checkpoint() / "model.safetensors")
    # a run killed after its step-2 checkpoint: relaunched on that checkpoint alone
    shutil.copytree(straight.checkpoints()[0], tmp_path / "resumed" / straight.checkpoints()[0].name)
    resumed = LocalSession(tmp_path / "resumed", keep=5, device=cpu)
    train_detector(_spec(tmp_path, roidb), resumed)
    again, _ = load_weights(resumed.latest_checkpoint() / "model.safetensors")
    assert set(again) == set(final)
    for k in final:
        torch.testing.assert_close(again[k], final[k], rtol=0, atol=0, msg=k)
    first, _ = load_weights(straight.checkpoints()[0] / "model.safetensors")
    assert torch.equal(first["conv1.weight"], final["conv1.weight"])  # frozen, as Fast R-CNN's conv1
    assert not torch.equal(first["conv2.weight"], final["conv2.weight"])


def test_detections_come_back_in_the_original_images_pixels(tmp_path, roidb):
    session = LocalSession(tmp_path / "ckpt")
    train_detector(_spec(tmp_path, roidb, iterations=2), session)
    model = load_detector(session.latest_checkpoint() / "model.safetensors")
    db = read_roidb(roidb)
    boxes, scores, labels = detect(model, db.image(0), db.boxes(0), scale_px=300, max_size_px=500, score_thresh=0.0)
    assert len(boxes) == 100 and (np.diff(scores) <= 0).all() and labels.min() >= 1
    # without box regression every detection is one of the proposals, at the image's own scale
    assert all((np.abs(db.boxes(0) - b).max(1) < 1e-4).any() for b in boxes)
    dets, seconds = detect_all(model, db, scale_px=300, max_size_px=500, score_thresh=0.0, loader_workers=0,
                               progress=False)
    assert len(dets) == 20 and all(len(v) == len(db) for v in dets.values()) and seconds > 0
    got = np.concatenate([dets[c][0] for c in dets])
    np.testing.assert_allclose(np.sort(got[:, 4])[::-1], scores, rtol=1e-5)


@pytest.fixture
def ray_local(monkeypatch):
    """A private 2-CPU Ray instance for one test; its workers import this repository (the probe)."""
    import ray

    from infra.ray_edge import connect

    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *paths]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    connect(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_two_ddp_workers_on_ray_train(tmp_path, roidb, ray_local):
    from infra.ray_edge import ray_train

    fn = probe(train_detector, "transfer.engine", tmp_path / "ranks")
    final = ray_train(fn, _spec(tmp_path, roidb, box_regression=True), name="det",
                      storage_path=tmp_path / "ray", num_workers=2, use_gpu=False)
    tensors, meta = load_weights(final / "model.safetensors")
    assert meta["step"] == 4 and meta["detector"]["box_regression"]
    steps = [line for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4  # rank 0 alone writes the log
    assert_ranks_agree(tmp_path / "ranks", final, world_size=2)  # one process group of 2, one set of weights


def test_box_regression_trains_and_decodes_inside_the_image(tmp_path, roidb):
    session = LocalSession(tmp_path / "ckpt", device=torch.device("cpu"))
    metrics = train_detector(_spec(tmp_path, roidb, iterations=2, box_regression=True), session)
    assert np.isfinite(metrics["loss_box"]) and metrics["loss"] > metrics["loss_cls"]
    model = load_detector(session.latest_checkpoint() / "model.safetensors")
    db = read_roidb(roidb)
    h, w = db.sizes[0]
    boxes, scores, labels = detect(model, db.image(0), db.boxes(0), scale_px=300, max_size_px=500, score_thresh=0.0)
    assert len(boxes) == 100
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w - 1).all() and (boxes[:, 3] <= h - 1).all()
