"""Tests of the scripted expert (scripted_expert.py).

The fast tests drive the expert in a small kinematic stand-in for LIBERO (no simulator): the
hand moves by the commanded action, the fingers take ~8 steps to close, and an object held
between closed fingers follows the hand. The integration test solves one real episode of
libero_spatial and one of libero_object.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import scripted_expert as se
from collect_actions import TaskInfo

BOWL_TASK = TaskInfo(
    suite="libero_spatial", task_id=0, name="toy_bowl", instruction="put the bowl on the plate",
    bddl_file="", max_steps=220, goal=(("on", "akita_black_bowl_1", "plate_1"),),
)
CAN_TASK = TaskInfo(
    suite="libero_object", task_id=0, name="toy_can", instruction="put the soup in the basket",
    bddl_file="", max_steps=280, goal=(("in", "alphabet_soup_1", "basket_1_contain_region"),),
)
UPRIGHT = np.array([0.0, 0.0, 0.7071068, 0.7071068])  # (x, y, z, w): LIBERO's resting objects
HAND_DOWN = np.array([1.0, 0.0, 0.0, 0.0])  # the EEF pointing at the table


class ToyWorld:
    """Kinematic stand-in for LIBERO: one object, one target, a few neighbours.

    An object is grasped when the fingers have closed to its width while the EEF is within
    2 cm of the expert's grasp height band around it; ``slip_first`` grasps fail once.
    """

    def __init__(self, task, obj_pos, target_pos, eef=(-0.2, 0.0, 1.17), neighbours=None,
                 slip_first=False):
        self.task = task
        self.obj = task.goal[0][1]
        self.target = se.target_body(task.goal[0][2])
        self.eef = np.array(eef, dtype=float)
        self.rot = Rotation.from_quat(HAND_DOWN)
        self.width = 0.078
        self.obj_pos = np.array(obj_pos, dtype=float)
        self.target_pos = np.array(target_pos, dtype=float)
        self.table_z = self.obj_pos[2]
        self.neighbours = dict(neighbours or {})
        self.held = None  # object offset from the EEF while held
        self.slips_left = 1 if slip_first else 0
        self.slipping = False

    def obs(self) -> dict:
        o = {
            "robot0_eef_pos": self.eef.copy(),
            "robot0_eef_quat": self.rot.as_quat(),
            "robot0_gripper_qpos": np.array([self.width / 2, -self.width / 2]),
            f"{self.obj}_pos": self.obj_pos.copy(),
            f"{self.obj}_quat": UPRIGHT.copy(),
            f"{self.target}_pos": self.target_pos.copy(),
            f"{self.target}_quat": UPRIGHT.copy(),
        }
        for name, pos in self.neighbours.items():
            o[f"{name}_pos"] = np.asarray(pos, dtype=float)
            o[f"{name}_quat"] = UPRIGHT.copy()
        return o

    def step(self, action: np.ndarray) -> None:
        self.eef = self.eef + action[:3] * se.METERS_PER_ACTION
        self.rot = Rotation.from_rotvec(action[3:6] * se.RADIANS_PER_ACTION) * self.rot
        closing = action[6] > 0
        near = abs(self.eef[2] - self.obj_pos[2]) < 0.12 and np.linalg.norm(self.eef[:2] - self.obj_pos[:2]) < 0.06
        # The fingers stop on what they hold (a 6 mm bowl rim), else close fully (2 mm).
        closed = 0.006 if (near and not self.slipping) or self.held is not None else 0.002
        self.width = float(np.clip(self.width + (-0.01 if closing else 0.01), closed, 0.078))
        if closing and self.held is None and self.width < 0.01 and near and not self.slipping:
            if self.slips_left:  # this grasp misses: the fingers close on nothing
                self.slips_left -= 1
                self.slipping = True
            else:
                self.held = self.obj_pos - self.eef
        if not closing:
            self.slipping = False
        if not closing and self.held is not None:
            self.held = None
            on_target = np.linalg.norm(self.obj_pos[:2] - self.target_pos[:2]) < 0.06
            self.obj_pos[2] = self.target_pos[2] + 0.01 if on_target else self.table_z
        if self.held is not None:
            self.obj_pos = self.eef + self.held

    def placed(self) -> bool:
        return (self.held is None and np.linalg.norm(self.obj_pos[:2] - self.target_pos[:2]) < 0.03
                and self.obj_pos[2] < self.target_pos[2] + 0.05)


def bowl_world(**kw) -> ToyWorld:
    return ToyWorld(BOWL_TASK, obj_pos=(-0.06, 0.20, 0.898), target_pos=(0.05, 0.20, 0.903), **kw)


def can_world(**kw) -> ToyWorld:
    return ToyWorld(CAN_TASK, obj_pos=(-0.12, -0.24, 0.038), target_pos=(0.0, 0.26, -0.005),
                    eef=(-0.15, 0.0, 0.25), **kw)


def rollout(world: ToyWorld, expert: se.ScriptedExpert, seed: int, steps: int = 280):
    """Run the expert in world until it places the object; returns the actions [N, 7]."""
    expert.reset(world.task, np.random.default_rng(seed))
    actions = []
    for _ in range(steps):
        for a in expert.act(world.obs()):
            actions.append(a)
            world.step(a)
        if world.placed():
            break
    return np.array(actions)


@pytest.mark.parametrize("make_world", [bowl_world, can_world])
def test_expert_places_object_in_toy_world(make_world):
    world = make_world()
    actions = rollout(world, se.ScriptedExpert(noise=1.0), seed=3)
    assert world.placed(), f"object ended at {world.obj_pos}, target {world.target_pos}"
    assert len(actions) < world.task.max_steps
    assert np.all(np.abs(actions) <= 1.0)
    # Binary gripper, both used (the hold command 0 is only for grasps inside a drawer).
    assert set(np.unique(actions[:, 6])) == {-1.0, 1.0}


def test_noise_zero_is_deterministic_whatever_the_rng():
    a = rollout(bowl_world(), se.ScriptedExpert(noise=0.0), seed=1)
    b = rollout(bowl_world(), se.ScriptedExpert(noise=0.0), seed=2)
    np.testing.assert_array_equal(a, b)


def test_same_obs_sequence_same_actions_for_noise_zero():
    world = bowl_world()
    e1, e2 = se.ScriptedExpert(noise=0.0), se.ScriptedExpert(noise=0.0)
    e1.reset(BOWL_TASK, np.random.default_rng(0))
    e2.reset(BOWL_TASK, np.random.default_rng(99))
    for _ in range(60):
        obs = world.obs()
        a1, a2 = e1.act(obs), e2.act(obs)
        np.testing.assert_array_equal(a1, a2)
        world.step(a1[0])


def test_different_rng_gives_different_episodes():
    s1 = se.draw_style(np.random.default_rng(1), noise=1.0)
    s2 = se.draw_style(np.random.default_rng(2), noise=1.0)
    assert s1.approach_height != s2.approach_height and s1.speed != s2.speed
    assert not np.allclose(s1.wobble_phase, s2.wobble_phase)
    a = rollout(bowl_world(), se.ScriptedExpert(noise=1.0), seed=1)
    b = rollout(bowl_world(), se.ScriptedExpert(noise=1.0), seed=2)
    n = min(len(a), len(b))
    assert np.abs(a[:n, :3] - b[:n, :3]).max() > 0.05


def test_noise_zero_style_is_nominal():
    s = se.draw_style(np.random.default_rng(5), noise=0.0)
    assert s.start_delay == 0 and np.all(s.grasp_offset == 0) and np.all(s.wobble_amp == 0)


def test_regrasp_after_failed_lift():
    world = bowl_world(slip_first=True)
    expert = se.ScriptedExpert(noise=0.0)
    rollout(world, expert, seed=0)
    assert expert.attempts >= 1, "the failed first grasp was not noticed"
    assert world.placed()


def run_until(world: ToyWorld, expert: se.ScriptedExpert, done, steps: int = 280) -> None:
    """Step the world with the expert's actions until done(world, expert)."""
    for _ in range(steps):
        if done(world, expert):
            return
        for a in expert.act(world.obs()):
            world.step(a)
    raise AssertionError(f"condition not reached in {steps} steps (phase {expert.phase})")


def drive_then_take_over(driver_seed: int, until, seed: int):
    """An expert drives the bowl world until ``until(world, expert)``; then a fresh expert
    takes over in that state. Returns (world, the new expert's start phase, its actions, the
    object's xy distance to the target at every step of them)."""
    world = bowl_world()
    first_obs = world.obs()
    driver = se.ScriptedExpert(noise=1.0)
    driver.reset(BOWL_TASK, np.random.default_rng(driver_seed))
    run_until(world, driver, until)
    expert = se.ScriptedExpert(noise=1.0)
    expert.reset(world.task, np.random.default_rng(seed))
    phase = expert.take_over(world.obs(), first_obs)
    actions, dist = [], []
    for _ in range(world.task.max_steps):
        for a in expert.act(world.obs()):
            actions.append(a)
            dist.append(float(np.linalg.norm(world.obj_pos[:2] - world.target_pos[:2])))
            world.step(a)
        if world.placed():
            break
    return world, phase, np.array(actions), np.array(dist)


def test_take_over_while_carrying_keeps_the_object_and_the_hand_yaw():
    """Taken over mid-carry, the expert sees that the object hangs in the hand: it carries on
    (no open-gripper command before the object is over the target), and its first command
    does not turn the hand (its yaw reference starts where the hand is)."""
    world, phase, actions, dist = drive_then_take_over(
        7, lambda w, e: e.phase == "carry" and e.phase_t >= 5, seed=8)
    assert phase == "lift"
    assert world.placed(), f"object ended at {world.obj_pos}, target {world.target_pos}"
    opened = np.flatnonzero(actions[:, 6] < 0)
    assert len(opened) and dist[opened[0]] < 0.03, "the hand opened before the object was over the target"
    assert np.abs(actions[0, 3:6]).max() < 1e-3


def test_take_over_before_the_grasp_approaches_and_places():
    world, phase, actions, _ = drive_then_take_over(
        3, lambda w, e: e.phase == "approach" and e.phase_t >= 10, seed=4)
    assert phase == "approach"
    assert world.placed()
    assert actions[0, 6] == se.GRIPPER_OPEN


def test_take_over_after_a_drop_does_not_think_the_object_is_held():
    """Fingers closed on nothing (the object lies where it started): approach again."""
    world = bowl_world()
    first_obs = world.obs()
    world.width = 0.002  # fully closed, empty
    expert = se.ScriptedExpert(noise=0.0)
    expert.reset(BOWL_TASK, np.random.default_rng(0))
    assert expert.take_over(world.obs(), first_obs) == "approach"
    with pytest.raises(RuntimeError, match="before reset"):
        se.ScriptedExpert().take_over(first_obs, first_obs)


@pytest.mark.parametrize("suite", ["libero_goal", "libero_10", "libero_90"])
def test_pick_and_place_expert_refuses_other_suites(suite):
    """ScriptedExpert itself is the pick-and-place expert; scripted_tasks.SuiteExpert hands
    libero_goal to TaskExpert (tests/test_scripted_tasks.py)."""
    task = TaskInfo(suite=suite, task_id=3, name="x", instruction="open the drawer", bddl_file="",
                    max_steps=300, goal=(("open", "wooden_cabinet_1_top_region"),))
    with pytest.raises(ValueError, match=suite) as err:
        se.ScriptedExpert().reset(task, np.random.default_rng(0))
    assert "libero_spatial" in str(err.value) and "libero_object" in str(err.value)


def test_unknown_object_is_a_clear_error():
    task = TaskInfo(suite="libero_object", task_id=0, name="x", instruction="x", bddl_file="",
                    max_steps=280, goal=(("in", "popcorn_1", "basket_1_contain_region"),))
    with pytest.raises(ValueError, match="popcorn_1"):
        se.ScriptedExpert().reset(task, np.random.default_rng(0))


def test_bad_noise_and_act_before_reset():
    with pytest.raises(ValueError, match="noise"):
        se.ScriptedExpert(noise=-1.0)
    with pytest.raises(RuntimeError, match="reset"):
        se.ScriptedExpert().act(bowl_world().obs())


def _chosen_grasp(world):
    expert = se.ScriptedExpert(noise=0.0)
    expert.reset(world.task, np.random.default_rng(0))
    return expert._choose_grasp(world.obs())


def test_grasp_prefers_the_rim_nearest_the_robot():
    kind, direction, yaw, hand = _chosen_grasp(bowl_world())
    assert (kind, hand) == ("rim", "open")
    np.testing.assert_allclose(direction, (-1.0, 0.0), atol=1e-9)  # robot side (-x)
    assert yaw == pytest.approx(np.pi / 2)  # fingers close along x, across that rim


def test_grasp_avoids_a_neighbour_on_the_preferred_side():
    ramekin = np.array([-0.19, 0.20])  # just beyond the bowl's robot-side rim
    world = bowl_world(neighbours={"glazed_rim_porcelain_ramekin_1": (*ramekin, 0.899)})
    _, direction, _, _ = _chosen_grasp(world)
    outer_finger = world.obj_pos[:2] + (0.047 + se.FINGER_OPEN_OFFSET) * np.asarray(direction)
    radius = se.NEIGHBOUR_SIZE["glazed_rim_porcelain_ramekin"][0]
    assert np.linalg.norm(outer_finger - ramekin) - radius >= se.GRASP_CLEARANCE


def test_grasp_keeps_hand_off_the_cabinet():
    # A bowl just in front of the cabinet (libero_spatial task 6): several rims would put
    # the 21 cm hand over the cabinet.
    world = ToyWorld(BOWL_TASK, obj_pos=(0.13, -0.07, 0.898), target_pos=(0.05, 0.20, 0.903))
    _, direction, yaw, _ = _chosen_grasp(world)
    point = world.obj_pos[:2] + 0.047 * np.asarray(direction)
    axis = np.array([-np.sin(yaw), np.cos(yaw)])
    np.testing.assert_allclose(abs(axis @ direction), 1.0, atol=1e-9)  # fingers across the rim
    cabinet = se.SCENE_FIXTURES["libero_spatial"][0].footprint
    for a in np.linspace(-se.HAND_HALF_LENGTH, se.HAND_HALF_LENGTH, 9):
        assert se.polygon_distance(point + a * axis, cabinet) > 0


def test_bowl_in_the_drawer_gets_a_preshaped_grasp_along_the_drawer():
    # libero_spatial task 4: the bowl sits in the open top drawer of the cabinet.
    world = ToyWorld(BOWL_TASK, obj_pos=(0.085, -0.13, 1.063), target_pos=(0.05, 0.20, 0.903))
    _, direction, _, hand = _chosen_grasp(world)
    drawer = se.SCENE_FIXTURES["libero_spatial"][0].drawer
    assert hand == "preshape"
    np.testing.assert_allclose(direction, -drawer.width_axis)  # the side nearer the robot
    expert = se.ScriptedExpert(noise=0.0)
    expert.reset(BOWL_TASK, np.random.default_rng(0))
    grippers = []
    for _ in range(120):
        a = expert.act(world.obs())[0]
        grippers.append(a[6])
        world.step(a)
        if expert.phase == "close":
            break
    # Fingers narrowed for a few steps, then held (0) on the way into the drawer.
    assert expert.phase == "close"
    assert grippers.count(se.GRIPPER_CLOSE) >= se.PRESHAPE_STEPS and se.GRIPPER_HOLD in grippers


def test_polygon_distance():
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=float)
    assert se.polygon_distance(np.array([0.5, 0.5]), square) == pytest.approx(-0.5)
    assert se.polygon_distance(np.array([2.0, 0.5]), square) == pytest.approx(1.0)
    assert se.polygon_distance(np.array([2.0, 0.5]), square[::-1]) == pytest.approx(1.0)


@pytest.mark.integration
@pytest.mark.parametrize("suite,task_id", [("libero_spatial", 0), ("libero_object", 0)])
def test_expert_solves_libero_episode(suite, task_id):
    from collect_actions import LiberoEnv

    env = LiberoEnv(suite, task_id)
    try:
        obs = env.reset(0)
        expert = se.ScriptedExpert(noise=1.0)
        expert.reset(env.task, np.random.default_rng(0))
        success, steps = False, 0
        while not success and steps < env.task.max_steps:
            for action in expert.act(obs):
                obs, success = env.step(action)
                steps += 1
                if success:
                    break
        assert success, f"{suite} task {task_id}: not solved in {steps} steps (phase {expert.phase})"
    finally:
        env.close()
