"""Shared fixtures: small real shards built from the photos shipped in scikit-image/scikit-learn."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.build import build_shards
from shards.sources import list_items
from shards.writer import PatchParams

REPO = Path(__file__).resolve().parents[1]

# `pretrain/run.py` arguments for a whole pipeline run at toy size (demo photos, 6 patches each)
# stages 3-5 at toy size: one round, a few steps of a narrow trunk, one code length
TOY_TRAIN = [
    "--set", "train.rounds=1", "--set", "train.width=0.125", "--set", "train.max_steps_per_round=3",
    "--set", "train.global_batch=16", "--set", "hash.max_steps=3", "--set", "hash.global_batch=16",
    "--set", "hash.code_bits=16", "--set", "hash.extra_bits=[]",
]
TOY_RUN = [
    "--set", "data.patches_per_image=6", "--set", "data.images_per_shard=5", "--set", "tracking.wandb=offline",
    "--set", "features.out_dim=16", "--set", "features.gmm_components=4", "--set", "features.desc_pca_dim=16",
    *TOY_TRAIN,
]


def make_image_folder(root: Path, classes=("cat", "coffee"), per_class=3, size=(160, 200)) -> Path:
    """An ImageNet-layout folder of real JPEGs cut from the sample photos."""
    import skimage.data

    photos = {"cat": skimage.data.chelsea(), "coffee": skimage.data.coffee(), "rocket": skimage.data.rocket()}
    for cls in classes:
        (root / cls).mkdir(parents=True)
        img = photos[cls]
        for i in range(per_class):
            y, x = 10 * i, 15 * i
            Image.fromarray(img[y : y + size[0], x : x + size[1]]).save(root / cls / f"{cls}_{i}.jpg", quality=92)
    return root


@pytest.fixture(scope="session")
def small_params() -> PatchParams:
    return PatchParams(patch_px=32, patches_per_image=10, scale_range=(0.3, 0.6), patches_per_record=4, seed=3)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, small_params) -> Path:
    """6 images x 10 patches = 60 patches in 3 shards of 20; records of 4 patches."""
    src = make_image_folder(tmp_path_factory.mktemp("imgs"))
    out = tmp_path_factory.mktemp("shards")
    build_shards(list_items(str(src)), out, small_params, images_per_shard=2)
    return out


@pytest.fixture
def shard_copy(shard_dir, tmp_path) -> Path:
    """A private copy of the shards that a test may damage."""
    dst = tmp_path / "shards"
    shutil.copytree(shard_dir, dst)
    return dst


def run_cli(args: list[str], cwd: Path = REPO, env_extra: dict | None = None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def rgb_noise(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server (its own process, real HTTP on 127.0.0.1) for the whole session; the standard AWS_*
    variables point every client of this process, and the processes it starts, at it."""
    from infra import s3local

    log = tmp_path_factory.mktemp("moto") / "server.log"
    with s3local.s3_server(log_path=str(log)) as endpoint:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in s3local.env(endpoint).items():
                mp.setenv(k, v)
            yield endpoint


@pytest.fixture
def bucket(s3_endpoint, request) -> str:
    """A fresh bucket on the S3 server -> its URI, s3://NAME."""
    from infra import s3local

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-") \
        + "-" + os.urandom(3).hex()
    s3local.make_bucket(s3_endpoint, name)
    return f"s3://{name}"
