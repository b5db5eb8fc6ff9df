"""demos.py: the demo file format (writer, reader, errors), chunks and splits by episode."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

import demos

def make_episode(n=30, d=7, seed=0, success=True, task_id=0, init_state_id=20):
    rng = np.random.default_rng(seed)
    return demos.Episode(
        actions=rng.uniform(-1, 1, (n, d)).astype(np.float32),
        obs={"robot0_eef_pos": rng.normal(size=(n, 3)), "object-state": rng.normal(size=(n, 10))},
        success=success, task_suite="libero_spatial", task_id=task_id,
        instruction="pick up the black bowl", init_state_id=init_state_id, seed=seed,
    )


def write_demo_file(path, episodes):
    w = demos.DemoWriter(str(path), {"suite": "libero_spatial"})
    for i, ep in enumerate(episodes):
        w.add(ep, {"episode_index": i})
    return w.finish()


def test_writer_reader_round_trip(tmp_path):
    eps = [make_episode(30, seed=1), make_episode(25, seed=2, success=False), make_episode(40, seed=3)]
    path = write_demo_file(tmp_path / "demos.hdf5", eps)
    assert not os.path.exists(demos.partial_path(path))
    loaded = demos.load_episodes(path, only_success=False)
    assert [e.key for e in loaded] == ["demo_0", "demo_1", "demo_2"]
    for a, b in zip(eps, loaded):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.obs["object-state"], b.obs["object-state"])
        assert (a.success, a.seed, a.init_state_id, a.instruction) == (b.success, b.seed, b.init_state_id, b.instruction)
    # failed episodes stay in the file but are left out by default
    assert [e.seed for e in demos.load_episodes(path)] == [1, 3]
    with h5py.File(path) as f:
        assert f["data"].attrs["complete"]
        assert f["data/demo_1"].attrs["num_samples"] == 25
        assert f["data/demo_2/rewards"][-1] == 1.0 and f["data/demo_2/dones"][-1] == 1


def test_expert_actions_round_trip_and_select_the_targets(tmp_path):
    plain, perturbed = make_episode(30, seed=1), make_episode(20, seed=2)
    perturbed.expert_actions = np.clip(perturbed.actions + 0.1, -1, 1).astype(np.float32)
    path = write_demo_file(tmp_path / "demos.hdf5", [plain, perturbed])
    a, b = demos.load_episodes(path)
    assert a.expert_actions is None
    np.testing.assert_array_equal(b.expert_actions, perturbed.expert_actions)
    np.testing.assert_array_equal(demos.episode_targets(b, "expert_actions"), perturbed.expert_actions)
    np.testing.assert_array_equal(demos.episode_targets(b, "actions"), perturbed.actions)
    with pytest.raises(ValueError, match=r"demo_0 has no expert_actions"):
        demos.episode_targets(a, "expert_actions")
    with pytest.raises(ValueError, match="targets must be one of"):
        demos.episode_targets(a, "labels")
    with h5py.File(path, "r+") as f:  # a foreign file whose expert_actions do not match
        del f["data/demo_1/expert_actions"]
        f["data/demo_1"].create_dataset("expert_actions", data=np.zeros((19, 7), np.float32))
    with pytest.raises(demos.DemoFileError, match=r"demo_1/expert_actions must be finite with the shape"):
        demos.load_episodes(path)


def test_episode_from_keeps_the_tail_of_every_array():
    ep = make_episode(n=30)
    ep.expert_actions = ep.actions * 2
    tail = demos.episode_from(ep, 12)
    assert len(tail) == 18 and tail.init_state_id == ep.init_state_id
    np.testing.assert_array_equal(tail.actions, ep.actions[12:])
    np.testing.assert_array_equal(tail.expert_actions, ep.expert_actions[12:])
    for k in ep.obs:
        np.testing.assert_array_equal(tail.obs[k], ep.obs[k][12:])
    for bad in (-1, 30):
        with pytest.raises(ValueError, match=f"no step {bad}"):
            demos.episode_from(ep, bad)


def test_interrupted_writer_keeps_complete_episodes_and_old_output(tmp_path):
    out = tmp_path / "demos.hdf5"
    write_demo_file(out, [make_episode(seed=9)])  # a dataset already written
    w = demos.DemoWriter(str(out), {"suite": "libero_spatial"})
    w.add(make_episode(seed=1))
    w.add(make_episode(seed=2))
    kept = w.abandon()
    assert kept == demos.partial_path(str(out))
    assert [e.seed for e in demos.load_episodes(kept)] == [1, 2]
    assert [e.seed for e in demos.load_episodes(out)] == [9]  # untouched


def test_reader_accepts_foreign_layouts_and_any_action_dim(tmp_path):
    """robomimic / LIBERO official demos: no per-demo attrs, images in obs, problem_info JSON."""
    path = tmp_path / "robomimic.hdf5"
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = '{"language_instruction": "open the drawer"}'
        for i, n in [(0, 12), (10, 15), (2, 11)]:
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=np.ones((n, 12), dtype=np.float64) * i)
            g.create_dataset("obs/agentview_rgb", data=np.zeros((n, 8, 8, 3), dtype=np.uint8))
            g.create_dataset("obs/joint_states", data=np.zeros((n, 9)))
            g.create_dataset("states", data=np.zeros((n, 50)))
    eps = demos.load_episodes(path)
    assert [e.key for e in eps] == ["demo_0", "demo_2", "demo_10"]
    assert all(e.success and e.actions.shape[1] == 12 for e in eps)
    assert eps[0].instruction == "open the drawer"
    assert "agentview_rgb" not in eps[0].obs and "joint_states" in eps[0].obs
    assert "agentview_rgb" in demos.load_episodes(path, images=True)[0].obs


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not_hdf5", "not a readable HDF5"),
    ("no_demos", "no data/demo_*/actions"),
    ("no_actions", "demo_0 has no 'actions'"),
    ("nan", "demo_1/actions holds NaN or inf"),
    ("dim", "demo_0/actions has dimension 7, expected 6"),
])
def test_reader_errors_name_file_and_demo(tmp_path, case, message):
    path = tmp_path / f"{case}.hdf5"
    if case == "not_hdf5":
        path.write_text("hello")
    elif case != "missing":
        with h5py.File(path, "w") as f:
            if case == "no_demos":
                f.create_group("data").create_group("mask")
            elif case == "no_actions":
                f.create_group("data/demo_0").create_dataset("obs_x", data=np.zeros(3))
            else:
                f.create_dataset("data/demo_0/actions", data=np.zeros((5, 7)))
                bad = np.zeros((5, 7))
                if case == "nan":
                    bad[3, 2] = np.nan
                f.create_dataset("data/demo_1/actions", data=bad)
    with pytest.raises(demos.DemoFileError) as err:
        demos.load_episodes(path, action_dim=6 if case == "dim" else None)
    assert message in str(err.value) and str(path) in str(err.value)


def test_chunks_are_windows_inside_whole_demos():
    a = make_episode(n=13, seed=0)
    b = make_episode(n=5, seed=1)  # shorter than a chunk: contributes nothing
    c = make_episode(n=10, seed=2)
    chunks = demos.chunk_actions([a, b, c], chunk_size=10, stride=2)
    assert chunks.shape == (2 + 1, 10, 7)  # starts 0, 2 in a; 0 in c
    np.testing.assert_array_equal(chunks[1], a.actions[2:12])
    np.testing.assert_array_equal(chunks[2], c.actions)
    with pytest.raises(ValueError, match="chunk_size"):
        demos.chunk_actions([a], chunk_size=0)


def test_split_is_by_episode_and_deterministic():
    eps = [make_episode(seed=i) for i in range(20)]
    train, val = demos.split_by_episode(eps, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert not {e.seed for e in train} & {e.seed for e in val}
    assert [e.seed for e in demos.split_by_episode(eps, 0.2, seed=3)[1]] == [e.seed for e in val]
    with pytest.raises(ValueError, match="1 episode"):
        demos.split_by_episode(eps[:1], 0.2)
    with pytest.raises(ValueError, match="val_fraction"):
        demos.split_by_episode(eps, 1.5)
