"""The detector and its converter: exact key sets, BatchNorm folding, RoI geometry, inits."""
import pytest
import torch
import torch.nn.functional as F

from pretrain.models.weights import WeightsError
from tests.transfer.fixtures import trained_like_trunk, write_final
from transfer.model import CONVS, FastRCNN, build_detector, load_conv_weights, read_conv_weights


def test_conv_weights_are_the_trunk_with_batchnorm_folded(tmp_path):
    trunk = trained_like_trunk()
    ckpt = write_final(tmp_path / "final.safetensors", trunk)
    det = build_detector(ckpt=str(ckpt), fc_dim=64).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = trunk.features(x, "conv5")  # post-ReLU, after pool5, flattened
        got = F.max_pool2d(det.conv_features(x), 3, 2).flatten(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert det.feature_stride == 16 and det.width == 0.25


def test_the_checkpoint_must_hold_exactly_its_trunk(tmp_path):
    trunk = trained_like_trunk()
    missing = write_final(tmp_path / "missing.safetensors", trunk, drop="conv3.weight")
    with pytest.raises(WeightsError, match=r"missing conv3\.weight; unexpected none"):
        read_conv_weights(missing)
    extra = write_final(tmp_path / "extra.safetensors", trunk, extra={"conv6.weight": torch.zeros(3)})
    with pytest.raises(WeightsError, match=r"missing none; unexpected conv6\.weight"):
        read_conv_weights(extra)
    wrong_width = write_final(tmp_path / "wide.safetensors", trunk, width=0.5)
    with pytest.raises(WeightsError, match="shapes do not match"):
        read_conv_weights(wrong_width)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        read_conv_weights(tmp_path / "junk.safetensors")


def test_the_detector_gets_exactly_conv1_to_5(tmp_path):
    state, _ = read_conv_weights(write_final(tmp_path / "f.safetensors", trained_like_trunk()))
    assert set(state) == {f"{c}.{p}" for c in CONVS for p in ("weight", "bias")}
    det = FastRCNN("alexnet96", 0.25, fc_dim=32)
    load_conv_weights(det, state)
    with pytest.raises(WeightsError, match=r"missing conv2\.bias"):
        load_conv_weights(det, {k: v for k, v in state.items() if k != "conv2.bias"})
    with pytest.raises(WeightsError, match=r"unexpected fc8\.weight"):
        load_conv_weights(det, {**state, "fc8.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="do not fit the detector"):
        load_conv_weights(FastRCNN("alexnet96", 0.5, fc_dim=32), state)


def test_forward_shapes_and_roi_geometry():
    det = FastRCNN("alexnet96", 0.25, fc_dim=32, box_regression=True).eval()
    images = torch.randn(2, 3, 160, 224)
    rois = torch.tensor([[0, 0, 0, 63, 63], [1, 10, 20, 200, 150], [1, 0, 0, 223, 159]], dtype=torch.float32)
    logits, deltas = det(images, rois)
    assert logits.shape == (3, 21) and deltas.shape == (3, 84)
    # 160 -conv1-> 40 -pool-> 19 -pool-> 9 (unpadded pools floor), 224 -> 56 -> 27 -> 13: about H/16, W/16
    assert det.conv_features(images).shape[-2:] == (9, 13)
    # a RoI sees only its own image: changing image 0 leaves image 1's RoIs alone
    images2 = images.clone()
    images2[0] += 1
    torch.testing.assert_close(det(images2, rois)[0][1:], logits[1:])


def test_inits_are_seeded_and_random_needs_no_checkpoint(tmp_path):
    a = build_detector(init="random", width=0.25, fc_dim=32, seed=3)
    b = build_detector(init="random", width=0.25, fc_dim=32, seed=3)
    c = build_detector(init="random", width=0.25, fc_dim=32, seed=4)
    assert torch.equal(a.conv3.weight, b.conv3.weight) and not torch.equal(a.conv3.weight, c.conv3.weight)
    assert abs(a.fc6.weight.std().item() - 0.01) < 1e-3 and a.fc6.bias.abs().max() == 0
    # He-normal: a conv's output keeps roughly the scale of its input
    x = torch.randn(4, a.conv2.in_channels, 20, 20)
    assert 0.5 < F.relu(a.conv2(x)).pow(2).mean().item() / x.pow(2).mean().item() * 2 < 2.0
    with pytest.raises(WeightsError, match="needs --ckpt"):
        build_detector(init="pretrained")
    # random init with a checkpoint: its arch and width, none of its weights
    ckpt = write_final(tmp_path / "f.safetensors", trained_like_trunk())
    r = build_detector(ckpt=str(ckpt), init="random", fc_dim=32)
    p = build_detector(ckpt=str(ckpt), init="pretrained", fc_dim=32)
    assert r.conv1.weight.shape == p.conv1.weight.shape and not torch.equal(r.conv1.weight, p.conv1.weight)
