"""A local S3-compatible server for tests and rehearsals: moto's server, as its own process on 127.0.0.1.

Real HTTP and the real S3 protocol (nothing patched in-process); clients find it the standard way,
through AWS_ENDPOINT_URL and the AWS_* credential variables that `env()` returns.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(endpoint: str) -> dict[str, str]:
    """The variables that point boto/s3fs/pyarrow clients at `endpoint` with test credentials."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextmanager
def s3_server(port: int | None = None, log_path: str | None = None) -> Iterator[str]:
    """Runs `moto_server` on 127.0.0.1 until the block ends -> its endpoint URL."""
    port = port or free_port()
    log = open(log_path or os.devnull, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint} (exit {proc.poll()})") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)


def main(argv=None) -> int:
    """`python -m infra.s3local --port 9000 --bucket bucket`: serves until Ctrl-C, printing the exports."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m infra.s3local", description="a local S3 server (moto) for trying "
                                "discoattr on s3:// URIs")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    args = p.parse_args(argv)
    with s3_server(args.port) as endpoint:
        for b in args.bucket:
            make_bucket(endpoint, b)
        print("S3 server at", endpoint, "- in another shell:", flush=True)
        for k, v in env(endpoint).items():
            print(f"export {k}={v}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
