"""collect_actions.py: rollout policies, jobs and seeds, the openpi client, collection."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

import collect_actions as ca
import demos
from test_demos import make_episode, write_demo_file
from openpi_fake_server import FakeOpenPIServer


# ---------------------------------------------------------------- demo file round trip

class ConstantPolicy(ca.Policy):
    """Returns the same action every step; records the rng draws its reset consumed."""

    def reset(self, task, rng):
        self.style = rng.uniform(size=3)

    def act(self, obs):
        return np.array([[0.2, -0.3, 0.0, 0.95, 0.0, 0.0, -1.0]])


def perturbed_run(std, steps, seed=0, correlation=0.9):
    policy = ca.PerturbedPolicy(ConstantPolicy(), std, correlation)
    policy.reset(None, np.random.default_rng(seed))
    executed, labels = [], []
    for _ in range(steps):
        executed.append(policy.act({})[0])
        labels.append(policy.last_labels[0])
    return policy, np.array(executed), np.array(labels)


def test_perturbation_is_smooth_arm_only_and_labels_are_the_clean_actions():
    policy, executed, labels = perturbed_run(0.1, 4000)
    np.testing.assert_array_equal(labels, np.tile(ConstantPolicy().act({}), (4000, 1)))
    delta = executed - labels
    assert np.all(delta[:, 6] == 0)  # the gripper is never perturbed
    assert np.all(np.abs(executed) <= 1.0)  # clipped to the action range (dim 3 sits at 0.95)
    free = delta[:, [0, 1, 2, 4, 5]]
    assert 0.08 < free.std() < 0.12  # the stationary std is the flag's value
    lag1 = np.mean([np.corrcoef(free[1:, j], free[:-1, j])[0, 1] for j in range(5)])
    assert 0.85 < lag1 < 0.95  # correlated from step to step: it pushes the arm off course
    # the wrapped policy's own rng draws are those of an unwrapped reset with the same seed
    plain = ConstantPolicy()
    plain.reset(None, np.random.default_rng(0))
    np.testing.assert_array_equal(policy.inner.style, plain.style)
    # same seed, same perturbation; another seed, another one
    np.testing.assert_array_equal(perturbed_run(0.1, 50)[1], executed[:50])
    assert not np.allclose(perturbed_run(0.1, 50, seed=1)[1], executed[:50])


class ChunkLearner(ca.Policy):
    """Returns 4-step chunks of 0.5; counts the steps it was asked for."""

    def reset(self, task, rng):
        self.steps = 0

    def act(self, obs):
        return np.full((4, 7), 0.5)


class RecordingExpert(ChunkLearner):
    def reset(self, task, rng):
        self.reset_with, self.took_over = task, None

    def take_over(self, obs, first_obs):
        self.took_over = (first_obs["t"], obs["t"])

    def act(self, obs):
        return np.full((1, 7), -0.5)


def test_takeover_policy_hands_over_at_the_drawn_step():
    switches = set()
    for seed in range(12):
        policy = ca.TakeoverPolicy(ChunkLearner(), RecordingExpert(), 5, 11)
        policy.reset("task", np.random.default_rng(seed))
        executed, t = [], 0
        while t < 20:
            chunk = policy.act({"t": t})
            executed += list(chunk[:, 0])
            t += len(chunk)
        s = policy.takeover_step
        assert 5 <= s <= 11 and policy.switch == s
        # the learner's chunk is cut at the switch; every later step is the expert's
        assert executed[:s] == [0.5] * s and set(executed[s:]) == {-0.5}
        assert policy.expert.took_over == (0, s) and policy.expert.reset_with == "task"
        switches.add(s)
    assert len(switches) > 3  # drawn per episode
    # an episode that ends before the switch never calls the expert
    policy = ca.TakeoverPolicy(ChunkLearner(), RecordingExpert(), 30, 30)
    policy.reset("task", np.random.default_rng(0))
    policy.act({"t": 0})
    assert policy.takeover_step is None and not hasattr(policy.expert, "took_over")
    with pytest.raises(ValueError, match="first <= last"):
        ca.TakeoverPolicy(ChunkLearner(), RecordingExpert(), 9, 3)


def test_perturbation_flags_are_checked():
    with pytest.raises(ValueError, match="--perturb must be a finite number >= 0, got -0.1"):
        ca.PerturbedPolicy(ConstantPolicy(), -0.1)
    with pytest.raises(ValueError, match="--perturb must be a finite number >= 0"):
        ca.CollectArgs(perturb=float("nan"))
    assert isinstance(ca.make_policy(ca.PolicySpec("scripted", perturb=0.1)), ca.PerturbedPolicy)
    assert not isinstance(ca.make_policy(ca.PolicySpec("scripted")), ca.PerturbedPolicy)



def test_jobs_and_seeds_do_not_depend_on_workers():
    jobs = ca.make_jobs("libero_spatial", [0, 3], 35, seed=7)
    assert len(jobs) == 70
    assert [j.init_state_id for j in jobs[:31]] == list(range(20, 50)) + [20]
    assert len({j.seed for j in jobs}) == 70
    assert ca.make_jobs("libero_spatial", [0, 3], 35, seed=7) == jobs
    assert not {j.seed for j in jobs} & {j.seed for j in ca.make_jobs("libero_spatial", [0, 3], 35, seed=8)}
    assert [j.init_state_id for j in ca.make_jobs("libero_spatial", [0], 3, 0, "held_out")] == [0, 1, 2]
    with pytest.raises(ValueError, match="init state ids"):
        ca.make_jobs("libero_spatial", [0], 3, 0, [51])


def test_unknown_suite_and_task_list_valid_ones():
    with pytest.raises(ValueError, match="valid suites: libero_spatial, libero_object"):
        ca.get_task("libero_space", 0)
    with pytest.raises(ValueError, match=r"valid task ids: 0\.\.9"):
        ca.get_task("libero_spatial", 10)
    with pytest.raises(ValueError, match="scripted expert does not solve 'libero_90'"):
        ca.collect(ca.CollectArgs(task_suite="libero_90", task_id=[0], num_episodes=1, output="/nonexistent/x.hdf5"))
    ca.check_policy_supports("scripted", "libero_goal")
    ca.check_policy_supports("token", "libero_90")  # a token policy may drive anywhere, the expert may not take over
    with pytest.raises(ValueError, match="scripted expert does not solve 'libero_90'"):
        ca.collect(ca.CollectArgs(task_suite="libero_90", task_id=[0], num_episodes=1, policy="token",
                                  checkpoint=__file__, takeover=(5, 10), output="/nonexistent/x.hdf5"))


# ---------------------------------------------------------------- openpi client

def fake_obs(rng):
    return {
        "agentview_image": rng.integers(0, 255, (256, 256, 3), dtype=np.uint8),
        "robot0_eye_in_hand_image": rng.integers(0, 255, (256, 256, 3), dtype=np.uint8),
        "robot0_eef_pos": np.array([0.1, 0.2, 0.3]),
        "robot0_eef_quat": np.array([0.0, 0.0, np.sin(0.25), np.cos(0.25)]),  # 0.5 rad about z
        "robot0_gripper_qpos": np.array([0.04, -0.04]),
    }


def test_openpi_observation_matches_openpi_libero_example():
    rng = np.random.default_rng(0)
    obs = fake_obs(rng)
    req = ca.openpi_observation(obs, "put the bowl on the plate")
    assert req["observation/image"].shape == (224, 224, 3) and req["observation/image"].dtype == np.uint8
    np.testing.assert_allclose(req["observation/state"], [0.1, 0.2, 0.3, 0, 0, 0.5, 0.04, -0.04], atol=1e-6)
    assert req["prompt"] == "put the bowl on the plate"
    # rotated 180 degrees: the bottom-right pixel of the render is the top-left of the request
    const = {**obs, "agentview_image": np.zeros((224, 224, 3), np.uint8)}
    const["agentview_image"][-1, -1] = 255
    assert ca.openpi_observation(const, "x")["observation/image"][0, 0].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="--cameras"):
        ca.openpi_observation({"robot0_eef_pos": np.zeros(3)}, "x")


def test_openpi_policy_against_local_server_and_server_going_away():
    rng = np.random.default_rng(0)
    with FakeOpenPIServer(horizon=10, die_after=2) as server:
        policy = ca.OpenPIPolicy("127.0.0.1", server.port, replan_steps=4)
        policy.reset(ca.TaskInfo("libero_spatial", 0, "t", "pick the bowl", "", 220), rng)
        for i in range(2):
            chunk = policy.act(fake_obs(rng))
            np.testing.assert_array_equal(chunk, server.actions_for(i)[:4])
        assert server.requests[0]["prompt"] == "pick the bowl"
        assert server.requests[0]["observation/state"].shape == (8,)
        with pytest.raises(ca.PolicyServerError, match="went away"):
            policy.act(fake_obs(rng))


def test_openpi_unreachable_server_is_a_clear_error():
    with FakeOpenPIServer() as server:
        port = server.port
    with pytest.raises(ca.PolicyServerError, match=f"127.0.0.1:{port}"):
        ca.OpenPIPolicy("127.0.0.1", port)


# ---------------------------------------------------------------- integration (real LIBERO)

@pytest.mark.integration
def test_openpi_collection_keeps_episodes_when_server_dies(tmp_path):
    """Cameras on, 6 steps an episode, replan every 3: the server dies in episode 2."""
    out = tmp_path / "openpi.hdf5"
    with FakeOpenPIServer(horizon=10, die_after=3) as server:
        with pytest.raises(ca.PolicyServerError):
            ca.collect(ca.CollectArgs(task_suite="libero_spatial", task_id=[0], num_episodes=3, output=str(out),
                                      policy="openpi", port=server.port,
                                      host="127.0.0.1", replan_steps=3, max_steps=6, no_progress=True))
    assert not out.exists()
    kept = demos.load_episodes(demos.partial_path(str(out)), only_success=False, images=True)
    assert len(kept) == 1 and len(kept[0]) == 6
    np.testing.assert_allclose(kept[0].actions[:3], server.actions_for(0)[:3], atol=1e-6)
    assert kept[0].obs["agentview_image"].shape == (6, 256, 256, 3)


@pytest.mark.integration
def test_scripted_collection_is_worker_independent_and_varied(tmp_path):
    """Same seed: 1 and 2 workers give the same actions (task 4 has fixtures that LIBERO places
    at random: the episode's seed draws them); two episodes from one init state differ."""
    outs = {}
    for workers in (1, 2):
        out = str(tmp_path / f"w{workers}.hdf5")
        summary = ca.collect(ca.CollectArgs(task_suite="libero_spatial", task_id=[4], num_episodes=2, output=out,
                                            seed=3, workers=workers,
                                            init_states=[25], max_steps=40, no_progress=True))
        assert summary["episodes"] == 2 and summary["wall_seconds"] > 0
        assert set(summary) >= {"episodes", "successes", "success_rate", "per_task",
                                "env_steps_per_second", "wall_seconds"}
        outs[workers] = demos.load_episodes(out, only_success=False)
    for a, b in zip(outs[1], outs[2]):
        np.testing.assert_array_equal(a.actions, b.actions)
    first, second = outs[1]
    assert first.init_state_id == second.init_state_id == 25 and first.seed != second.seed
    n = min(len(first), len(second))
    assert np.abs(first.actions[:n] - second.actions[:n]).max() > 0.05


@pytest.mark.integration
def test_scene_seed_makes_a_trial_repeatable():
    """Same init state and scene seed: the same fixture placement and, for the seeded expert,
    the same episode, whatever ran in the env before; numpy's global RNG is left as it was.
    Another scene seed places the fixtures elsewhere."""
    env = ca.LiberoEnv("libero_spatial", 4)  # a task with fixtures: a cabinet and a stove
    try:
        expert = ca.make_policy(ca.PolicySpec("scripted"))
        np.random.seed(1)
        before = np.random.get_state()[1].copy()
        env.reset(1, scene_seed=5)
        assert np.array_equal(np.random.get_state()[1], before)
        placed = env.env.sim.model.body_pos.copy()
        env.reset(1, scene_seed=6)
        assert np.abs(env.env.sim.model.body_pos - placed).max() > 1e-4
        a = ca.run_episode(env, expert, 1, seed=11, max_steps=30, scene_seed=5)
        ca.run_episode(env, expert, 2, seed=12, max_steps=30)  # another trial in between, plain reset
        b = ca.run_episode(env, expert, 1, seed=11, max_steps=30, scene_seed=5)
        np.testing.assert_array_equal(env.env.sim.model.body_pos, placed)
        np.testing.assert_array_equal(a.actions, b.actions)
        for key in a.obs:
            np.testing.assert_array_equal(a.obs[key], b.obs[key])
    finally:
        env.close()


@pytest.mark.integration
def test_libero_goal_observation_carries_the_drawer_opening():
    """libero_goal task 3: the expert opens the top drawer; the policy's "fixture-state", built from
    the observations the env gave, follows the drawer's joint past LIBERO's "open" threshold."""
    from policy_data import FIXTURE_STATE, fixture_names, obs_vector
    from scripted_tasks import DRAWER_JOINT, DRAWER_OPEN_QPOS
    env = ca.LiberoEnv("libero_goal", 3)
    try:
        assert fixture_names(env.reset(0)) == ["flat_stove_1", "wine_rack_1", "wooden_cabinet_1"]
        ep = ca.run_episode(env, ca.make_policy(ca.PolicySpec("scripted")), 0, seed=0, max_steps=110)
    finally:
        env.close()
    x = obs_vector(ep.obs, [FIXTURE_STATE])
    top = 4 + 3 + 3 + DRAWER_JOINT["top"]  # stove pos + knob, rack pos, cabinet pos, then its drawers
    assert x.shape == (len(ep), 13)
    assert x[0, top] > DRAWER_OPEN_QPOS and x[:, top].min() < DRAWER_OPEN_QPOS
