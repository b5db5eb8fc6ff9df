"""lerobot_format.py: LeRobot dataset folders (v2.1 and v3.0) built here with pyarrow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lerobot_format as lf
from lerobot_fixtures import TASKS, make_episodes, write_lerobot_v21, write_lerobot_v30

WRITERS = {"v2.1": write_lerobot_v21, "v3.0": write_lerobot_v30}


def check_read(read, episodes, version, state_key="observation.state"):
    """read: what read_lerobot_dataset returned; episodes: what the writer was given."""
    assert [e["episode_index"] for e in read] == list(range(len(episodes)))
    for i, (got, want) in enumerate(zip(read, episodes)):
        assert got["actions"].dtype == np.float32
        assert got["actions"].tobytes() == want["actions"].tobytes()  # bit-exact
        assert got["actions"].shape == want["actions"].shape
        assert set(got["obs"]) == {state_key}
        assert got["obs"][state_key].dtype == np.float32
        np.testing.assert_array_equal(got["obs"][state_key], want["state"])
        assert got["instruction"] == want["task"]
        assert got["key"] == f"episode_{i}"
        assert got["version"] == version
        assert got["success"] is True


def data_file(root, version):
    name = "episode_000001.parquet" if version == "v2.1" else "file-000.parquet"
    return os.path.join(root, "data", "chunk-000", name)


def rewrite(path, change):
    """Rewrite one parquet file with change(table) -> table."""
    pq.write_table(change(pq.read_table(path)), path)


# ---------------------------------------------------------------- reading


def test_v30_several_episodes_per_file_over_two_files(tmp_path):
    episodes = make_episodes(4)
    root = write_lerobot_v30(tmp_path / "ds", episodes, image_key="observation.images.image",
                             video_key="observation.images.wrist_image", episodes_per_file=2)
    files = sorted(os.listdir(os.path.join(root, "data", "chunk-000")))
    assert files == ["file-000.parquet", "file-001.parquet"]
    assert set(pq.read_table(os.path.join(root, "data", "chunk-000", files[0]))
               .column("episode_index").to_pylist()) == {0, 1}
    read = lf.read_lerobot_dataset(root)
    check_read(read, episodes, "v3.0")
    assert [e["instruction"] for e in read] == [TASKS[0], TASKS[1], TASKS[0], TASKS[1]]
    assert [e["task_index"] for e in read] == [0, 1, 0, 1]


def test_v21_one_episode_per_file(tmp_path):
    episodes = make_episodes(3)
    root = write_lerobot_v21(tmp_path / "ds", episodes, image_key="observation.images.image")
    assert len(os.listdir(os.path.join(root, "data", "chunk-000"))) == 3
    check_read(lf.read_lerobot_dataset(root), episodes, "v2.1")


def test_v21_and_v30_of_the_same_data_read_identically(tmp_path):
    episodes = make_episodes(4, seed=3)
    a = lf.read_lerobot_dataset(write_lerobot_v21(tmp_path / "v21", episodes))
    b = lf.read_lerobot_dataset(write_lerobot_v30(tmp_path / "v30", episodes, episodes_per_file=3))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x.pop("version") == "v2.1" and y.pop("version") == "v3.0"
        assert x["actions"].tobytes() == y["actions"].tobytes()
        assert x["obs"].keys() == y["obs"].keys()
        for k in x["obs"]:
            assert x["obs"][k].tobytes() == y["obs"][k].tobytes()
        assert {k: v for k, v in x.items() if k not in ("actions", "obs")} == \
               {k: v for k, v in y.items() if k not in ("actions", "obs")}


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_frames_ordered_by_frame_index(tmp_path, version):
    episodes = make_episodes(4, seed=1)
    root = WRITERS[version](tmp_path / "ds", episodes, shuffle_rows=True)
    frame_index = pq.read_table(data_file(root, version)).column("frame_index").to_pylist()
    assert frame_index != sorted(frame_index)  # the rows on disk really are shuffled
    check_read(lf.read_lerobot_dataset(root), episodes, version)


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_openpi_libero_columns(tmp_path, version):
    """openpi's LIBERO conversions: 'image', 'wrist_image' (images), 'state', 'actions'."""
    episodes = make_episodes(3, seed=2)
    root = WRITERS[version](tmp_path / "ds", episodes, action_key="actions", state_key="state",
                            image_key="image")
    check_read(lf.read_lerobot_dataset(root), episodes, version, state_key="state")


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_episode_with_several_tasks_takes_its_first_frames_task(tmp_path, version):
    episodes = make_episodes(3)
    n = len(episodes[0]["actions"])
    episodes[0]["task"] = [TASKS[1]] * 2 + [TASKS[0]] * (n - 2)
    read = lf.read_lerobot_dataset(WRITERS[version](tmp_path / "ds", episodes))
    assert read[0]["instruction"] == TASKS[1]
    assert [e["instruction"] for e in read[1:]] == [TASKS[1], TASKS[0]]


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_only_success_drops_episodes_marked_unsuccessful(tmp_path, version):
    episodes = make_episodes(3)
    episodes[1]["success"] = False
    root = WRITERS[version](tmp_path / "ds", episodes)
    assert [e["episode_index"] for e in lf.read_lerobot_dataset(root)] == [0, 2]
    read = lf.read_lerobot_dataset(root, only_success=False)
    assert [e["success"] for e in read] == [True, False, True]


def test_v30_tasks_parquet_with_unnamed_pandas_index(tmp_path):
    episodes = make_episodes(2)
    root = write_lerobot_v30(tmp_path / "ds", episodes, tasks_text_column="__index_level_0__")
    assert [e["instruction"] for e in lf.read_lerobot_dataset(root)] == [TASKS[0], TASKS[1]]


def test_is_lerobot_dataset(tmp_path):
    root = write_lerobot_v30(tmp_path / "ds", make_episodes(2))
    assert lf.is_lerobot_dataset(root) and lf.is_lerobot_dataset(tmp_path / "ds")
    assert not lf.is_lerobot_dataset(tmp_path)
    assert not lf.is_lerobot_dataset(os.path.join(root, "meta", "info.json"))
    assert not lf.is_lerobot_dataset(tmp_path / "missing")


def test_pyarrow_not_imported_with_the_module():
    code = "import sys, lerobot_format; assert 'pyarrow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------- errors


def expect_error(root, *fragments):
    with pytest.raises(lf.LeRobotFormatError) as exc:
        lf.read_lerobot_dataset(root)
    message = str(exc.value)
    assert "\n" not in message
    assert str(root) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def declare_version(root, version):
    """Rewrite the codebase version a dataset's meta/info.json declares."""
    info_path = os.path.join(root, "meta", "info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["codebase_version"] = version
    with open(info_path, "w") as f:
        json.dump(info, f)


def test_error_folder_without_info_json(tmp_path):
    (tmp_path / "data").mkdir()
    expect_error(str(tmp_path), "not a LeRobot dataset", "meta/info.json")


def test_error_unknown_codebase_version(tmp_path):
    root = write_lerobot_v21(tmp_path / "ds", make_episodes(2))
    declare_version(root, "v1.6")
    expect_error(root, "'v1.6'", "v2.1", "v3.0")


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_error_no_data_files(tmp_path, version):
    root = WRITERS[version](tmp_path / "ds", make_episodes(2))
    for name in os.listdir(os.path.join(root, "data", "chunk-000")):
        os.remove(os.path.join(root, "data", "chunk-000", name))
    expect_error(root, "no data files", lf.DATA_GLOB[version])


def test_error_v21_layout_declared_v30(tmp_path):
    """A v2.1 folder whose info.json says v3.0 has no data/chunk-*/file-*.parquet."""
    root = write_lerobot_v21(tmp_path / "ds", make_episodes(2))
    declare_version(root, "v3.0")
    expect_error(root, "no data files", "file-*.parquet")


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_error_no_action_feature(tmp_path, version):
    root = WRITERS[version](tmp_path / "ds", make_episodes(2), action_key="joint_targets")
    expect_error(root, "no action column", "'joint_targets'", "'observation.state'")


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_error_action_column_missing_from_a_data_file(tmp_path, version):
    root = WRITERS[version](tmp_path / "ds", make_episodes(3), image_key="image")
    path = data_file(root, version)
    rewrite(path, lambda t: t.drop_columns(["action"]))
    expect_error(root, os.path.relpath(path, root), "['action']", "'observation.state'", "'image'")


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_error_nan_action_names_episode_and_step(tmp_path, version):
    episodes = make_episodes(3)
    episodes[2]["actions"][5, 3] = np.nan
    root = WRITERS[version](tmp_path / "ds", episodes, shuffle_rows=True)
    expect_error(root, "episode 2", "'action'", "NaN or inf", "step 5")


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_error_inf_observation_names_episode_and_step(tmp_path, version):
    episodes = make_episodes(3)
    episodes[1]["state"][4, 0] = np.inf
    root = WRITERS[version](tmp_path / "ds", episodes)
    expect_error(root, "episode 1", "'observation.state'", "NaN or inf", "step 4")


def test_error_ragged_action_rows(tmp_path):
    root = write_lerobot_v30(tmp_path / "ds", make_episodes(4))
    path = data_file(root, "v3.0")

    def drop_one_value_of_row_3(table):
        rows = table.column("action").to_pylist()
        rows[3] = rows[3][:-1]
        i = table.column_names.index("action")
        return table.set_column(i, "action", pa.array(rows, pa.list_(pa.float32())))

    rewrite(path, drop_one_value_of_row_3)
    expect_error(root, os.path.relpath(path, root), "'action'", "ragged", "row 3", "episode 0",
                 "6 values")


def test_error_episode_metadata_disagrees_with_data(tmp_path):
    root = write_lerobot_v21(tmp_path / "ds", make_episodes(3))
    os.remove(data_file(root, "v2.1"))
    expect_error(root, "episodes [1]", "no frames")


def test_error_task_index_not_in_task_table(tmp_path):
    root = write_lerobot_v21(tmp_path / "ds", make_episodes(3))
    with open(os.path.join(root, "meta", "tasks.jsonl"), "w") as f:
        f.write(json.dumps({"task_index": 0, "task": TASKS[0]}) + "\n")
    expect_error(root, "episode 1", "task_index 1")
