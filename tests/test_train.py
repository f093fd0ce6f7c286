"""The training command: a seed and a step count give the same weights, whatever the machine's speed."""
import json

import pytest
from safetensors.numpy import load_file

from ispa_export.errors import UserError
from ispa_export.lab.train import main, sha256


def _run(out, *extra):
    # A wall-time budget far below the run's length: --steps must still run every step.
    assert main(["--out", str(out), "--frames", "4", "--threads", "1", "--minutes", "1e-6", *extra]) == 0
    return json.loads(out.with_name(out.stem + "_training.json").read_text())


def test_explicit_steps_are_reproducible_and_ignore_the_time_budget(tmp_path):
    log_a = _run(tmp_path / "a.safetensors", "--steps", "30", "--seed", "3")
    log_b = _run(tmp_path / "b.safetensors", "--steps", "30", "--seed", "3")
    assert log_a["train_config"]["steps"] == 30 and not log_a["stopped_early"]
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert log_a["weights_sha256"] == sha256(tmp_path / "a.safetensors")
    assert [h["loss_v"] for h in log_a["history"]] == [h["loss_v"] for h in log_b["history"]]


def test_a_later_stage_records_the_weights_it_started_from(tmp_path):
    first = _run(tmp_path / "s1.safetensors", "--steps", "2")
    second = _run(tmp_path / "s2.safetensors", "--steps", "2", "--init", str(tmp_path / "s1.safetensors"))
    assert second["init_sha256"] == first["weights_sha256"]
    assert second["init_log"]["command"] == first["command"]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(UserError, match="--frames must be a multiple of chunk_frames=2, got 5"):
        main(["--out", str(tmp_path / "x.safetensors"), "--frames", "5", "--steps", "1"])
    with pytest.raises(UserError, match="--memory-weight > 0 expected"):
        main(["--out", str(tmp_path / "x.safetensors"), "--memory-weight", "0", "--steps", "1"])
    assert not (tmp_path / "x.safetensors").exists()
