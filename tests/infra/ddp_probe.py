"""What each Ray Train worker of a DDP test saw: its rank, the world size (the session's and the process
group's) and a digest of every tensor of the model DDP wrapped, after training.

`probe(fn, module)` wraps a training function `fn(config, session)` of `module` (which builds
`DistributedDataParallel(model)` by that module-level name): while `fn` runs, the name is a subclass
that keeps the wrapped model, so the test needs no change in the loop. Each rank writes
`rank{R}.json` into the record directory when `fn` returns (the last attempt of a retried run wins).
Module level, so Ray workers import it by name (the repository must be on their PYTHONPATH).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
from pathlib import Path

import torch


def digest(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _recorded(fn, module_name: str, state_fn: str, record_dir: str, config: dict, session):
    mod = importlib.import_module(module_name)
    base = mod.DistributedDataParallel
    wrapped: list[torch.nn.Module] = []

    class Recording(base):
        def __init__(self, module, *args, **kwargs):
            super().__init__(module, *args, **kwargs)
            wrapped.append(module)

    mod.DistributedDataParallel = Recording
    try:
        out = fn(config, session)
    finally:
        mod.DistributedDataParallel = base
    dist = torch.distributed
    record = {"rank": session.rank, "world_size": session.world_size, "ddp": bool(wrapped),
              "dist_rank": dist.get_rank() if dist.is_initialized() else None,
              "dist_world_size": dist.get_world_size() if dist.is_initialized() else None}
    if wrapped:
        model = wrapped[-1]
        if state_fn:
            name, attr = state_fn.split(":")
            tensors = getattr(importlib.import_module(name), attr)(model)
        else:
            tensors = model.state_dict()
        params = {p.data_ptr() for p in model.parameters()}
        record["tensors"] = {k: digest(v) for k, v in tensors.items()}
        record["params"] = sorted(k for k, v in tensors.items() if v.data_ptr() in params)
    os.makedirs(record_dir, exist_ok=True)
    Path(record_dir, f"rank{session.rank}.json").write_text(json.dumps(record))
    return out


def probe(fn, module_name: str, record_dir, state_fn: str = ""):
    """fn wrapped to record what its rank saw; `state_fn` ("module:function") maps the model to the
    checkpoint's tensors (default: its state_dict)."""
    return functools.partial(_recorded, fn, module_name, state_fn, str(record_dir))


def assert_ranks_agree(record_dir, final_dir, world_size: int = 2) -> None:
    """Every rank ran DDP in a process group of `world_size`, their parameters are bit for bit the
    same, and rank 0's model is the final checkpoint's (BatchNorm's running statistics are each rank's
    own: DDP broadcasts them from rank 0 before each forward, and the forward then updates them)."""
    from pretrain.models.weights import load_weights

    records = {int(p.stem[4:]): json.loads(p.read_text()) for p in Path(record_dir).glob("rank*.json")}
    assert sorted(records) == list(range(world_size)), records.keys()
    for r, rec in records.items():
        assert (rec["rank"], rec["dist_rank"]) == (r, r), rec
        assert rec["world_size"] == rec["dist_world_size"] == world_size and rec["ddp"], rec
    first = records[0]
    assert first["params"] and set(first["params"]) <= set(first["tensors"])
    for rec in records.values():
        assert rec["params"] == first["params"]
        assert {k: rec["tensors"][k] for k in rec["params"]} == {k: first["tensors"][k] for k in first["params"]}
    saved, _ = load_weights(Path(final_dir) / "model.safetensors")
    assert {k: digest(v) for k, v in saved.items()} == first["tensors"]
