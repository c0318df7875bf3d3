"""Config loading for any schema: YAML + `--set a.b=c` overrides onto a root dataclass of frozen sections.

An unknown key anywhere (YAML or --set) is an error that lists the valid keys; values are checked
against the field types. The schema (the dataclasses) stays with each driver: `pretrain/config.py`,
`transfer/config.py`; the sections every driver shares (Ray, tracking) are here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import yaml

from infra.tracking import MODES as WANDB_MODES


class ConfigError(ValueError):
    """A bad config file or override; the message is one line for the user."""


def _check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"config key {key}: must be {rule}, got {value!r}")


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # empty: $RAY_ADDRESS when set (ray job submit), else a local instance
    num_cpus: int = 0  # local instance only; 0 = all cores
    task_retries: int = 2  # times Ray reruns a task whose worker or node died (spot nodes: more); -1: always

    def __post_init__(self):
        _check(self.num_cpus >= 0, "ray.num_cpus", ">= 0", self.num_cpus)
        _check(self.task_retries >= -1, "ray.task_retries", ">= -1", self.task_retries)


@dataclass(frozen=True)
class TrackingConfig:
    wandb: str = "auto"  # auto (online if WANDB_API_KEY is set, else offline) | online | offline | disabled
    project: str = "discoattr"
    entity: str = ""
    init_timeout_s: float = 30.0

    def __post_init__(self):
        _check(self.wandb in WANDB_MODES, "tracking.wandb", " | ".join(WANDB_MODES), self.wandb)
        _check(self.init_timeout_s > 0, "tracking.init_timeout_s", "> 0", self.init_timeout_s)


def valid_keys(cls, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        out += valid_keys(t, f"{prefix}{f.name}.") if is_dataclass(t) else [f"{prefix}{f.name}"]
    return out


def _coerce(key: str, value, typ):
    origin = typing.get_origin(typ)
    if origin is tuple:
        args = typing.get_args(typ)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: a list of any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"config key {key}: expected a list, got {value!r}")
            return tuple(_coerce(key, v, args[0]) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key {key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config field type {typ}")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, str):  # YAML reads 1e3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif typ is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key {key}: expected {typ.__name__}, got {value!r}")


def unknown_key(root, key: str) -> ConfigError:
    """The error for a dotted `key` that `root` does not have: what replaced it when its section names
    it in a `RENAMED` class attribute ({old name: what to use instead}), else the valid keys."""
    cls, *parents, last = [root, *key.split(".")]
    for name in parents:
        hints = typing.get_type_hints(cls)
        cls = hints.get(name)
        if not is_dataclass(cls):
            break
    instead = getattr(cls, "RENAMED", {}).get(last) if is_dataclass(cls) else None
    if instead:
        return ConfigError(f"config key '{key}' is gone: use {instead}")
    return ConfigError(f"unknown config key '{key}'; valid keys: {', '.join(valid_keys(root))}")


def _build(cls, values: dict, prefix: str = "", root=None):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    root = root or cls
    for k in values:
        if k not in names:
            raise unknown_key(root, f"{prefix}{k}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        t, v, key = hints[f.name], values[f.name], prefix + f.name
        if is_dataclass(t):
            if not isinstance(v, dict):
                raise ConfigError(f"config key {key}: expected a mapping of {t.__name__} fields, got {v!r}")
            kwargs[f.name] = _build(t, v, key + ".", root)
        else:
            kwargs[f.name] = _coerce(key, v, t)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {dotted}: {p} is not a section")
    node[parts[-1]] = value


def _field_type(dotted: str, root):
    typ = root
    for part in dotted.split("."):
        typ = typing.get_type_hints(typ)[part]
    return typ


def _parse_override(key: str, raw: str, root):
    """An override's text -> a value of its field's type (text fields keep the text as typed)."""
    typ = _field_type(key, root)
    if typ is str:
        return raw
    if typ in (int, float):
        try:
            return typ(raw.strip())
        except ValueError:
            raise ConfigError(f"config key {key}: expected {typ.__name__}, got {raw!r}") from None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"config key {key}: cannot parse {raw!r}") from None


def load_config(path: str | Path | None, overrides: list[str] = (), *, root, default: Path | None = None):
    """YAML file (`default` when None) + `a.b=c` overrides -> an instance of the dataclass `root` (each
    driver passes its own schema). Raises ConfigError."""
    path = Path(path) if path else default
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid YAML file ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    keys = valid_keys(root)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in keys:
            raise unknown_key(root, key)
        _set_dotted(tree, key, _parse_override(key, raw, root))
    return _build(root, tree)


def to_dict(obj) -> dict:
    """A config (or section) as plain JSON-able dicts and lists: for YAML, wandb, checkpoints, Ray."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def config_hash(section) -> str:
    """Stable 16-hex-digit hash of a config section (or any JSON-able value)."""
    data = to_dict(section) if is_dataclass(section) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
