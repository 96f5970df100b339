"""`skipfleet agent` entry point: fatal problems exit early with distinct codes and a message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.errors import ExitCode
from skipfleet.cli import main
from tests.agent_fixtures import fan_files  # noqa: F401 (a fixture)
from tests.import_check import foreign_imports

REPO = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    code = main(["agent", "--device-id", "dev-1", "--broker", "mqtt://127.0.0.1:9", *argv])
    return code, capsys.readouterr().err


def test_unusable_base_model_exits_65(tmp_path, fan_files, capsys):  # noqa: F811
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    code, err = run(
        capsys,
        "--base-model",
        str(tmp_path / "bad.npz"),
        "--data",
        str(fan_files.device_data_path),
        "--state-dir",
        str(tmp_path / "s"),
    )
    assert code == ExitCode.BASE_MODEL_UNUSABLE == 65
    assert "base model unusable" in err and "bad.npz" in err


def test_missing_data_exits_66(tmp_path, fan_files, capsys):  # noqa: F811
    code, err = run(
        capsys,
        "--base-model",
        str(fan_files.base_model_path),
        "--data",
        str(tmp_path / "none.npz"),
        "--state-dir",
        str(tmp_path / "s"),
    )
    assert code == ExitCode.DATA_UNUSABLE == 66
    assert "none.npz" in err


def test_data_that_does_not_fit_the_model_exits_66(tmp_path, fan_files, capsys):  # noqa: F811
    np.savez(tmp_path / "narrow.npz", X=np.zeros((20, 5), np.float32), y=np.zeros(20, np.int64))
    code, err = run(
        capsys,
        "--base-model",
        str(fan_files.base_model_path),
        "--data",
        str(tmp_path / "narrow.npz"),
        "--state-dir",
        str(tmp_path / "s"),
    )
    assert code == 66 and "5 features" in err


def test_unwritable_state_dir_exits_73(tmp_path, fan_files, capsys):  # noqa: F811
    (tmp_path / "file").write_text("a file, not a directory")
    code, err = run(
        capsys,
        "--base-model",
        str(fan_files.base_model_path),
        "--data",
        str(fan_files.device_data_path),
        "--state-dir",
        str(tmp_path / "file" / "s"),
    )
    assert code == ExitCode.STATE_DIR_UNUSABLE == 73
    assert "state dir" in err


def test_bad_configuration_exits_64(tmp_path, capsys):
    code, err = run(
        capsys,
        "--holdout-fraction",
        "2",
        "--base-model",
        "m",
        "--data",
        "d",
        "--state-dir",
        str(tmp_path),
    )
    assert code == ExitCode.USAGE == 64 and "holdout" in err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["agent", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--device-id",
        "--broker",
        "--mqtt-version",
        "--state-dir",
        "--power-profile",
        "--spool-max-messages",
        "--holdout-fraction",
        "--tls-ca",
        "--stream-rows",
        "--drift-at",
        "--desired-retry-seconds",
        "--desired-max-fetches",
    ):
        assert option in out


def test_drift_at_without_drifted_rows_exits_64(tmp_path, fan_files, capsys):  # noqa: F811
    code, err = run(
        capsys,
        "--base-model",
        str(fan_files.base_model_path),
        "--data",
        str(fan_files.device_data_path),  # X and y only
        "--state-dir",
        str(tmp_path / "s"),
        "--drift-at",
        "60",
    )
    assert code == ExitCode.USAGE == 64
    assert "--drift-at needs drifted rows (X_drift, y_drift)" in err


def test_an_unreadable_password_file_exits_64(tmp_path, fan_files, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SKIPFLEET_MQTT_PASSWORD_FILE", str(tmp_path / "missing-secret"))
    code, err = run(
        capsys,
        "--username",
        "dev-1",
        "--base-model",
        str(fan_files.base_model_path),
        "--data",
        str(fan_files.device_data_path),
        "--state-dir",
        str(tmp_path / "s"),
    )
    assert code == 64 and "SKIPFLEET_MQTT_PASSWORD_FILE" in err and "missing-secret" in err


def test_the_agent_imports_only_numpy_paho_msgpack_the_stdlib_and_shared():
    allowed = {"agent", "shared", "numpy", "msgpack", "paho"}
    assert foreign_imports(["agent.runtime", "agent.cli"], allowed) == []
