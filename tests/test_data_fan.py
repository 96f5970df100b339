"""Fan loaders: the Damage tasks, the fleet file, raw CSV recordings, and their error paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.data import (
    FAN_CLASS_NAMES,
    DataError,
    fan_features,
    fan_fleet_devices,
    fan_fleet_groups,
    load_fan_csv_dir,
    load_fan_fleet_group,
    load_fan_split,
    load_fan_task,
    read_fan_csv,
)

# Per-split class counts (stop, normal, damaged) from the data README tables.
TASK_COUNTS = {
    "damage1": {"pretrain": [116, 177, 177], "finetune": [115, 177, 178], "test": [113, 179, 178]},
    "damage2": {"pretrain": [115, 177, 178], "finetune": [115, 177, 178], "test": [111, 179, 180]},
}
# Stopped (speed o) spectra per fleet group, from the README's h/m/l/o column.
FLEET_STOPPED = [118, 114, 117, 114, 112, 114, 112, 114, 114, 111, 112]


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def write_npz(directory: Path, name: str, arrays: dict[str, np.ndarray], **changes) -> Path:
    """Save `arrays` with `changes` applied (a None value drops the array) as directory/name."""
    arrays = dict(arrays)
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    np.savez(directory / name, **arrays)
    return directory / name


@pytest.fixture(scope="module")
def damage1_arrays(data_dir) -> dict[str, np.ndarray]:
    return npz_arrays(data_dir / "fan_damage1.npz")


# ---- the Damage tasks ---------------------------------------------------------------------


@pytest.mark.parametrize("task", ["damage1", "damage2"])
def test_fan_task_matches_readme(data_dir, task):
    fan = load_fan_task(data_dir, task)
    for split in ("pretrain", "finetune", "test"):
        ds = getattr(fan, split)
        assert ds.X.shape == (470, 256) and ds.X.dtype == np.float32
        assert ds.y.dtype == np.int64 and ds.n_classes == 3
        assert ds.class_counts().tolist() == TASK_COUNTS[task][split]
        assert ds.meta["class_names"] == FAN_CLASS_NAMES
        assert ((ds.meta["speed"] == 3) == (ds.y == 0)).all()
        assert ds.meta["transition"].sum() == 12
    assert set(fan.finetune.meta["recording"]) == {
        "12cm_hmlo_normal_noisy_1",
        f"12cm_hmlo_{task}_noisy_1",
    }


def test_fan_features_are_log_of_raw_spectra(data_dir, damage1_arrays):
    raw = damage1_arrays["X_test"]
    features = load_fan_task(data_dir, "damage1").test.X
    np.testing.assert_allclose(features, np.log(raw.astype(np.float64) + 1e-3), atol=1e-6)
    assert fan_features(raw).dtype == np.float32


def test_silent_all_split(data_dir):
    ds = load_fan_split(data_dir, "damage2", "silent_all")
    assert len(ds) == 1880 and ds.class_counts().tolist() == [456, 709, 715]


def test_unknown_task_and_split(data_dir):
    with pytest.raises(DataError, match="unknown fan task 'damage3'"):
        load_fan_task(data_dir, "damage3")
    with pytest.raises(DataError, match="unknown fan split"):
        load_fan_split(data_dir, "damage1", "validation")


def test_missing_task_file_lists_expected_files(tmp_path):
    with pytest.raises(DataError, match=r"fan_damage1\.npz: file not found[\s\S]*hapt_windows"):
        load_fan_task(tmp_path, "damage1")


def test_truncated_and_corrupted_npz(tmp_path, data_dir):
    content = (data_dir / "fan_damage1.npz").read_bytes()
    (tmp_path / "fan_damage1.npz").write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match=r"fan_damage1\.npz: not a readable \.npz"):
        load_fan_task(tmp_path, "damage1")
    middle = len(content) // 3  # inside a member: the zip directory is intact, the data is not
    flipped = bytes(b ^ 0xFF for b in content[middle : middle + 64])
    (tmp_path / "fan_damage1.npz").write_bytes(content[:middle] + flipped + content[middle + 64 :])
    with pytest.raises(DataError, match=r"fan_damage1\.npz: cannot read array"):
        load_fan_task(tmp_path, "damage1")


def test_missing_array(tmp_path, damage1_arrays):
    write_npz(tmp_path, "fan_damage1.npz", damage1_arrays, y_test=None)
    with pytest.raises(DataError, match="missing array\\(s\\) y_test"):
        load_fan_task(tmp_path, "damage1")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"X_finetune": np.zeros((470, 255), np.float32)}, r"'X_finetune' has shape \(470, 255\)"),
        ({"y_finetune": np.zeros(470, np.float32)}, "'y_finetune' has dtype float32"),
        ({"X_finetune": np.zeros((470, 256), np.int64)}, "expected floating point"),
        ({"y_finetune": np.zeros(469, np.int64)}, "disagree on the number of rows"),
        ({"y_finetune": np.full(470, 3, np.int64)}, r"labels out of range 0\.\.2"),
        ({"speed_finetune": np.full(470, 4, np.int64)}, "speed_finetune out of range"),
        ({"class_names": np.array(["a", "b", "c"])}, "class_names are"),
    ],
)
def test_malformed_task_arrays(tmp_path, damage1_arrays, change, message):
    write_npz(tmp_path, "fan_damage1.npz", damage1_arrays, **change)
    with pytest.raises(DataError, match=message):
        load_fan_task(tmp_path, "damage1")


@pytest.mark.parametrize(("bad", "message"), [(np.nan, "non-finite"), (-0.5, "negative")])
def test_bad_spectrum_values(tmp_path, damage1_arrays, bad, message):
    spectra = damage1_arrays["X_test"].copy()
    spectra[17, 5] = bad
    write_npz(tmp_path, "fan_damage1.npz", damage1_arrays, X_test=spectra)
    with pytest.raises(DataError, match=rf"fan_damage1.npz \[test\]: .*{message}.* row 17"):
        load_fan_task(tmp_path, "damage1")


# ---- the fleet ----------------------------------------------------------------------------


def test_fleet_groups_and_counts(data_dir):
    groups = fan_fleet_groups(data_dir)
    assert [g.id for g in groups] == list(range(11))
    assert groups[3].name == "12cm_noisy_normal" and groups[3].room == "noisy"
    assert groups[0].rpm_nominal == (4000, 3600, 3200, 0)
    for group in groups:
        ds = load_fan_fleet_group(data_dir, group.id)
        running = 1 if group.fan_type == "normal" else 2
        expected = [0, 0, 0]
        expected[0], expected[running] = FLEET_STOPPED[group.id], 470 - FLEET_STOPPED[group.id]
        assert ds.X.shape == (470, 256) and ds.class_counts().tolist() == expected
        assert ds.meta["group_name"] == group.name


def test_fleet_group_by_name_and_constant_speed(data_dir):
    by_name = load_fan_fleet_group(data_dir, "12cm_silentB_normal")
    assert by_name.meta["group"] == 2
    with_constant = load_fan_fleet_group(data_dir, 2, include_constant_speed=True)
    assert len(with_constant) == 470 + 1200
    assert with_constant.meta["constant_speed"].sum() == 1200
    assert with_constant.class_counts()[0] == FLEET_STOPPED[2] + 300  # 300 spectra at 0 rpm
    damaged = load_fan_fleet_group(data_dir, 7, include_constant_speed=True)
    assert len(damaged) == 470  # damaged fans have no constant-speed recordings


def test_fleet_features_match_task_file(data_dir):
    """The same recording loaded from the fleet file and the task file gives equal features."""
    task = load_fan_task(data_dir, "damage1").finetune  # noisy_1 of normal and damage1
    fleet = load_fan_fleet_group(data_dir, "12cm_noisy_damage1")
    in_task = task.meta["recording"] == "12cm_hmlo_damage1_noisy_1"
    in_fleet = fleet.meta["recording"] == 0
    np.testing.assert_array_equal(task.X[in_task], fleet.X[in_fleet])
    np.testing.assert_array_equal(task.y[in_task], fleet.y[in_fleet])


@pytest.mark.parametrize("group", [11, -1, "12cm_loud_normal", True, 2.0])
def test_unknown_fleet_group(data_dir, group):
    with pytest.raises(DataError, match="group"):
        load_fan_fleet_group(data_dir, group)


def test_fleet_file_with_other_group_table_is_refused(tmp_path, data_dir):
    arrays = npz_arrays(data_dir / "fan_fleet.npz")
    names = arrays["group_names"].copy()
    names[[1, 2]] = names[[2, 1]]
    write_npz(tmp_path, "fan_fleet.npz", arrays, group_names=names)
    with pytest.raises(DataError, match="device mapping"):
        load_fan_fleet_group(tmp_path, 0)


def test_fleet_devices_mapping(data_dir):
    devices = {d.quiet_group_name: d for d in fan_fleet_devices()}
    assert len(devices) == 8
    assert devices["12cm_silentA_normal"].noisy_group_name == "12cm_noisy_normal"
    assert devices["12cm_silentB_damage2"].noisy_group == 10
    assert devices["8cm_silentA_normal"].noisy_group is None
    assert devices["14cm_silentA_normal"].noisy_group is None
    groups = fan_fleet_groups(data_dir)
    for device in devices.values():
        quiet = groups[device.quiet_group]
        assert quiet.room.startswith("silent") and quiet.name == device.quiet_group_name
        if device.noisy_group is not None:
            noisy = groups[device.noisy_group]
            assert noisy.room == "noisy"
            assert (noisy.size_cm, noisy.fan_type) == (quiet.size_cm, quiet.fan_type)
        assert device.device_id.replace("-", "").isalnum() and device.device_id.islower()


# ---- raw CSV recordings -------------------------------------------------------------------


def write_spectrum_csv(path: Path, spectrum: np.ndarray) -> None:
    """One CSV as the sensor writes it: 512 lines 'index, value', index 0 (DC) = 0."""
    values = np.zeros(512)
    values[1:257] = spectrum
    values[257:] = 0.001
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}, {float(v)!r}\n" for k, v in enumerate(values)))


def test_csv_recording_roundtrip_equals_npz(tmp_path, data_dir, damage1_arrays):
    raw = damage1_arrays["X_test"][:4]
    stamps = damage1_arrays["timestamp_test"][:4]
    for spectrum, stamp in zip(raw, stamps, strict=True):
        write_spectrum_csv(tmp_path / "rec" / f"{stamp}.csv", spectrum)
    ds = load_fan_csv_dir(tmp_path / "rec", label=1)
    np.testing.assert_array_equal(ds.X, load_fan_task(data_dir, "damage1").test.X[:4])
    assert ds.y.tolist() == [1, 1, 1, 1]
    assert ds.meta["timestamp"].tolist() == stamps.tolist()  # time order
    per_file = {str(stamps[0]): 0, str(stamps[1]): 0, str(stamps[2]): 2, str(stamps[3]): 2}
    assert load_fan_csv_dir(tmp_path / "rec", label=per_file).y.tolist() == [0, 0, 2, 2]


def test_csv_folder_per_class(tmp_path):
    rng = np.random.default_rng(0)
    write_spectrum_csv(tmp_path / "stop" / "2023-01-01-00-00-00.csv", rng.random(256) * 0.01)
    write_spectrum_csv(tmp_path / "damaged" / "rec2" / "2023-01-01-00-00-04.csv", rng.random(256))
    write_spectrum_csv(tmp_path / "damaged" / "rec1" / "2023-01-01-00-00-02.csv", rng.random(256))
    ds = load_fan_csv_dir(tmp_path)
    assert ds.y.tolist() == [0, 2, 2] and ds.class_counts().tolist() == [1, 0, 2]
    assert ds.meta["file"].tolist()[1] == str(Path("damaged/rec1/2023-01-01-00-00-02.csv"))


def test_csv_layout_errors(tmp_path):
    write_spectrum_csv(tmp_path / "a" / "stray.csv", np.zeros(256))
    with pytest.raises(DataError, match="directly in the folder"):
        load_fan_csv_dir(tmp_path / "a")
    write_spectrum_csv(tmp_path / "b" / "broken" / "x.csv", np.zeros(256))
    with pytest.raises(DataError, match=r"\['broken'\] are not class names"):
        load_fan_csv_dir(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match=r"no \.csv files"):
        load_fan_csv_dir(tmp_path / "c", label=0)
    with pytest.raises(DataError, match="not a directory"):
        load_fan_csv_dir(tmp_path / "missing", label=0)
    with pytest.raises(DataError, match=r"out of range 0\.\.2"):
        load_fan_csv_dir(tmp_path / "a", label=3)
    with pytest.raises(DataError, match="have no label"):
        load_fan_csv_dir(tmp_path / "a", label={"other": 1})
    with pytest.raises(DataError, match="do not exist"):
        load_fan_csv_dir(tmp_path / "a", label={"stray": 1, "ghost": 1})


def valid_csv_lines() -> list[str]:
    return [f"{k}, {0.01 if k else 0.0}" for k in range(512)]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: lines[:511], "511 lines"),
        (lambda lines: [*lines, "512, 0.1"], "513 lines"),
        (lambda lines: [], "0 lines"),
        (lambda lines: [*lines[:7], "7, abc", *lines[8:]], "malformed CSV"),
        (lambda lines: [*lines[:7], "7, 0.1, 0.2", *lines[8:]], "malformed CSV"),
        (lambda lines: [*lines[:9], "10, 0.1", *lines[10:]], "line 10 has index 10, expected 9"),
        (lambda lines: [*lines[:7], "7, nan", *lines[8:]], "non-finite"),
        (lambda lines: [*lines[:7], "7, -0.2", *lines[8:]], "negative"),
    ],
)
def test_malformed_csv(tmp_path, edit, message):
    path = tmp_path / "2023-01-01-00-00-00.csv"
    path.write_text("\n".join(edit(valid_csv_lines())) + "\n")
    with pytest.raises(DataError, match=message) as error:
        read_fan_csv(path)
    assert str(path) in str(error.value)
    with pytest.raises(DataError, match=message):  # the directory loader reports it the same way
        load_fan_csv_dir(tmp_path, label=0)


def test_valid_csv_reads_bins_1_to_256(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text("\n".join(valid_csv_lines()))
    spectrum = read_fan_csv(path)
    assert spectrum.shape == (256,) and spectrum.dtype == np.float32
    assert np.allclose(spectrum, 0.01)


def test_unreadable_csv_path(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_fan_csv(tmp_path / "missing.csv")
