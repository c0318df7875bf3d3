"""The detector on CUDA: training steps run and test-time detections match the CPU's."""
import numpy as np
import pytest
import torch

from infra.session import LocalSession
from tests.transfer.test_data import _scene
from transfer.data import read_roidb, write_roidb
from transfer.engine import DetectorSpec, detect, load_detector, train_detector

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_training_on_cuda_then_cpu_and_cuda_detections_agree(tmp_path):
    anns = [_scene(tmp_path, f"im{i}", rect=(20 + 5 * i, 30, 100 + 5 * i, 90)) for i in range(4)]
    rng = np.random.default_rng(0)
    props = {a.image_id: np.concatenate([a.boxes, rng.uniform(0, 140, (60, 2)).repeat(2, 1) + [0, 0, 40, 50]])
             .astype(np.float32) for a in anns}
    write_roidb(tmp_path / "db.npz", anns, props)
    spec = DetectorSpec(roidb=str(tmp_path / "db.npz"), out_dir=str(tmp_path / "out"), init="random", width=0.25,
                        fc_dim=64, iterations=6, checkpoint_every=6, log_every=2, scale_px=160, max_size_px=256,
                        loader_workers=0, progress=False)
    session = LocalSession(tmp_path / "ckpt", device=torch.device("cuda"))
    metrics = train_detector(spec.__dict__, session)
    assert metrics["step"] == 6 and np.isfinite(metrics["loss"])
    path = session.latest_checkpoint() / "model.safetensors"
    db = read_roidb(tmp_path / "db.npz")
    kw = dict(scale_px=160, max_size_px=256, score_thresh=0.0, max_per_image=20)
    cpu = detect(load_detector(path, "cpu"), db.image(0), db.boxes(0), device="cpu", **kw)
    gpu = detect(load_detector(path, "cuda"), db.image(0), db.boxes(0), device="cuda", **kw)
    np.testing.assert_allclose(np.sort(gpu[1]), np.sort(cpu[1]), rtol=1e-2, atol=1e-3)  # cuDNN convs run in TF32
