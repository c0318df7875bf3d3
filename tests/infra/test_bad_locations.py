"""A location that cannot be used is one line and exit 2, before anything is written: both drivers."""
import os

import pytest

from infra import storage
from pretrain import run as pretrain_run
from transfer import voc07


def _cases(bucket, s3_endpoint):
    good = {}
    return [
        ("ftp://host/runs/x", good, "unknown URI scheme ftp://"),
        ("s3://no-such-bucket-anywhere/runs/x", good, "does not exist"),
        (f"{bucket}/runs/x", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot reach"),
        (f"{bucket}/runs/x", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                              "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull},
         "no S3 credentials"),
    ]


@pytest.mark.parametrize("driver", ["pretrain", "transfer"])
def test_bad_run_directories(driver, bucket, s3_endpoint, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    for run_dir, env, message in _cases(bucket, s3_endpoint):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.delenv(k, raising=False) if v is None else m.setenv(k, v)
            if driver == "pretrain":
                code = pretrain_run.main(["--run-dir", run_dir, "--set", "tracking.wandb=disabled"])
            else:
                code = voc07.main(["--init", "random", "--run-dir", run_dir, "--set", "tracking.wandb=disabled"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, (run_dir, err)
    assert list(tmp_path.iterdir()) == []  # no local 'ftp:' or 's3:' folder
    assert storage.list_names(storage.to_path(bucket)) == [] and not list(storage.to_path(bucket).rglob("*"))
