"""Stage 1 init features: Fisher vectors against hand-computed values, descriptors against a loop,
encoder files, and the resumable per-shard extraction on the shared tiny shards."""
import json
import logging

import numpy as np
import pytest
from cyvlfeat.fisher import fisher

from pretrain.features import (FisherEncoder, encode, extract_features, fisher_vector_reference,
                               fisher_vectors, fit_fisher_encoder, fit_hog_encoder, hog_features,
                               local_descriptors)
from pretrain.features.descriptors import COLOR_SCALE, color_stats, frame_grid
from pretrain.features.extract import DONE, ENCODER, PARTS, encode_shard
from pretrain.parts import assemble
from infra.ray_edge import serial_map
from infra.storage import sha256_file
from shards.store import PatchStore
from tests.conftest import rgb_noise

FV = dict(step_px=4, bin_px=4, desc_pca_dim=16, gmm_components=4, out_dim=8)


def ssqrt_l2(v):
    v = np.sign(v) * np.sqrt(np.abs(v))
    return v / np.linalg.norm(v)


def f32(*arrays):
    return [np.asarray(a, np.float32) for a in arrays]


# --- Fisher vectors -------------------------------------------------------------------------------

def test_fv_of_one_gaussian_by_hand():
    # K=1 at the origin with unit variance: posteriors are 1, z = x, u = mean(x), v = mean(x^2 - 1)/sqrt(2)
    x, means, covars, priors = f32([[1, 0], [-1, 0], [0, 2]], [[0, 0]], [[1, 1]], [1])
    u = [0, 2 / 3]
    v = [(2 / 3 - 1) / np.sqrt(2), (4 / 3 - 1) / np.sqrt(2)]
    want = ssqrt_l2(np.array(u + v))
    np.testing.assert_allclose(fisher(x, means, covars, priors, improved=True), want, atol=1e-6)
    np.testing.assert_allclose(fisher_vector_reference(x, means, covars, priors), want, atol=1e-12)


def test_fv_layout_is_all_first_order_then_all_second_order():
    # two far-apart Gaussians: posteriors are exactly 0/1, so the blocks can be written down
    x, means, covars, priors = f32([[-9, 0], [-11, 1], [10, 2]], [[-10, 0], [10, 0]], [[1, 1], [1, 1]],
                                   [0.5, 0.5])
    n, s = 3, np.sqrt(0.5)
    u1, u2 = np.array([0, 1]) / (n * s), np.array([0, 2]) / (n * s)
    v1, v2 = np.array([0, -1]) / (n * 1.0), np.array([-1, 3]) / (n * 1.0)  # sqrt(2 * 0.5) = 1
    got = fisher(x, means, covars, priors, improved=True)
    assert got.shape == (2 * 2 * 2,)
    np.testing.assert_allclose(got, ssqrt_l2(np.concatenate([u1, u2, v1, v2])), atol=1e-6)
    assert not np.allclose(got, ssqrt_l2(np.concatenate([u1, v1, u2, v2])), atol=1e-3)


def test_reference_matches_cyvlfeat_on_random_gmm():
    rng = np.random.default_rng(0)
    k, d = 3, 5
    x, means = f32(rng.normal(size=(40, d)), rng.normal(size=(k, d)))
    covars, priors = f32(rng.uniform(0.5, 2, (k, d)), rng.dirichlet(np.ones(k)))
    got = fisher(x, means, covars, priors, improved=True)
    assert got.shape == (2 * k * d,)
    np.testing.assert_allclose(got, fisher_vector_reference(x, means, covars, priors), atol=1e-5)


# --- local descriptors ------------------------------------------------------------------------------

def test_local_descriptor_shapes():
    patches = rgb_noise((3, 32, 32, 3))
    desc = local_descriptors(patches, 4, 4)
    assert desc.shape == (3, len(frame_grid(32, 4, 4)), 134) and desc.dtype == np.float32
    assert local_descriptors(rgb_noise((2, 48, 48, 3)), 8, 8).shape == (2, len(frame_grid(48, 8, 8)), 134)
    with pytest.raises(ValueError):
        local_descriptors(patches, 4, 12)  # a 48px descriptor does not fit a 32px patch


def test_colour_of_a_flat_patch_is_its_colour_with_zero_std():
    colour = np.array([10, 200, 77], np.uint8)
    desc = local_descriptors(np.broadcast_to(colour, (2, 32, 32, 3)).copy(), 4, 4)
    want = np.concatenate([colour / 255.0, np.zeros(3)]) * COLOR_SCALE
    np.testing.assert_allclose(desc[..., 128:].reshape(-1, 6), np.tile(want, (2 * desc.shape[1], 1)),
                               rtol=1e-6)
    assert np.all(desc[..., 128 + 3:] == 0)
    assert np.all(desc[..., :128] == 0)  # no gradients, no SIFT


@pytest.mark.parametrize("step,bin_px", [(4, 4), (6, 5), (8, 12)])  # 8/12: the float64 path
def test_colour_stats_against_a_loop(step, bin_px):
    patches = rgb_noise((3, 48, 48, 3), seed=1)
    got = color_stats(patches, step, bin_px)
    for f, (cy, cx) in enumerate(frame_grid(48, step, bin_px)):
        y0, x0 = int(round(cy - 2 * bin_px)), int(round(cx - 2 * bin_px))
        window = patches[:, max(y0, 0):y0 + 4 * bin_px, max(x0, 0):x0 + 4 * bin_px] / 255.0
        window = window.reshape(3, -1, 3)
        np.testing.assert_allclose(got[:, f], np.concatenate([window.mean(1), window.std(1)], 1), atol=1e-6)


# --- encoders ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def patches(shard_dir):
    return PatchStore(shard_dir).get(np.arange(60))


@pytest.fixture(scope="module")
def fv_encoder(patches):
    return fit_fisher_encoder(patches[:40], seed=0, **FV)


def test_fisher_vectors_have_length_2kd(fv_encoder, patches):
    fv = fisher_vectors(patches[:5], fv_encoder)
    assert fv.shape == (5, 2 * FV["gmm_components"] * FV["desc_pca_dim"]) and fv.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fv, axis=1), 1, rtol=1e-5)  # improved FV: L2-normalised


def test_fit_is_deterministic(fv_encoder, patches):
    again = fit_fisher_encoder(patches[:40], seed=0, **FV)
    np.testing.assert_array_equal(encode(patches, again), encode(patches, fv_encoder))


@pytest.mark.parametrize("kind", ["fv", "hog"])
def test_encoder_save_load_round_trip(kind, fv_encoder, patches, tmp_path):
    enc = fv_encoder if kind == "fv" else fit_hog_encoder(patches[:40], cell_px=8, out_dim=8, seed=0)
    enc.save(tmp_path / "enc.npz")
    with np.load(tmp_path / "enc.npz", allow_pickle=False) as z:
        assert {"kind", "settings", "white_proj"} <= set(z.files)
    back = FisherEncoder.load(tmp_path / "enc.npz")
    assert back.kind == kind and back.settings == enc.settings
    out = encode(patches, back)
    assert out.shape == (60, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out, encode(patches, enc))


def test_out_dim_is_clipped_to_the_sample_and_nonsense_refused(patches, caplog):
    with caplog.at_level(logging.WARNING):
        enc = fit_hog_encoder(patches[:6], cell_px=8, out_dim=20, seed=0)
    assert enc.out_dim == 5 and "clipped" in caplog.text
    for bad in (0, 300):
        with pytest.raises(ValueError, match="out_dim"):
            fit_hog_encoder(patches[:6], cell_px=8, out_dim=bad, seed=0)


def test_hog_features_shape(patches):
    assert hog_features(patches[:3], 8).shape == (3, 4 * 4 * 31)
    assert hog_features(patches[:3], 4).shape == (3, 8 * 8 * 31)


# --- the stage -------------------------------------------------------------------------------------

def run(shard_dir, out, mapper=serial_map, kind="fv", **overrides):
    settings = dict(FV if kind == "fv" else dict(cell_px=8, out_dim=8), **overrides)
    return extract_features(shard_dir, out, kind=kind, mapper=mapper, fit_sample_patches=40, seed=0,
                            **settings)


@pytest.fixture(scope="module")
def clean_run(shard_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    return run(shard_dir, out), out


def test_extract_writes_aligned_float16_rows(clean_run, patches):
    result, out = clean_run
    assert result["patches"] == 60 and result["dim"] == 8 and result["encoded_shards"] == 3
    features = np.load(result["features"])
    assert features.shape == (60, 8) and features.dtype == np.float16
    enc = FisherEncoder.load(result["encoder"])
    np.testing.assert_allclose(features, encode(patches, enc), rtol=2e-3, atol=2e-3)
    done = json.loads((out / DONE).read_text())
    assert done["features"]["sha256"] == sha256_file(result["features"])
    assert not (out / PARTS).exists()  # the parts are removed once assembled
    assert sorted(p.name for p in out.iterdir()) == sorted([DONE, ENCODER, "round0.npy"])


def killed_at(stop):
    """A serial mapper that dies when it reaches a call of `stop` (e.g. the assembly task)."""
    def mapper(fn, arg_tuples, **kw):
        if fn is stop:
            raise KeyboardInterrupt("killed")
        return serial_map(fn, arg_tuples, **kw)
    return mapper


def parts_of(out):
    return sorted(p.name for p in (out / PARTS).iterdir())


def test_killed_run_resumes_with_the_missing_shards(shard_dir, clean_run, tmp_path, caplog):
    def killed_after_one(fn, arg_tuples, **kw):
        if fn is not encode_shard:
            return serial_map(fn, arg_tuples, **kw)
        fn(*arg_tuples[0])
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run(shard_dir, tmp_path, mapper=killed_after_one)
    assert len(parts_of(tmp_path)) == 1 and not (tmp_path / "round0.npy").exists()
    with caplog.at_level(logging.INFO):
        result = run(shard_dir, tmp_path)
    assert result["encoded_shards"] == 2 and "resuming" in caplog.text
    np.testing.assert_array_equal(np.load(result["features"]), np.load(clean_run[0]["features"]))
    assert run(shard_dir, tmp_path)["encoded_shards"] == 0


def test_a_run_killed_before_assembling_encodes_nothing_again(shard_dir, clean_run, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(shard_dir, tmp_path, mapper=killed_at(assemble))
    assert len(parts_of(tmp_path)) == 3 and not (tmp_path / DONE).exists()
    result = run(shard_dir, tmp_path)
    assert result["encoded_shards"] == 0
    assert (tmp_path / "round0.npy").read_bytes() == clean_run[1].joinpath("round0.npy").read_bytes()


def test_parts_not_vouched_for_are_recomputed(shard_dir, clean_run, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(shard_dir, tmp_path, mapper=killed_at(assemble))
    first, second, third = parts_of(tmp_path)
    (tmp_path / PARTS / second).unlink()  # shard 2's part is gone
    stale = third.split("-")
    stale[3] = "0" * 12 + ".npy"  # shard 3's part made by another encoder
    (tmp_path / PARTS / third).rename(tmp_path / PARTS / "-".join(stale))
    (tmp_path / PARTS / ("." + second + ".123.tmp")).write_bytes(b"torn")  # a write that never finished
    result = run(shard_dir, tmp_path)
    assert result["encoded_shards"] == 2
    assert (tmp_path / "round0.npy").read_bytes() == clean_run[1].joinpath("round0.npy").read_bytes()


def test_a_stale_features_file_is_not_trusted(shard_dir, clean_run, tmp_path):
    run(shard_dir, tmp_path)
    np.lib.format.open_memmap(tmp_path / "round0.npy", mode="r+")[:5] = 0  # damaged: same size, wrong rows
    done = json.loads((tmp_path / DONE).read_text())
    (tmp_path / DONE).write_text(json.dumps(done | {"key": "another run"}))
    assert run(shard_dir, tmp_path)["encoded_shards"] == 3
    assert (tmp_path / "round0.npy").read_bytes() == clean_run[1].joinpath("round0.npy").read_bytes()


def test_changed_settings_refit_the_encoder_and_reencode_everything(shard_dir, tmp_path):
    run(shard_dir, tmp_path)
    before = json.loads((tmp_path / DONE).read_text())
    old_sha = sha256_file(tmp_path / ENCODER)
    with pytest.raises(KeyboardInterrupt):
        run(shard_dir, tmp_path, mapper=killed_at(assemble), out_dim=6)
    assert not (tmp_path / DONE).exists()  # round0.npy is no longer vouched for
    assert all(name.split("-")[3][:12] != old_sha[:12] for name in parts_of(tmp_path))
    result = run(shard_dir, tmp_path, out_dim=6)
    assert result["encoded_shards"] == 0 and result["dim"] == 6  # the parts of the killed run are kept
    assert np.load(result["features"]).shape == (60, 6)
    assert json.loads((tmp_path / DONE).read_text())["key"] != before["key"]
    assert run(shard_dir, tmp_path, out_dim=8)["encoded_shards"] == 3


def test_unknown_setting_is_a_clear_error(shard_dir, tmp_path):
    with pytest.raises(ValueError, match="valid"):
        run(shard_dir, tmp_path, cell_size=4)


def test_hog_end_to_end(shard_dir, patches, tmp_path):
    result = run(shard_dir, tmp_path, kind="hog")
    assert result["encoded_shards"] == 3 and (tmp_path / ENCODER).is_file()
    enc = FisherEncoder.load(result["encoder"])
    assert enc.kind == "hog" and enc.gmm_means.size == 0
    np.testing.assert_allclose(np.load(result["features"]), encode(patches, enc), rtol=2e-3, atol=2e-3)
