import json

import pytest

from infra.rundir import RunDir


class Stage:
    """A stage that writes one file and counts its runs."""

    def __init__(self, run: RunDir, text: str = "out"):
        self.run, self.text, self.calls = run, text, 0

    def __call__(self):
        self.calls += 1
        p = self.run.path / "a" / "out.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_text(self.text)
        return {str(p): None}


def test_skips_matching_record_and_redoes_on_change(tmp_path):
    run = RunDir(tmp_path / "run")
    stage = Stage(run)
    first = run.run_stage("s", stage, config={"k": 1}, inputs={"src": "x"})
    assert not first.skipped and stage.calls == 1
    assert first.record["outputs"]["a/out.txt"]["bytes"] == 3
    assert run.run_stage("s", stage, config={"k": 1}, inputs={"src": "x"}).skipped and stage.calls == 1
    # a fresh RunDir object (a relaunch) sees the same record
    assert RunDir(tmp_path / "run").run_stage("s", stage, config={"k": 1}, inputs={"src": "x"}).skipped
    assert not run.run_stage("s", stage, config={"k": 2}, inputs={"src": "x"}).skipped and stage.calls == 2
    assert not run.run_stage("s", stage, config={"k": 2}, inputs={"src": "y"}).skipped and stage.calls == 3
    (run.path / "a" / "out.txt").write_text("changed!")
    assert run.why_not_done("s", {"k": 2}, {"src": "y"}) == "output a/out.txt missing or changed"
    assert not run.run_stage("s", stage, config={"k": 2}, inputs={"src": "y"}).skipped and stage.calls == 4
    assert not run.run_stage("s", stage, config={"k": 2}, inputs={"src": "y"}, force=True).skipped


def test_downstream_inputs_follow_upstream_outputs(tmp_path):
    run = RunDir(tmp_path)
    up = Stage(run, "v1")
    run.run_stage("up", up, config={}, inputs={})
    fp1 = run.outputs_fingerprint("up")
    up.text = "v2"
    run.run_stage("up", up, config={}, inputs={}, force=True)
    assert run.outputs_fingerprint("up") != fp1
    with pytest.raises(KeyError):
        run.outputs_fingerprint("never")


def test_failed_stage_leaves_previous_manifest_intact(tmp_path):
    run = RunDir(tmp_path)
    run.run_stage("ok", Stage(run), config={}, inputs={})
    before = (tmp_path / "manifest.json").read_text()

    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run.run_stage("bad", boom, config={}, inputs={})
    assert (tmp_path / "manifest.json").read_text() == before
    manifest = json.loads(before)
    assert set(manifest["stages"]) == {"ok"} and len(manifest["run_id"]) == 12
    assert not list(tmp_path.glob(".*.tmp"))


def test_relative_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunDir("runs/x")
    rec = run.run_stage("s", Stage(run), config={}, inputs={}).record
    assert list(rec["outputs"]) == ["a/out.txt"] and run.path == tmp_path / "runs" / "x"
    assert RunDir("runs/x").why_not_done("s", {}, {}) is None


def test_same_size_content_change_is_seen(tmp_path):
    run = RunDir(tmp_path)
    run.run_stage("s", Stage(run, "abc"), config={}, inputs={})
    (tmp_path / "a" / "out.txt").write_text("abd")
    assert run.why_not_done("s", {}, {}) == "output a/out.txt missing or changed"
    (tmp_path / "a" / "out.txt").write_text("abc")  # same bytes back, newer mtime: still done
    assert run.why_not_done("s", {}, {}) is None


def test_killed_redo_drops_the_old_record(tmp_path):
    run = RunDir(tmp_path)
    run.run_stage("s", Stage(run), config={"k": 1}, inputs={})

    def killed_midway():
        (tmp_path / "a" / "out.txt").write_text("hal")  # half rewritten, same size
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.run_stage("s", killed_midway, config={"k": 2}, inputs={})
    assert run.why_not_done("s", {"k": 1}, {}) == "not run yet"


def test_fingerprint_covers_inputs_of_stages_without_outputs(tmp_path):
    run = RunDir(tmp_path)
    run.run_stage("prebuilt", lambda: {}, config={"dir": "/a"}, inputs={"index": "1"})
    fp = run.outputs_fingerprint("prebuilt")
    run.run_stage("prebuilt", lambda: {}, config={"dir": "/b"}, inputs={"index": "2"})
    assert run.outputs_fingerprint("prebuilt") != fp


def test_one_driver_per_run_directory(tmp_path):
    from infra.rundir import RunDirError

    first, second = RunDir(tmp_path), RunDir(tmp_path)
    first.lock()
    with pytest.raises(RunDirError, match="in use by another run"):
        second.lock()
    first.unlock()
    second.lock()
    second.unlock()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        RunDir(tmp_path / "file")
    (tmp_path / "manifest.json").write_text("{torn")
    with pytest.raises(RunDirError, match="damaged"):
        RunDir(tmp_path)
