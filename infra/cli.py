"""What the stage drivers' command lines share: the config, override, run-directory and redo flags, and
the checks on them (one-line ConfigErrors)."""
from __future__ import annotations

import argparse
import os

from infra import storage
from infra.configlib import ConfigError


def add_run_args(p: argparse.ArgumentParser, *, stages: tuple[str, ...], config_default: str, set_example: str,
                 run_dir_default: str) -> None:
    """--config, --set KEY=VALUE, --run-dir, --force STAGE, --print-config."""
    p.add_argument("--config", default=None, help=f"experiment YAML (default: {config_default})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override one config key, e.g. {set_example} (repeatable)")
    p.add_argument("--run-dir", default=None,
                   help=f"run directory, a path or bucket URI (default: {run_dir_default})")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help=f"redo {'|'.join(stages)}")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def check_force(force: list[str], stages: tuple[str, ...]) -> None:
    unknown = set(force) - set(stages)
    if unknown:
        raise ConfigError(f"--force: unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(stages)}")


def run_dir_of(given: str | None, default, ray_address: str = ""):
    """The run directory: `given`, else `default`; on a cluster it must be absolute or a bucket URI."""
    run_dir = storage.to_path(given) if given else storage.to_path(default)
    if (ray_address or os.environ.get("RAY_ADDRESS")) and not storage.is_remote(run_dir) \
            and not run_dir.is_absolute():
        raise ConfigError(f"on a cluster the run directory must be an absolute shared path, got {run_dir}")
    return run_dir
