"""Tests of the multi-stage scripted expert (scripted_tasks.py).

The fast tests check the goal parsing, the choice of expert per suite, and drive the drawer
stage in a small kinematic stand-in for LIBERO (the hand moves and turns by the commanded
action; a handle gripped by closed fingers follows the hand along the drawer's axis). The
integration test solves real libero_goal episodes.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import scripted_expert as se
import scripted_tasks as st
from collect_actions import TaskInfo

GOAL_OBJECTS = ("akita_black_bowl_1", "cream_cheese_1", "wine_bottle_1", "plate_1")


def goal_task(*goal, task_id=0) -> TaskInfo:
    return TaskInfo(suite="libero_goal", task_id=task_id, name="x", instruction="x", bddl_file="", max_steps=300,
                    goal=tuple(goal), objects=GOAL_OBJECTS)


def test_plan_stages_of_every_kind_of_goal():
    assert st.plan_stages(goal_task(("open", "wooden_cabinet_1_middle_region"))) == [
        st.Stage("open", fixture="wooden_cabinet_1", part="middle")]
    # Into a drawer: open it first.
    assert st.plan_stages(goal_task(("in", "akita_black_bowl_1", "wooden_cabinet_1_top_region"))) == [
        st.Stage("open", fixture="wooden_cabinet_1", part="top"),
        st.Stage("pick", obj="akita_black_bowl_1", target="wooden_cabinet_1_top_region")]
    assert st.plan_stages(goal_task(("turnon", "flat_stove_1"))) == [st.Stage("turn_on", fixture="flat_stove_1")]
    # The plate is carried, pinched at its rim.
    assert st.plan_stages(goal_task(("on", "plate_1", "main_table_stove_front_region"))) == [
        st.Stage("pick", obj="plate_1", target="main_table_stove_front_region")]
    for target in ("plate_1", "flat_stove_1_cook_region", "wooden_cabinet_1_top_side"):
        assert st.plan_stages(goal_task(("on", "akita_black_bowl_1", target)))[0].kind == "pick"


def test_plan_stages_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="close"):
        st.plan_stages(goal_task(("close", "wooden_cabinet_1_top_region")))
    with pytest.raises(ValueError, match="popcorn_1"):
        st.plan_stages(goal_task(("on", "popcorn_1", "plate_1")))
    with pytest.raises(ValueError, match="microwave_1"):
        st.plan_stages(goal_task(("in", "akita_black_bowl_1", "microwave_1_heating_region")))


def test_target_kind_and_region_fixture():
    task = goal_task(("turnon", "flat_stove_1"))
    assert st.target_kind("wooden_cabinet_1_top_side") == "wooden_cabinet_top_side"
    assert st.target_kind("plate_1") == "plate"
    assert st.region_fixture("flat_stove_1_cook_region", task) == "flat_stove_1"
    assert st.region_fixture("plate_1", task) is None
    assert st.region_fixture("main_table_stove_front_region", task) is None


@pytest.mark.parametrize("suite", ["libero_10", "libero_90"])
def test_suite_expert_refuses_unsupported_suites(suite):
    task = TaskInfo(suite=suite, task_id=3, name="x", instruction="open the drawer", bddl_file="",
                    max_steps=300, goal=(("open", "wooden_cabinet_1_top_region"),))
    with pytest.raises(ValueError, match=suite) as err:
        st.SuiteExpert().reset(task, np.random.default_rng(0))
    assert all(s in str(err.value) for s in ("libero_spatial", "libero_object", "libero_goal"))


def test_suite_expert_picks_the_expert_per_suite():
    expert = st.SuiteExpert(noise=0.5)
    with pytest.raises(RuntimeError, match="reset"):
        expert.act({})
    bowl = TaskInfo(suite="libero_spatial", task_id=0, name="x", instruction="x", bddl_file="", max_steps=220,
                    goal=(("on", "akita_black_bowl_1", "plate_1"),))
    expert.reset(bowl, np.random.default_rng(0))
    assert type(expert.expert) is se.ScriptedExpert and expert.phase == "wait"
    expert.reset(goal_task(("turnon", "flat_stove_1")), np.random.default_rng(0))
    assert type(expert.expert) is st.TaskExpert and expert.stage.kind == "turn_on"
    with pytest.raises(ValueError, match="noise"):
        st.SuiteExpert(noise=-1)


HAND_DOWN = np.array([1.0, 0.0, 0.0, 0.0])  # (x, y, z, w): the EEF pointing at the table
CABINET_YAW_PI = np.array([0.0, 0.0, 1.0, 0.0])  # the goal scene's cabinet faces +y


class ToyDrawerWorld:
    """A hand, a cabinet whose middle drawer follows the hand along the drawer's axis while the
    fingers are closed within 1.5 cm of its handle."""

    def __init__(self):
        self.cabinet = np.array([0.03, -0.24, 0.90])
        self.rot = Rotation.from_quat(CABINET_YAW_PI)
        self.qpos = np.zeros(3)
        self.eef = np.array([-0.2, 0.0, 1.17])
        self.hand = Rotation.from_quat(HAND_DOWN)
        self.width = 0.078
        self.held_from = None  # (eef, qpos) when the handle was gripped

    def handle(self) -> np.ndarray:
        x, y, z = st.DRAWER_HANDLE["middle"]
        return self.cabinet + self.rot.apply([x, y + self.qpos[1], z])

    def obs(self) -> dict:
        return {
            "robot0_eef_pos": self.eef.copy(), "robot0_eef_quat": self.hand.as_quat(),
            "robot0_gripper_qpos": np.array([self.width / 2, -self.width / 2]),
            "wooden_cabinet_1_pos": self.cabinet.copy(), "wooden_cabinet_1_quat": CABINET_YAW_PI.copy(),
            "wooden_cabinet_1_qpos": self.qpos.copy(),
        }

    def step(self, action: np.ndarray) -> None:
        self.eef = self.eef + action[:3] * se.METERS_PER_ACTION
        self.hand = Rotation.from_rotvec(action[3:6] * se.RADIANS_PER_ACTION) * self.hand
        closing = action[6] > 0
        self.width = float(np.clip(self.width + (-0.01 if closing else 0.01), 0.016, 0.078))
        near = np.linalg.norm(self.eef - self.handle()) < 0.015
        if closing and self.width <= 0.016 and near and self.held_from is None:
            self.held_from = (self.eef.copy(), self.qpos[1])
        if not closing:
            self.held_from = None
        if self.held_from is not None:
            out = self.rot.apply([0.0, -1.0, 0.0])
            self.qpos[1] = np.clip(self.held_from[1] - np.dot(self.eef - self.held_from[0], out), -0.16, 0.01)


def test_drawer_stage_points_the_hand_at_the_cabinet_and_pulls_the_drawer_open():
    world = ToyDrawerWorld()
    expert = st.TaskExpert(noise=1.0)
    task = goal_task(("open", "wooden_cabinet_1_middle_region"))
    expert.reset(task, np.random.default_rng(3))
    pointing = []
    for _ in range(300):
        world.step(expert.act(world.obs())[0])
        pointing.append(world.hand.apply([0.0, 0.0, 1.0]))  # the EEF's z axis: where the fingers point
        if expert.phase == "idle":
            break
    assert expert.phase == "idle", f"stuck in {expert.phase}"
    assert world.qpos[1] < st.DRAWER_OPEN_QPOS
    # At the grip the fingers pointed into the cabinet (world -y), not down.
    assert min(p[1] for p in pointing) < -0.9


def test_drawer_stage_hands_over_before_the_hand_points_down_and_the_grasp_waits_for_it():
    world = ToyDrawerWorld()
    expert = st.TaskExpert(noise=1.0)
    expert.reset(goal_task(("open", "wooden_cabinet_1_middle_region"), ("on", "akita_black_bowl_1", "plate_1")),
                 np.random.default_rng(3))
    bowl = {"akita_black_bowl_1_pos": np.array([-0.09, 0.1, 0.898]), "akita_black_bowl_1_quat": np.array([0.0, 0.0, 0.0, 1.0]),
            "plate_1_pos": np.array([0.05, 0.2, 0.903]), "plate_1_quat": np.array([0.0, 0.0, 0.0, 1.0])}
    handover_tilt, descend_tilts = None, []
    for _ in range(400):
        world.step(expert.act({**world.obs(), **bowl})[0])
        if expert.stage_index == 1 and handover_tilt is None:
            handover_tilt = abs(expert.ref_tilt)
        if expert.phase == "descend":
            descend_tilts.append(abs(expert.ref_tilt))
            break
    assert world.qpos[1] < st.DRAWER_OPEN_QPOS
    # The pick started while the hand still pointed at the cabinet, and went down only once it pointed down.
    assert handover_tilt is not None and handover_tilt > 1.0
    assert descend_tilts and descend_tilts[0] <= st.TILT_DONE


def _pinched_plate_expert(kind_obj="plate_1"):
    expert = st.TaskExpert(noise=0.0)
    target = "main_table_stove_front_region" if kind_obj == "plate_1" else "plate_1"
    expert.reset(goal_task(("on", kind_obj, target)), np.random.default_rng(0))
    return expert


def test_a_plate_pinched_at_its_rim_may_pivot_on_the_lift_and_swing_on_the_way():
    eef0, obj0 = np.array([0.0, 0.0, 0.921]), np.array([0.05, -0.03, 0.903])
    lifted = {"robot0_eef_pos": eef0 + [0.0, 0.0, 0.035], "robot0_gripper_qpos": np.array([0.01, -0.01])}

    def lift(expert, obj):
        expert.phase, expert.lift_start, expert.hold_point = "lift", (eef0[2], obj0[2]), eef0.copy()
        expert.hold_offset, expert.pick_xy, expert.start_bottom = None, obj[:2].copy(), float(obj[2])
        obs = {**lifted, f"{expert.obj}_pos": obj, f"{expert.target}_pos": np.array([-0.05, 0.21, 0.895])}
        expert._phase_lift(obs, obs["robot0_eef_pos"])
        return expert

    # The plate's far edge still on the table: its centre rose 0.8 cm while the hand rose 3.5 cm.
    plate = lift(_pinched_plate_expert(), obj0 + [0.0, 0.0, 0.008])
    assert plate.phase == "lift" and plate.hold_offset is not None
    # A bowl that rose as little slipped out: regrasp.
    bowl = lift(_pinched_plate_expert("akita_black_bowl_1"), np.array([0.0, -0.05, 0.898 + 0.008]))
    assert bowl.phase == "regrasp"
    # Swung 5 cm under the hand it is still held; 10 cm away it fell.
    eef = lifted["robot0_eef_pos"]
    assert plate._attached({"robot0_eef_pos": eef, "plate_1_pos": eef - [0.02, -0.03, 0.035]})
    assert not plate._attached({"robot0_eef_pos": eef, "plate_1_pos": eef - [0.08, 0.0, 0.06]})


def test_a_bowl_goes_into_the_drawer_where_it_fits_at_the_drawer_s_opening_now():
    expert = st.TaskExpert(noise=0.0)
    expert.reset(goal_task(("in", "akita_black_bowl_1", "wooden_cabinet_1_top_region")), np.random.default_rng(0))
    cabinet = np.array([0.03, -0.24, 0.905])
    site = {"top": st.DRAWER_REGION_Y}

    def bowl_out(q):
        """Where the bowl's centre goes, m out of the cabinet (its frame faces +y: out is world +y)."""
        obs = {"wooden_cabinet_1_pos": cabinet, "wooden_cabinet_1_quat": CABINET_YAW_PI,
               "wooden_cabinet_1_qpos": np.array([q, 0.0, 0.0]),
               "wooden_cabinet_1_top_region_pos": cabinet + [0.0, -(site["top"] + q), 0.186]}
        expert.obj, expert.target = "akita_black_bowl_1", "wooden_cabinet_1_top_region"
        expert.region = st.PLACES["wooden_cabinet_top_region"]
        return float(expert._target_pos(obs)[1] - cabinet[1])

    back = st.PLANK_EDGE + st.BOWL_UNDER_PLANK
    # Fully open: midway between the plank and the front wall, the whole bowl between the walls.
    full = bowl_out(-0.155)
    assert back < full < st.DRAWER_FRONT_INNER + 0.155 - se.BOWL_RADIUS
    # Pushed partly shut, the bowl goes further back with the drawer, but never under the plank.
    assert bowl_out(-0.12) < full
    assert bowl_out(-0.09) == pytest.approx(back)


def test_a_bowl_under_the_open_drawer_is_slid_out_before_the_lift():
    expert = st.TaskExpert(noise=0.0)
    expert.reset(goal_task(("in", "akita_black_bowl_1", "wooden_cabinet_1_top_region")), np.random.default_rng(0))
    expert._next_stage()  # the pick
    cabinet = np.array([0.03, -0.24, 0.905])
    obs = {"wooden_cabinet_1_pos": cabinet, "wooden_cabinet_1_quat": CABINET_YAW_PI,
           "wooden_cabinet_1_qpos": np.array([-0.155, 0.0, 0.0]),
           "akita_black_bowl_1_pos": np.array([-0.09, 0.0, 0.898])}
    # Fully open, the drawer's front is at y ~ -0.01 and it reaches x ~ -0.08: over the bowl's edge.
    move = expert._slide_out(obs)
    assert np.linalg.norm(move) > 0.02 and move[1] > 0.0
    fronts = expert._open_drawer_footprints(obs)
    radius = se.NEIGHBOUR_SIZE["akita_black_bowl"][0]
    moved = obs["akita_black_bowl_1_pos"][:2] + move
    assert min(se.polygon_distance(moved, f) for f in fronts) >= radius + st.DRAWER_MARGIN - 1e-6
    # Closed, or a bowl well away from it: lifted where it stands.
    assert not np.any(expert._slide_out({**obs, "wooden_cabinet_1_qpos": np.zeros(3)}))
    assert not np.any(expert._slide_out({**obs, "akita_black_bowl_1_pos": np.array([-0.2, 0.15, 0.898])}))


@pytest.mark.integration
@pytest.mark.parametrize("task_id", [0, 1])  # open the middle drawer; put the bowl on the stove
def test_expert_solves_libero_goal_episode(task_id):
    from collect_actions import LiberoEnv

    env = LiberoEnv("libero_goal", task_id)
    try:
        obs = env.reset(0)
        expert = st.SuiteExpert(noise=1.0)
        expert.reset(env.task, np.random.default_rng(0))
        success, steps = False, 0
        while not success and steps < env.task.max_steps:
            for action in expert.act(obs):
                obs, success = env.step(action)
                steps += 1
                if success:
                    break
        assert success, f"libero_goal task {task_id}: not solved in {steps} steps (phase {expert.phase})"
    finally:
        env.close()
