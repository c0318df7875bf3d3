"""Batched on-device augmentation: shapes, identity, flips, determinism, per-sample parameters."""
from __future__ import annotations

import pytest
import torch

from pretrain.train.augment import AugmentParams, apply_params, augment, sample_params, to_input

NO_JITTER = dict(brightness=0.0, contrast=0.0, saturation=0.0)


def patches(n=6, px=24, seed=0) -> torch.Tensor:
    """(n, px, px, 3) uint8 with structure (gradients + noise), so crops and flips are visible."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, px)
    base = torch.stack([ramp[None, :].expand(px, px), ramp[:, None].expand(px, px), ramp.flip(0)[None, :]
                        .expand(px, px)], -1)
    noise = torch.randint(0, 55, (n, px, px, 3), generator=g)
    return (base[None] + noise).to(torch.uint8)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_shape_dtype_and_range():
    x = patches()
    out = augment(x, generator=gen(0), out_px=16)
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert not out.requires_grad
    ref = to_input(x)
    assert ref.shape == (6, 3, 24, 24) and ref.min() >= -1 and ref.max() <= 1
    torch.testing.assert_close(ref, x.permute(0, 3, 1, 2).float() / 127.5 - 1)


@pytest.mark.parametrize("out_px", [24, 16, 40])
def test_identity_settings_reproduce_to_input(out_px):
    x = patches()
    out = augment(x, generator=gen(1), out_px=out_px, scale=(1, 1), ratio=(1, 1), flip=False, **NO_JITTER)
    torch.testing.assert_close(out, to_input(x, out_px), rtol=0, atol=1e-5)


def test_float_input_is_treated_like_uint8():
    x = patches()
    xf = x.permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(augment(xf, generator=gen(2), out_px=20), augment(x, generator=gen(2), out_px=20))


def test_forced_flip_mirrors():
    x = patches(n=4)
    n = len(x)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(n, 1)
    ones = torch.ones(n)
    flipped = AugmentParams(full, torch.ones(n, dtype=torch.bool), ones, ones, ones)
    plain = AugmentParams(full, torch.zeros(n, dtype=torch.bool), ones, ones, ones)
    torch.testing.assert_close(apply_params(x, flipped, 24), apply_params(x, plain, 24).flip(-1), rtol=0, atol=1e-5)
    # a sampled flip with no other change is one of the two
    out = augment(x, generator=gen(3), out_px=24, scale=(1, 1), ratio=(1, 1), **NO_JITTER)
    ref = to_input(x)
    for i in range(n):
        assert torch.allclose(out[i], ref[i], atol=1e-5) or torch.allclose(out[i], ref[i].flip(-1), atol=1e-5)


def test_crop_samples_the_right_region():
    x = patches(n=1, px=32)
    # the left half of the image, full height: centre x = -0.5, half-size (0.5, 1)
    params = AugmentParams(torch.tensor([[-0.5, 0.0, 0.5, 1.0]]), torch.zeros(1, dtype=torch.bool),
                           torch.ones(1), torch.ones(1), torch.ones(1))
    out = apply_params(x, params, 32)  # (1, 3, 32, 32): source columns 0..15 stretched 2x
    ref = to_input(x)
    # output column k samples source column u = k/2 - 1/4 (pixel centres, align_corners=False)
    u = (torch.arange(32) / 2 - 0.25).clamp(min=0)
    i0 = u.floor().long()
    t = u - i0
    want = ref[..., i0] * (1 - t) + ref[..., i0 + 1] * t
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_same_seed_same_output_different_seed_different_output():
    x = patches()
    a = augment(x, generator=gen(5), out_px=20)
    b = augment(x, generator=gen(5), out_px=20)
    c = augment(x, generator=gen(6), out_px=20)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


def test_parameters_differ_within_a_batch():
    p = sample_params(64, generator=gen(7))
    for t in (p.crop[:, 0], p.crop[:, 2], p.brightness, p.contrast, p.saturation):
        assert t.unique().numel() == 64
    assert 10 < int(p.flip.sum()) < 54
    assert (p.crop[:, 2:] <= 1).all() and (p.crop[:, :2].abs() <= 1 - p.crop[:, 2:] + 1e-6).all()
    area = p.crop[:, 2] * p.crop[:, 3]
    assert ((area >= 0.6 - 1e-5) & (area <= 1 + 1e-5)).all()
    aspect = p.crop[:, 2] / p.crop[:, 3]
    assert ((aspect >= 3 / 4 - 1e-5) & (aspect <= 4 / 3 + 1e-5)).all()
    # identical inputs, different views
    x = patches(n=1).repeat(8, 1, 1, 1)
    out = augment(x, generator=gen(8), out_px=20)
    assert all(not torch.allclose(out[0], out[i], atol=1e-3) for i in range(1, 8))


def test_colour_jitter_factors_apply_per_sample():
    x = patches(n=2)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(2, 1)
    ones, no_flip = torch.ones(2), torch.zeros(2, dtype=torch.bool)
    dark = AugmentParams(full, no_flip, torch.tensor([0.5, 1.0]), ones, ones)
    out = apply_params(x, dark, 24)
    ref = to_input(x)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-5)
    torch.testing.assert_close((out[0] + 1) / 2, (ref[0] + 1) / 2 * 0.5, rtol=0, atol=1e-5)
    gray = apply_params(x, AugmentParams(full, no_flip, ones, ones, torch.zeros(2)), 24)
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-5)
    # zero contrast: every pixel of an image becomes that image's own mean luma
    flat = apply_params(x, AugmentParams(full, no_flip, ones, torch.zeros(2), ones), 24)
    luma = (torch.tensor([0.299, 0.587, 0.114])[:, None, None] * (ref + 1) / 2).sum(1).mean((1, 2))  # (2,)
    torch.testing.assert_close((flat + 1) / 2, luma.view(2, 1, 1, 1).expand_as(flat), rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_matches_cpu_given_the_same_cpu_generator():
    x = patches()
    cpu = augment(x, generator=gen(9), out_px=20)
    cuda = augment(x.cuda(), generator=gen(9), out_px=20)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-4)
    g = torch.Generator(device="cuda").manual_seed(9)
    assert augment(x.cuda(), generator=g, out_px=20).shape == (6, 3, 20, 20)
