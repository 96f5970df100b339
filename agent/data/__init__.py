"""The device agent's data layer: loaders, on-device features, splits. NumPy + stdlib only.

Every loader returns `Dataset(X float32 (n, d), y int64 (n,), n_classes, meta)` and raises
`DataError` with a message naming the file and the problem. Entry points resolve the data
directory once with `resolve_data_dir(args.data_dir, os.environ)` and pass it down.
"""

from agent.data.dataset import Dataset, holdout_split, validate_dataset
from agent.data.errors import DataError
from agent.data.fan import (
    FAN_CLASS_NAMES,
    FanTask,
    fan_features,
    load_fan_split,
    load_fan_task,
)
from agent.data.fan_csv import load_fan_csv_dir, read_fan_csv
from agent.data.fan_fleet import (
    FanDevice,
    FanGroup,
    fan_fleet_devices,
    fan_fleet_groups,
    load_fan_fleet_group,
)
from agent.data.fashion_mnist import (
    load_fashion_mnist,
    load_idx_images,
    load_idx_labels,
    rotate_images,
)
from agent.data.har import (
    HAR_ACTIVITY_NAMES,
    HAR_DRIFT_SUBJECTS,
    HarTask,
    HarWindows,
    har_drift_split,
    har_subject_dataset,
    load_har_windows,
)
from agent.data.har_features import window_feature_names, window_features
from agent.data.locate import DATA_DIR_ENV, DATA_FILES, data_file, resolve_data_dir
from agent.data.scaling import Standardizer

__all__ = [
    "DATA_DIR_ENV",
    "DATA_FILES",
    "FAN_CLASS_NAMES",
    "HAR_ACTIVITY_NAMES",
    "HAR_DRIFT_SUBJECTS",
    "DataError",
    "Dataset",
    "FanDevice",
    "FanGroup",
    "FanTask",
    "HarTask",
    "HarWindows",
    "Standardizer",
    "data_file",
    "fan_features",
    "fan_fleet_devices",
    "fan_fleet_groups",
    "har_drift_split",
    "har_subject_dataset",
    "holdout_split",
    "load_fan_csv_dir",
    "load_fan_fleet_group",
    "load_fan_split",
    "load_fan_task",
    "load_fashion_mnist",
    "load_har_windows",
    "load_idx_images",
    "load_idx_labels",
    "read_fan_csv",
    "resolve_data_dir",
    "rotate_images",
    "validate_dataset",
    "window_feature_names",
    "window_features",
]
