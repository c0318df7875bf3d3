"""Replays infra/deploy/Dockerfile's pip steps in a fresh virtual environment, then proves the install works.

    python scripts/replay_dockerfile.py                  # --extra cpu: what a machine without CUDA can install
    python scripts/replay_dockerfile.py --dry-run        # only the steps it would replay (no venv, seconds)
    python scripts/replay_dockerfile.py --extra gpu --keep /tmp/img-venv

No docker daemon is needed. Replayed: ARG and ENV (substituted into the commands and set in their
environment), WORKDIR + `COPY .` (the build context, i.e. the files git lists less
infra/deploy/Dockerfile.dockerignore, copied into a temporary directory that stands for the WORKDIR),
and every `pip ...` / `python ...` command of every RUN (split at `&&`), run by bash with the fresh venv's
bin first on PATH, in the order and with the flags the Dockerfile gives. Skipped, each said so: FROM (the
venv uses this machine's Python, not the image's), USER, apt-get and any other system command (the VLFeat
library must already be here: the header is checked), and with `--extra cpu` (the default) the RUNs marked
`# replay: gpu-only` and the `gpu` extra of the project install, since faiss-gpu-cu12-cuvs ships only
cp312 manylinux_2_39 wheels and needs CUDA. This machine's pip configuration (indexes, constraints) applies.
Then, from a directory outside the copied tree (so the installed package imports, not the sources), the
project's key modules are imported and used once (faiss k-means, cyvlfeat dense SIFT, a torch matmul,
ray's version, pretrain.run's argument parser).

Prints one JSON line per step and a final summary line; exits 1 when a step fails (its log's tail printed).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "infra" / "deploy" / "Dockerfile"
VLFEAT_HEADER = Path(os.environ.get("VLFEAT_PREFIX", "/usr")) / "include" / "vl" / "fisher.h"
REPLAYED = ("pip", "pip3", "python", "python3")
GPU_ONLY = "# replay: gpu-only"

CHECK = r"""
import json, sys
import numpy as np
import faiss, cyvlfeat, torch, ray
from cyvlfeat.sift import dsift
import pretrain.run
x = np.random.default_rng(0).standard_normal((256, 8)).astype("float32")
km = faiss.Kmeans(8, 4, niter=5, seed=0); km.train(x)
frames, desc = dsift(np.random.default_rng(0).random((32, 32)).astype("float32"), step=8, size=4, fast=True)
ns = pretrain.run.parse_args(["--config", sys.argv[1]])
print(json.dumps({
    "python": sys.version.split()[0], "faiss": faiss.__version__,
    "faiss_gpu_build": hasattr(faiss, "StandardGpuResources"), "faiss_kmeans_centroids": km.centroids.shape[0],
    "cyvlfeat_dsift_descriptors": list(desc.shape), "torch": torch.__version__,
    "torch_matmul": float((torch.ones(2, 2) @ torch.ones(2, 2)).sum()), "cuda": torch.cuda.is_available(),
    "ray": ray.__version__, "pretrain_run_from": pretrain.run.__file__, "entrypoint_config": ns.config}))
"""


def instructions(text: str):
    """(keyword, argument text, directives) per instruction; continuation lines joined, comments dropped."""
    out, directives, buf = [], set(), ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            if not buf and s.startswith(GPU_ONLY):
                directives.add("gpu-only")
            continue  # a comment, also inside a continued instruction (Docker drops those too)
        if not s and not buf:
            continue
        buf += s[:-1].rstrip() + " " if s.endswith("\\") else s
        if s.endswith("\\"):
            continue
        key, _, arg = buf.partition(" ")
        out.append((key.upper(), arg.strip(), directives))
        directives, buf = set(), ""
    return out


def expand(text: str, env: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], m[0]), text)


def split_and(cmd: str) -> list[str]:
    """Splits a shell command at `&&` outside quotes."""
    parts, cur, quote, i = [], "", None, 0
    while i < len(cmd):
        c = cmd[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif cmd.startswith("&&", i):
            parts.append(cur.strip())
            cur, i = "", i + 2
            continue
        cur += c
        i += 1
    return [p for p in parts + [cur.strip()] if p]


def drop_gpu_extra(cmd: str) -> str:
    def repl(m):
        extras = [e for e in m[1].split(",") if e.strip() and e.strip() != "gpu"]
        return "." + (f"[{','.join(extras)}]" if extras else "")
    return re.sub(r"\.\[([\w,\- ]*)\]", repl, cmd)


def plan(dockerfile: Path, extra: str) -> tuple[list[dict], dict]:
    """The steps in order, each {"instruction", "command", "action": run|skip|env|workdir|copy, "why"},
    and the ARG/ENV values the commands run with."""
    env, steps = {}, []
    for key, arg, directives in instructions(dockerfile.read_text()):
        step = {"instruction": key, "command": expand(arg, env)}
        if key == "ARG":
            name, _, default = arg.partition("=")
            env.setdefault(name, default)
            steps.append(step | {"action": "env", "why": "build argument, substituted and exported"})
        elif key == "ENV":
            pairs = shlex.split(arg)
            pairs = pairs if all("=" in p for p in pairs) else [f"{pairs[0]}={' '.join(pairs[1:])}"]
            env.update(p.split("=", 1) for p in pairs)
            steps.append(step | {"action": "env", "why": "set for every later command"})
        elif key == "WORKDIR":
            steps.append(step | {"action": "workdir", "why": "the directory later commands run in"})
        elif key == "COPY":
            steps.append(step | {"action": "copy", "why": "the build context, into the temporary WORKDIR"})
        elif key == "RUN":
            for cmd in split_and(step["command"]):
                words = [w for w in shlex.split(cmd) if not re.match(r"^\w+=", w)]
                if "gpu-only" in directives and extra == "cpu":
                    steps.append({"instruction": key, "command": cmd, "action": "skip",
                                  "why": "marked gpu-only; --extra cpu"})
                elif words and words[0] in REPLAYED:
                    run = drop_gpu_extra(cmd) if extra == "cpu" else cmd
                    why = "the gpu extra dropped (--extra cpu)" if run != cmd else "as written"
                    steps.append({"instruction": key, "command": run, "action": "run", "why": why})
                else:
                    why = ("apt: system packages are not installed by the replay" if words and
                           words[0] in ("apt-get", "apt", "rm") else "not a pip/python command")
                    steps.append({"instruction": key, "command": cmd, "action": "skip", "why": why})
        else:
            steps.append(step | {"action": "skip", "why": {"FROM": "the venv uses this machine's Python",
                                                          "USER": "runs as this user"}.get(key, "not replayed")})
    return steps, env


def ignored(path: str, patterns: list[str]) -> bool:
    """The .dockerignore forms the ignore file uses: a top-level name or path, and `**/NAME` at any depth."""
    for p in patterns:
        if p.startswith("**/"):
            if any(fnmatch.fnmatch(part, p[3:]) for part in Path(path).parts):
                return True
        elif fnmatch.fnmatch(path, p) or path.startswith(p + "/"):
            return True
    return False


def build_context(dest: Path, dockerfile: Path) -> int:
    """Copies the files git lists (tracked and untracked-not-ignored) less the Dockerfile's ignore file."""
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [p.strip() for p in ignore_file.read_text().splitlines() if p.strip() and not p.startswith("#")]
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    n = 0
    for f in filter(None, files):
        if ignored(f, patterns) or not (REPO / f).is_file():
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
        n += 1
    return n


def emit(d: dict) -> None:
    print(json.dumps(d), flush=True)


def replay(steps, build_env, dockerfile: Path, venv: Path, python: str, log: Path) -> dict:
    root, context = venv.parent / "root", venv.parent / "context"
    root.mkdir(exist_ok=True)
    t = time.perf_counter()
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    emit({"action": "venv", "path": str(venv), "python": python, "wall_s": round(time.perf_counter() - t, 1)})
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env |= build_env | {"PATH": f"{venv / 'bin'}:{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv)}
    cwd, ran = root, 0
    for step in steps:
        if step["action"] == "workdir":
            cwd = context
        elif step["action"] == "copy":
            context.mkdir(exist_ok=True)
            step = step | {"files": build_context(context, dockerfile)}
        elif step["action"] == "run":
            t = time.perf_counter()
            with open(log, "a") as f:
                f.write(f"\n$ {step['command']}\n")
                f.flush()
                rc = subprocess.run(["bash", "-c", step["command"]], cwd=cwd, env=env, stdout=f,
                                    stderr=subprocess.STDOUT).returncode
            step = step | {"rc": rc, "wall_s": round(time.perf_counter() - t, 1)}
            if rc:
                emit(step)
                print(f"error: step failed (rc {rc}): {step['command']}\n" + "".join(
                    log.read_text().splitlines(keepends=True)[-30:]), file=sys.stderr)
                sys.exit(1)
            ran += 1
        emit(step)
    # from a directory of its own, so that the installed copy is what imports, not the source tree
    config = context / "pretrain" / "configs" / "imagenet.yaml"
    check = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK, str(config)], cwd=root, env=env,
                           capture_output=True, text=True)
    if check.returncode:
        print("error: the installed environment fails its import check:\n" + check.stderr[-3000:],
              file=sys.stderr)
        sys.exit(1)
    return {"replayed": ran, "check": json.loads(check.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dockerfile", type=Path, default=DOCKERFILE)
    p.add_argument("--extra", choices=("cpu", "gpu"), default="cpu",
                   help="cpu (default): drop the gpu extra and the gpu-only steps; gpu: replay everything")
    p.add_argument("--dry-run", action="store_true", help="list the steps, install nothing")
    p.add_argument("--keep", type=Path, help="build the venv here and keep it (default: a temporary dir)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the venv")
    a = p.parse_args(argv)
    if not a.dockerfile.is_file():
        print(f"error: {a.dockerfile}: no such Dockerfile", file=sys.stderr)
        return 2
    steps, build_env = plan(a.dockerfile, a.extra)
    if a.dry_run:
        for s in steps:
            emit(s)
        return 0
    if not VLFEAT_HEADER.is_file():
        print(f"error: {VLFEAT_HEADER} missing: the Dockerfile's apt step (libvlfeat-dev) is not replayed; "
              "run 'apt-get install libvlfeat-dev' first", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    work = a.keep or Path(tempfile.mkdtemp(prefix="replay-dockerfile-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        out = replay(steps, build_env, a.dockerfile, work / "venv", a.python, work / "replay.log")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    emit({"summary": True, "extra": a.extra, "skipped": sum(s["action"] == "skip" for s in steps),
          "wall_s": round(time.perf_counter() - t0, 1)} | out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
