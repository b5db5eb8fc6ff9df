"""Read a local LeRobot dataset folder into per-episode action and state arrays.

Two on-disk layouts are read, told apart by ``codebase_version`` in ``meta/info.json``:

v3.0 (many episodes per data file)::

    meta/info.json                              codebase_version, fps, features
    meta/tasks.parquet                          task text (column ``task``, the pandas index
                                                LeRobot writes) and ``task_index``
    meta/episodes/chunk-XXX/file-XXX.parquet    one row per episode: episode_index, length, ...
    data/chunk-XXX/file-XXX.parquet             one row per frame, many episodes per file

v2.1 (one episode per data file)::

    meta/info.json                              codebase_version, fps, features
    meta/tasks.jsonl                            {"task_index": 0, "task": "..."} per line
    meta/episodes.jsonl                         {"episode_index": 0, "tasks": [...], "length": N}
    data/chunk-XXX/episode_XXXXXX.parquet       one row per frame of one episode

Every frame row holds ``episode_index``, ``frame_index``, ``index``, ``task_index``,
``timestamp``, the action column and the state columns; image features may be stored in the
row too (video features live in mp4 files). What is read, from ``info.json``'s features:

- actions: the ``action`` feature, else ``actions`` (openpi's LIBERO conversions) -> [N, D];
- obs: every other feature of a float dtype whose shape has one axis (``observation.state``,
  ``state``, ...) -> [N, d]; images, videos, strings, integers, booleans, the bookkeeping
  columns above and float features of more than one axis (point clouds) are not read;
- instruction: the task text of the episode's first frame's ``task_index``.

Frames are ordered by ``frame_index`` and episodes by ``episode_index``. Anything that does not
fit raises LeRobotFormatError with a one-line message naming the folder (and file / column).
pyarrow is imported only when a dataset is read.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

INFO_PATH = os.path.join("meta", "info.json")
SUPPORTED_VERSIONS = ("v2.1", "v3.0")
# Where each layout keeps its frames, its per-episode metadata and its task table
# (LeRobot's DEFAULT_DATA_PATH / DEFAULT_EPISODES_PATH / DEFAULT_TASKS_PATH for v3.0 and the
# LEGACY_* paths for v2.1).
DATA_GLOB = {"v2.1": "data/chunk-*/episode_*.parquet", "v3.0": "data/chunk-*/file-*.parquet"}
EPISODES_META = {"v2.1": "meta/episodes.jsonl", "v3.0": "meta/episodes/chunk-*/file-*.parquet"}
TASKS_META = {"v2.1": "meta/tasks.jsonl", "v3.0": "meta/tasks.parquet"}
# Action feature names in order of preference: LeRobot's own datasets say 'action'; the LIBERO
# datasets converted for openpi (physical-intelligence/libero and its copies) say 'actions'.
ACTION_KEYS = ("action", "actions")
# Columns LeRobot adds to every frame (its DEFAULT_FEATURES): bookkeeping, not observations.
INDEX_COLUMNS = frozenset({"timestamp", "frame_index", "episode_index", "index", "task_index"})
# Feature dtypes read as observations; every other dtype (image, video, string, int, bool) is not.
FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})


class LeRobotFormatError(ValueError):
    """A folder that is not a readable LeRobot dataset; the message names the folder."""


def is_lerobot_dataset(path) -> bool:
    """True for a folder holding ``meta/info.json`` (either layout; the version is checked on read)."""
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, INFO_PATH))


def read_lerobot_dataset(path, only_success: bool = True) -> list[dict]:
    """Read every episode of a LeRobot dataset folder, sorted by episode_index.

    Returns one dict per episode: ``actions`` float32 [N, D]; ``obs`` {feature: float32 [N, d]};
    ``instruction`` (task text of the first frame); ``task_index``; ``episode_index``;
    ``key`` ("episode_<i>"); ``version`` ("v2.1" / "v3.0"); ``success``. LeRobot has no standard
    success flag, so an episode counts as successful unless its metadata row holds
    ``success: false``; ``only_success`` drops those.
    """
    root = os.fspath(path)
    version, features = _read_info(root)
    files = _data_files(root, version)
    action_key = _action_key(root, features)
    obs_keys = _obs_keys(features)
    tasks = _read_tasks(root, version)
    meta = _read_episode_meta(root, version)
    frames = _read_frames(root, files, action_key, obs_keys)
    _check_against_meta(root, frames, meta)
    episodes = []
    for ep in sorted(frames):
        episode = _assemble(root, ep, frames[ep], action_key, obs_keys, tasks)
        episode.update(key=f"episode_{ep}", version=version, success=meta[ep]["success"])
        episodes.append(episode)
    if only_success:
        episodes = [e for e in episodes if e["success"]]
    return episodes


# ---------------------------------------------------------------- metadata


def _read_info(root: str) -> tuple[str, dict]:
    """(codebase_version, features) of meta/info.json, or LeRobotFormatError."""
    if not is_lerobot_dataset(root):
        raise LeRobotFormatError(f"{root!r} is not a LeRobot dataset folder (no {INFO_PATH})")
    info_path = os.path.join(root, INFO_PATH)
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise LeRobotFormatError(f"{root!r}: {INFO_PATH} is not readable JSON: {exc}") from exc
    version = info.get("codebase_version")
    if version not in SUPPORTED_VERSIONS:
        raise LeRobotFormatError(f"{root!r}: {INFO_PATH} has codebase_version {version!r}; "
                                 f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    features = info.get("features")
    if not isinstance(features, dict) or not features:
        raise LeRobotFormatError(f"{root!r}: {INFO_PATH} has no 'features'")
    return version, features


def _action_key(root: str, features: dict) -> str:
    """The action feature: 'action' if declared, else 'actions'."""
    for key in ACTION_KEYS:
        if key in features:
            return key
    raise LeRobotFormatError(f"{root!r}: no action column ({' or '.join(ACTION_KEYS)}) among the "
                             f"features of {INFO_PATH}: {sorted(features)}")


def _obs_keys(features: dict) -> list[str]:
    """Float features of one axis that are neither an action nor a bookkeeping column, sorted."""
    keys = []
    for name, ft in features.items():
        if name in ACTION_KEYS or name in INDEX_COLUMNS:
            continue
        shape = ft.get("shape") or []
        if ft.get("dtype") in FLOAT_DTYPES and len(shape) == 1:
            keys.append(name)
    return sorted(keys)


def _read_tasks(root: str, version: str) -> dict[int, str]:
    """task_index -> task text."""
    path = os.path.join(root, TASKS_META[version])
    if not os.path.isfile(path):
        raise LeRobotFormatError(f"{root!r}: no task table {TASKS_META[version]}")
    if version == "v2.1":
        rows = _read_jsonl(root, path)
        for row in rows:
            if "task_index" not in row or "task" not in row:
                raise LeRobotFormatError(f"{root!r}: {TASKS_META[version]} row {row} lacks "
                                         f"'task_index' or 'task'")
        return {int(r["task_index"]): str(r["task"]) for r in rows}
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    # LeRobot writes a pandas frame indexed by task text; the index is stored as a column
    # named 'task' (or '__index_level_0__' when the index was left unnamed).
    text_cols = [f.name for f in table.schema
                 if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    text_col = "task" if "task" in text_cols else (text_cols[0] if len(text_cols) == 1 else None)
    if "task_index" not in table.column_names or text_col is None:
        raise LeRobotFormatError(f"{root!r}: {TASKS_META[version]} needs a 'task_index' column and "
                                 f"one task text column; it has {table.column_names}")
    indices = table.column("task_index").to_pylist()
    texts = table.column(text_col).to_pylist()
    return {int(i): str(t) for i, t in zip(indices, texts)}


def _read_episode_meta(root: str, version: str) -> dict[int, dict]:
    """episode_index -> {"length": int, "success": bool} from the per-episode metadata."""
    if version == "v2.1":
        path = os.path.join(root, EPISODES_META[version])
        if not os.path.isfile(path):
            raise LeRobotFormatError(f"{root!r}: no episode table {EPISODES_META[version]}")
        rows = _read_jsonl(root, path)
    else:
        rows = _read_episode_parquets(root)
    meta = {}
    for row in rows:
        if "episode_index" not in row or "length" not in row:
            raise LeRobotFormatError(f"{root!r}: {EPISODES_META[version]} has a row without "
                                     f"'episode_index' or 'length'")
        success = row.get("success")
        meta[int(row["episode_index"])] = {"length": int(row["length"]),
                                           "success": True if success is None else bool(success)}
    return meta


def _read_episode_parquets(root: str) -> list[dict]:
    """Rows (episode_index, length, success if present) of meta/episodes/chunk-*/file-*.parquet."""
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(root, EPISODES_META["v3.0"])))
    if not files:
        raise LeRobotFormatError(f"{root!r}: no episode metadata {EPISODES_META['v3.0']}")
    rows = []
    for path in files:
        names = pq.read_schema(path).names
        # Only the columns needed: the per-episode stats columns are many and large.
        cols = [c for c in ("episode_index", "length", "success") if c in names]
        rows.extend(pq.read_table(path, columns=cols).to_pylist())
    return rows


def _read_jsonl(root: str, path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    rel = os.path.relpath(path, root)
                    raise LeRobotFormatError(f"{root!r}: {rel} line {n} is not JSON: {exc}") from exc
    return rows


def _data_files(root: str, version: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(root, DATA_GLOB[version])))
    if not files:
        raise LeRobotFormatError(f"{root!r}: no data files {DATA_GLOB[version]} "
                                 f"(codebase_version {version})")
    return files


def _check_against_meta(root: str, frames: dict, meta: dict) -> None:
    """The episodes with frames are exactly those of the metadata, with its lengths."""
    missing = sorted(set(meta) - set(frames))
    unlisted = sorted(set(frames) - set(meta))
    if missing:
        raise LeRobotFormatError(f"{root!r}: episodes {missing} are in the episode metadata but "
                                 f"have no frames in data/")
    if unlisted:
        raise LeRobotFormatError(f"{root!r}: episodes {unlisted} have frames in data/ but are not "
                                 f"in the episode metadata")
    for ep, parts in frames.items():
        n = sum(len(p["frame_index"]) for p in parts)
        if n != meta[ep]["length"]:
            raise LeRobotFormatError(f"{root!r}: episode {ep} has {n} frames in data/ but length "
                                     f"{meta[ep]['length']} in the episode metadata")


# ---------------------------------------------------------------- frames


def _read_frames(root: str, files: list[str], action_key: str, obs_keys: list[str]) -> dict:
    """episode_index -> list of per-file parts {column: array}, each part's rows in file order.

    A part holds frame_index [n], task_index [n], the action [n, D] and each obs [n, d].
    """
    import pyarrow.parquet as pq

    wanted = ["episode_index", "frame_index", "task_index", action_key] + obs_keys
    frames: dict[int, list] = {}
    for path in files:
        rel = os.path.relpath(path, root)
        names = pq.read_schema(path).names
        absent = [c for c in wanted if c not in names]
        if absent:
            raise LeRobotFormatError(f"{root!r}: {rel} lacks column(s) {absent}; it has {names}")
        table = pq.read_table(path, columns=wanted)  # image columns are never read
        episode_index = _int_column(root, rel, table, "episode_index")
        columns = {"frame_index": _int_column(root, rel, table, "frame_index"),
                   "task_index": _int_column(root, rel, table, "task_index")}
        for name in [action_key] + obs_keys:
            columns[name] = _float_column(root, rel, table, name, episode_index)
        for ep in np.unique(episode_index):
            rows = episode_index == ep
            frames.setdefault(int(ep), []).append({k: v[rows] for k, v in columns.items()})
    return frames


def _int_column(root: str, rel: str, table, name: str) -> np.ndarray:
    """An integer column as int64 [n]."""
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    if not pa.types.is_integer(col.type) or col.null_count:
        raise LeRobotFormatError(f"{root!r}: {rel} column {name!r} must be integers without "
                                 f"missing values, got {col.type} with {col.null_count} missing")
    return col.to_numpy().astype(np.int64)


def _float_column(root: str, rel: str, table, name: str, episode_index: np.ndarray) -> np.ndarray:
    """A float column (scalar per row, or a list of floats per row) as float32 [n, d].

    Rows of different lengths (ragged) or missing values raise LeRobotFormatError naming the
    file, column, episode and row.
    """
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    n = len(col)
    where = f"{root!r}: {rel} column {name!r}"
    if col.null_count:
        row = int(np.flatnonzero(~col.is_valid().to_numpy(zero_copy_only=False))[0])
        raise LeRobotFormatError(f"{where} has a missing value (episode {episode_index[row]}, "
                                 f"row {row})")
    if pa.types.is_floating(col.type):
        return col.to_numpy().astype(np.float32).reshape(n, 1)
    is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
    if not (is_list or pa.types.is_fixed_size_list(col.type)) \
            or not pa.types.is_floating(col.type.value_type):
        raise LeRobotFormatError(f"{where} has type {col.type}; expected float or list of float")
    values = col.flatten()
    if values.null_count:
        raise LeRobotFormatError(f"{where} holds missing values inside its rows")
    if is_list:
        lengths = col.value_lengths().to_numpy()
        if n and np.any(lengths != lengths[0]):
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise LeRobotFormatError(f"{where} has ragged rows: row {row} (episode "
                                     f"{episode_index[row]}) has {lengths[row]} values, row 0 "
                                     f"has {lengths[0]}")
        dim = int(lengths[0]) if n else 0
    else:
        dim = col.type.list_size
    return values.to_numpy().astype(np.float32).reshape(n, dim)


def _assemble(root: str, ep: int, parts: list[dict], action_key: str, obs_keys: list[str],
              tasks: dict[int, str]) -> dict:
    """One episode's parts joined and ordered by frame_index; values checked finite."""
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(joined["frame_index"], kind="stable")
    joined = {k: v[order] for k, v in joined.items()}
    frame_index = joined["frame_index"]
    if len(frame_index) > 1 and np.any(np.diff(frame_index) == 0):
        dup = int(frame_index[np.flatnonzero(np.diff(frame_index) == 0)[0]])
        raise LeRobotFormatError(f"{root!r}: episode {ep} has frame_index {dup} more than once")
    for name in [action_key] + obs_keys:
        _check_finite(root, ep, name, joined[name])
    task_index = int(joined["task_index"][0])
    if task_index not in tasks:
        raise LeRobotFormatError(f"{root!r}: episode {ep} has task_index {task_index}, which is "
                                 f"not in the task table")
    return {"actions": joined[action_key],
            "obs": {k: joined[k] for k in obs_keys},
            "instruction": tasks[task_index],
            "task_index": task_index,
            "episode_index": ep}


def _check_finite(root: str, ep: int, name: str, values: np.ndarray) -> None:
    """values: [N, d]; NaN or inf raises LeRobotFormatError naming the episode and step."""
    bad = ~np.isfinite(values)
    if bad.any():
        step = int(np.argwhere(bad)[0][0])
        raise LeRobotFormatError(f"{root!r}: episode {ep} column {name!r} holds NaN or inf "
                                 f"(first at step {step})")
