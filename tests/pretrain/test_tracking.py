import json

from infra.tracking import Tracker, resolve_wandb_mode


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_jsonl_is_written_without_wandb(tmp_path):
    t = Tracker(tmp_path, run_id="abc", run_name="t", config={}, wandb_mode="disabled")
    t.log({"loss": 1.5}, step=3)
    t.summary({"best": 2})
    t.finish()
    got = lines(tmp_path / "metrics.jsonl")
    assert got[0]["loss"] == 1.5 and got[0]["step"] == 3 and got[1]["summary"] == {"best": 2}


def test_only_rank_zero_writes(tmp_path):
    t = Tracker(tmp_path, run_id="abc", run_name="t", config={}, wandb_mode="offline", rank=1)
    t.log({"loss": 1.0})
    assert t.mode == "disabled" and not (tmp_path / "metrics.jsonl").exists()


def test_wandb_offline_run_is_real(tmp_path):
    t = Tracker(tmp_path, run_id="offline1", run_name="t", config={"a": 1}, wandb_mode="offline")
    assert t._wandb is not None
    t.log({"loss": 0.5}, step=1)
    t.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*-offline1"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_wandb_failure_never_stops_the_run(tmp_path, monkeypatch):
    # online without credentials and without network: W&B refuses, the tracker carries on
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    t = Tracker(tmp_path, run_id="x", run_name="t", config={}, wandb_mode="online", init_timeout_s=5)
    assert t.wandb_dir is None  # W&B really refused
    t.log({"loss": 2.0})
    t.finish()
    assert lines(tmp_path / "metrics.jsonl")[0]["loss"] == 2.0


def test_auto_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled" and resolve_wandb_mode("offline") == "offline"
