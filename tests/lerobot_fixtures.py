"""Small LeRobot dataset folders written with pyarrow, in the v2.1 and v3.0 layouts.

An episode given to the writers is a dict: ``actions`` [N, D] float32, ``state`` [N, S] float32,
``task`` (text, or one text per frame), optionally ``success`` (bool, written to the episode
metadata). Episode i gets episode_index i; task indices follow the order of first appearance.
Nothing is downloaded; the folders are what a reader of either layout meets on disk.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FPS = 10
TASKS = ("pick up the black bowl and place it on the plate", "open the top drawer of the cabinet")
# The struct HF datasets stores an 'image' feature as inside the parquet rows.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def make_episodes(n_episodes=4, action_dim=7, state_dim=8, seed=0, tasks=TASKS) -> list[dict]:
    """n_episodes episodes of 9 to 15 steps, alternating over the tasks."""
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(n_episodes):
        n = int(rng.integers(9, 16))
        episodes.append({"actions": rng.uniform(-1, 1, (n, action_dim)).astype(np.float32),
                         "state": rng.normal(size=(n, state_dim)).astype(np.float32),
                         "task": tasks[i % len(tasks)]})
    return episodes


def write_lerobot_v21(root, episodes, *, action_key="action", state_key="observation.state",
                      image_key=None, video_key=None, shuffle_rows=False):
    """v2.1: data/chunk-000/episode_XXXXXX.parquet, meta/{info.json,episodes.jsonl,tasks.jsonl}.

    Vectors are stored as fixed-size lists. Returns root.
    """
    root = os.fspath(root)
    task_ids = _task_ids(episodes)
    os.makedirs(os.path.join(root, "data", "chunk-000"), exist_ok=True)
    start = 0
    for i, ep in enumerate(episodes):
        table = _frame_table(ep, i, start, task_ids, action_key, state_key, image_key,
                             fixed_size=True)
        _write_parquet(table, os.path.join(root, "data", "chunk-000", f"episode_{i:06d}.parquet"),
                       shuffle_rows, seed=i)
        start += len(ep["actions"])
    rows = [dict(episode_index=i, tasks=_episode_tasks(ep), length=len(ep["actions"]),
                 **({"success": ep["success"]} if "success" in ep else {}))
            for i, ep in enumerate(episodes)]
    _write_jsonl(os.path.join(root, "meta", "episodes.jsonl"), rows)
    _write_jsonl(os.path.join(root, "meta", "tasks.jsonl"),
                 [{"task_index": t, "task": text} for text, t in task_ids.items()])
    _write_info(root, "v2.1", episodes, task_ids, action_key, state_key, image_key, video_key,
                data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet")
    return root


def write_lerobot_v30(root, episodes, *, action_key="action", state_key="observation.state",
                      image_key=None, video_key=None, shuffle_rows=False, episodes_per_file=2,
                      tasks_text_column="task"):
    """v3.0: data/chunk-000/file-XXX.parquet with episodes_per_file episodes each,
    meta/episodes/chunk-000/file-000.parquet, meta/tasks.parquet, meta/info.json.

    Vectors are stored as variable-length lists. tasks_text_column: 'task' (LeRobot's named
    pandas index) or '__index_level_0__' (an unnamed one). Returns root.
    """
    root = os.fspath(root)
    task_ids = _task_ids(episodes)
    os.makedirs(os.path.join(root, "data", "chunk-000"), exist_ok=True)
    meta_rows, start = [], 0
    for f, first in enumerate(range(0, len(episodes), episodes_per_file)):
        tables = []
        for i in range(first, min(first + episodes_per_file, len(episodes))):
            ep, n = episodes[i], len(episodes[i]["actions"])
            tables.append(_frame_table(ep, i, start, task_ids, action_key, state_key, image_key,
                                       fixed_size=False))
            meta_rows.append({
                "episode_index": i, "tasks": _episode_tasks(ep), "length": n,
                "data/chunk_index": 0, "data/file_index": f,
                "dataset_from_index": start, "dataset_to_index": start + n,
                "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                f"stats/{action_key}/mean": ep["actions"].mean(0).astype(np.float64).tolist(),
            })
            if any("success" in e for e in episodes):  # a column for all rows or none
                meta_rows[-1]["success"] = bool(ep.get("success", True))
            start += n
        _write_parquet(pa.concat_tables(tables),
                       os.path.join(root, "data", "chunk-000", f"file-{f:03d}.parquet"),
                       shuffle_rows, seed=f)
    meta_dir = os.path.join(root, "meta", "episodes", "chunk-000")
    os.makedirs(meta_dir, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(meta_rows), os.path.join(meta_dir, "file-000.parquet"))
    pq.write_table(pa.table({"task_index": pa.array(list(task_ids.values()), pa.int64()),
                             tasks_text_column: pa.array(list(task_ids), pa.string())}),
                   os.path.join(root, "meta", "tasks.parquet"))
    _write_info(root, "v3.0", episodes, task_ids, action_key, state_key, image_key, video_key,
                data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet")
    return root


def _task_ids(episodes) -> dict[str, int]:
    ids: dict[str, int] = {}
    for ep in episodes:
        for text in _frame_tasks(ep):
            ids.setdefault(text, len(ids))
    return ids


def _frame_tasks(ep) -> list[str]:
    task, n = ep["task"], len(ep["actions"])
    return [task] * n if isinstance(task, str) else list(task)


def _episode_tasks(ep) -> list[str]:
    return list(dict.fromkeys(_frame_tasks(ep)))


def _vectors(values: np.ndarray, fixed_size: bool):
    """[n, d] float32 -> a fixed-size or variable list column of n rows."""
    flat = pa.array(values.reshape(-1), pa.float32())
    if fixed_size:
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    offsets = pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def _frame_table(ep, episode_index, start, task_ids, action_key, state_key, image_key,
                 fixed_size):
    n = len(ep["actions"])
    cols = {}
    if image_key:
        rng = np.random.default_rng(episode_index)
        cols[image_key] = pa.array([{"bytes": b"\x89PNG" + rng.bytes(32), "path": None}
                                    for _ in range(n)], IMAGE_TYPE)
    cols[state_key] = _vectors(ep["state"], fixed_size)
    cols[action_key] = _vectors(ep["actions"], fixed_size)
    cols["timestamp"] = pa.array(np.arange(n, dtype=np.float32) / FPS)
    cols["frame_index"] = pa.array(np.arange(n, dtype=np.int64))
    cols["episode_index"] = pa.array(np.full(n, episode_index, dtype=np.int64))
    cols["index"] = pa.array(np.arange(start, start + n, dtype=np.int64))
    cols["task_index"] = pa.array([task_ids[t] for t in _frame_tasks(ep)], pa.int64())
    return pa.table(cols)


def _write_parquet(table, path, shuffle_rows, seed):
    if shuffle_rows:
        table = table.take(np.random.default_rng(seed).permutation(table.num_rows))
    pq.write_table(table, path)


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _write_info(root, version, episodes, task_ids, action_key, state_key, image_key, video_key,
                data_path):
    action_dim, state_dim = episodes[0]["actions"].shape[1], episodes[0]["state"].shape[1]
    features = {}
    if image_key:
        features[image_key] = {"dtype": "image", "shape": [8, 8, 3],
                               "names": ["height", "width", "channel"]}
    if video_key:  # declared only: the reader must not look for its mp4 files
        features[video_key] = {"dtype": "video", "shape": [8, 8, 3],
                               "names": ["height", "width", "channel"]}
    features[state_key] = {"dtype": "float32", "shape": [state_dim], "names": None}
    features[action_key] = {"dtype": "float32", "shape": [action_dim], "names": None}
    for name, dtype in (("timestamp", "float32"), ("frame_index", "int64"),
                        ("episode_index", "int64"), ("index", "int64"), ("task_index", "int64")):
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    info = {"codebase_version": version, "robot_type": "panda",
            "total_episodes": len(episodes),
            "total_frames": int(sum(len(e["actions"]) for e in episodes)),
            "total_tasks": len(task_ids), "chunks_size": 1000, "fps": FPS,
            "splits": {"train": f"0:{len(episodes)}"}, "data_path": data_path,
            "video_path": None, "features": features}
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    with open(os.path.join(root, "meta", "info.json"), "w") as f:
        json.dump(info, f, indent=4)
