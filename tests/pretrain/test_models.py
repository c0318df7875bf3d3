"""The trunks (shapes, the conv1..fc7 key contract, BN folding) and the cluster and hashing heads."""
from __future__ import annotations

import math

import pytest
import torch

from pretrain.models.alexnet import ARCHS, LAYERS, ClusterHead, HashHead, build_trunk, fold_batchnorm

# Per-sample activation shapes at width 1 (conv1, conv2, conv5 after their pools).
SHAPES = {
    "alexnet96": {"conv1": (96, 11, 11), "conv2": (256, 5, 5), "conv3": (384, 5, 5), "conv4": (384, 5, 5),
                  "conv5": (256, 2, 2), "fc6": (4096,), "fc7": (4096,)},
    "alexnet32": {"conv1": (64, 15, 15), "conv2": (128, 7, 7), "conv3": (192, 7, 7), "conv4": (192, 7, 7),
                  "conv5": (128, 3, 3), "fc6": (512,), "fc7": (512,)},
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("width", [1.0, 0.25])
def test_output_and_feature_shapes(arch, width):
    torch.manual_seed(0)
    trunk = build_trunk(arch, width).eval()
    px = trunk.input_px
    assert px == {"alexnet96": 96, "alexnet32": 32}[arch]
    x = torch.randn(2, 3, px, px)
    with torch.no_grad():
        out = trunk(x)
        feats = {layer: trunk.features(x, layer) for layer in LAYERS}
    expected = {k: (round(v[0] * width), *v[1:]) for k, v in SHAPES[arch].items()}
    assert trunk.layer_shapes == expected
    assert out.shape == (2, trunk.feature_dim) and trunk.feature_dim == expected["fc7"][0]
    for layer in LAYERS:
        assert feats[layer].shape == (2, math.prod(expected[layer])), layer
        assert (feats[layer] >= 0).all(), layer  # post-ReLU
    assert torch.equal(feats["fc7"], out)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_state_dict_keys_follow_the_transfer_contract(arch):
    trunk = build_trunk(arch, 0.25)
    sd = trunk.state_dict()
    weights = sorted(k for k in sd if k.endswith(".weight") and not k.startswith("bn"))
    assert weights == sorted(f"{name}.weight" for name in LAYERS)
    assert sd["conv1.weight"].shape == (trunk.layer_shapes["conv1"][0], 3, *trunk.conv1.kernel_size)
    assert isinstance(trunk.conv1, torch.nn.Conv2d) and torch.equal(sd["conv1.weight"], trunk.conv1.weight)
    assert sd["fc7.weight"].shape == (trunk.feature_dim, trunk.feature_dim)
    plain = build_trunk(arch, 0.25, batchnorm=False).state_dict()
    assert sorted(plain) == sorted(f"{name}.{p}" for name in LAYERS for p in ("weight", "bias"))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_folded_batchnorm_equals_trunk_in_eval_mode(arch):
    torch.manual_seed(1)
    trunk = build_trunk(arch, 0.25)
    px = trunk.input_px
    with torch.no_grad():  # give the BatchNorms non-trivial running statistics and affine parameters
        for _ in range(3):
            trunk(torch.rand(8, 3, px, px) * 3 + 1)
        for m in trunk.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-0.5, 0.5)
    plain = build_trunk(arch, 0.25, batchnorm=False)
    plain.load_state_dict(fold_batchnorm(trunk), strict=True)
    x = torch.rand(4, 3, px, px) * 3 + 1
    with torch.no_grad():
        for layer in ("conv3", "fc7"):
            torch.testing.assert_close(plain.eval().features(x, layer), trunk.eval().features(x, layer),
                                       rtol=1e-4, atol=1e-4)


def test_wrong_input_size_and_names_raise_value_error():
    trunk = build_trunk("alexnet32", 0.25)
    with pytest.raises(ValueError, match="expected input"):
        trunk(torch.randn(2, 3, 96, 96))
    with pytest.raises(ValueError, match="expected input"):
        trunk(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="layer must be"):
        trunk.features(torch.randn(2, 3, 32, 32), "fc8")
    with pytest.raises(ValueError, match="arch must be"):
        build_trunk("vgg16")


def test_cluster_head_gives_logits():
    head = ClusterHead(16, 7)
    assert head(torch.randn(5, 16)).shape == (5, 7)


def test_hash_head_codes_scores_and_relaxed_codes_agree():
    torch.manual_seed(2)
    head = HashHead(12, 8).eval()
    f = torch.randn(50, 12)
    s, b, c = head.scores(f), head(f), head.codes(f)
    assert s.shape == b.shape == c.shape == (50, 8) and c.dtype == torch.uint8
    assert torch.equal(c, (s > 0).to(torch.uint8))
    assert ((b > -1) & (b < 1)).all()
    assert torch.equal(b > 0, c.bool())
    torch.testing.assert_close(b, 2 * torch.sigmoid(s) - 1)  # Eq. 3
    torch.testing.assert_close(head.weight.T @ head.weight, torch.eye(8), rtol=0, atol=1e-5)


def test_hash_head_mean_moves_in_train_mode_only():
    torch.manual_seed(3)
    head = HashHead(6, 4, momentum=0.1)
    f1, f2 = torch.randn(32, 6) + 5, torch.randn(32, 6) - 2
    head.train()(f1)
    torch.testing.assert_close(head.mean, f1.mean(0))  # the first batch replaces the zero start
    head(f2)
    torch.testing.assert_close(head.mean, 0.9 * f1.mean(0) + 0.1 * f2.mean(0))
    before = head.mean.clone()
    head.eval()(torch.randn(32, 6) + 100)
    assert torch.equal(head.mean, before)
    torch.testing.assert_close(head.scores(f1), (f1 - before) @ head.weight)


def test_hash_head_init_from_sets_mean_and_weight():
    head = HashHead(5, 3, momentum=0.5)
    mean, proj = torch.arange(5.0), torch.randn(5, 3)
    head.init_from(mean, proj)
    assert torch.equal(head.mean, mean) and torch.equal(head.weight.data, proj)
    head.train()(torch.zeros(4, 5))  # an initialised mean is blended, not replaced
    torch.testing.assert_close(head.mean, 0.5 * mean)
    with pytest.raises(ValueError, match="init_from expects"):
        head.init_from(torch.zeros(4), proj)


def test_equal_weights_make_equal_files_in_any_process(tmp_path):
    """safetensors orders its header by hash map; the written files must not depend on it (checksums in
    the manifest compare runs)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys, torch; from pretrain.models.weights import save_weights; "
            "save_weights(sys.argv[1], {'b': torch.zeros(2, 2), 'a': torch.ones(3)}, {'y': [1, 2], 'x': 1, 'z': 'q'})")
    outs = [tmp_path / f"w{i}.safetensors" for i in range(4)]
    for out in outs:
        subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, check=True, env={"PYTHONPATH": str(REPO)})
    assert len({o.read_bytes() for o in outs}) == 1
