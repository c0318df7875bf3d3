import pytest
import yaml

from pretrain.config import (CONFIG_DIR, Config, ConfigError, config_hash, dump_yaml, load_config, to_dict,
                             valid_keys)


def test_every_shipped_config_loads():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config) and cfg.run.name == path.stem
    assert load_config().data.source == "demo"  # demo.yaml is the default


def test_overrides_are_typed():
    cfg = load_config(None, ["data.patch_size_px=64", "data.scale_range=[0.1, 0.2]", "run.name=7",
                             "tracking.init_timeout_s=5"])
    assert cfg.data.patch_size_px == 64 and cfg.data.scale_range == (0.1, 0.2)
    assert cfg.run.name == "7" and cfg.tracking.init_timeout_s == 5.0
    with pytest.raises(ConfigError, match="data.patch_size_px: expected int, got 'big'"):
        load_config(None, ["data.patch_size_px=big"])
    with pytest.raises(ConfigError, match="expected a list of 2 values"):
        load_config(None, ["data.scale_range=0.5"])


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.patchsize=3"])
    msg = str(err.value)
    assert msg.startswith("unknown config key 'data.patchsize'; valid keys: run.name,") and "\n" not in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sorce: demo\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.sorce'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["data.source"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_resolved_config_round_trips_and_hash_is_stable(tmp_path):
    cfg = load_config(None, ["data.patches_per_image=5"])
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(cfg))
    assert load_config(saved) == cfg
    assert config_hash(cfg.data) == config_hash(to_dict(cfg.data))
    assert config_hash(cfg.data) != config_hash(load_config().data)
    assert set(yaml.safe_load(dump_yaml(cfg))) == {k.split(".")[0] for k in valid_keys()}


def test_override_text_is_parsed_by_field_type():
    cfg = load_config(None, ["run.name=007", "data.source=a: b", "tracking.init_timeout_s=1e3"])
    assert cfg.run.name == "007" and cfg.data.source == "a: b" and cfg.tracking.init_timeout_s == 1000.0
    for bad, msg in [("data.source=", "data.source: must be a source"),
                     ("run.name=", "run.name: must be a non-empty name"),
                     ("tracking.wandb=bogus", "tracking.wandb: must be auto | online"),
                     ("tracking.init_timeout_s=nan", "expected float"),
                     ("ray.num_cpus=-1", "ray.num_cpus: must be >= 0"),
                     ("run.seed=-1", "run.seed: must be >= 0"),
                     ("data.scale_range=[oops", "cannot parse")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [bad])


def test_unreadable_config_file_is_one_line(tmp_path):
    f = tmp_path / "bin.yaml"
    f.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ConfigError, match="not a valid YAML file") as err:
        load_config(f)
    assert "\n" not in str(err.value)
