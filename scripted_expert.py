"""Scripted pick-and-place expert for LIBERO's libero_spatial and libero_object suites.

The expert reads only the low-dimensional observation (EEF pose, gripper fingers, every
object's ``<name>_pos`` / ``<name>_quat``) and the task's parsed BDDL goal, e.g.
``(("on", "akita_black_bowl_1", "plate_1"),)`` or
``(("in", "alphabet_soup_1", "basket_1_contain_region"),)``. It runs a closed-loop phase
machine::

    approach above -> descend -> close -> lift (did the object rise?) -> carry above the
    target -> lower -> release -> retreat

and goes back to ``approach`` (a regrasp) whenever a check fails: the hand could not line
up or was blocked on the way down, the object did not rise with the hand, it slipped out
during the carry, or it did not end up on / in the target.

The grasp is chosen from candidates (for a bowl, its rim every 22.5 degrees, the side facing
the robot first; for other objects, the hand's yaw and a small shift along them) as the
first whose open hand clears the neighbouring objects, the fixtures that the observation
does not report (SCENE_FIXTURES: libero_spatial's cabinet) and the arm's reach; a failed grasp
is tried again only after the others. A bowl in the cabinet's open drawer is taken with the
fingers narrowed beforehand and slid out from under the cabinet's top before the lift.

Each episode draws its own style from the ``rng`` passed to ``reset`` (approach and carry
heights, speed and acceleration, small grasp / place offsets, smooth low-frequency wobble on the
commanded motion, timing jitter), scaled by ``noise``; ``noise=0`` gives one deterministic
expert. Actions are OSC_POSE deltas in [-1, 1]: xyz, axis-angle rotation, gripper
(-1 open, +1 close).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

SUPPORTED_SUITES = ("libero_spatial", "libero_object")

# OSC_POSE behaves like a velocity command: a steady action a moves the free EEF about
# 1.3 cm * a per step (measured here, linear for |a| <= 1; DESIGN.md quotes ~1.2 cm), and
# its velocity follows a change of command within ~2-3 steps. Rotation 0.5 turns it ~2.4
# degrees per step about the world axis given.
METERS_PER_ACTION = 0.013
RADIANS_PER_ACTION = np.deg2rad(4.8)
GRIPPER_OPEN = -1.0
GRIPPER_CLOSE = 1.0

# The hand follows a smooth reference point: the reference accelerates toward the target
# (bounded acceleration and speed, so commands ramp like a human reach), and the command is
# the reference's velocity plus FEEDBACK_GAIN times the hand's lag behind it. A plain
# proportional loop overshoots because of the OSC's lag and got stuck at the arm's reach
# limit beyond the plate.
FEEDBACK_GAIN = 0.3
# Contacts (table, object) can stop the hand; the reference never runs further ahead than this (m).
REFERENCE_LEASH = 0.02
ROTATION_GAIN = 0.3
# Fastest turn of the hand about the vertical (action units; 1.0 ~ 4.8 degrees per step).
MAX_YAW_SPEED = 0.7
# Reaching tolerances (m): free-space waypoints are passed loosely, grasp and place points tightly.
GRASP_TOLERANCE = 0.006
# A hand that moves less than STALL_SPEED (m) per step for STALL_STEPS steps while its
# reference is ahead is blocked (fingers on the table or the object): go on with the next phase.
STALL_SPEED = 0.0008
STALL_STEPS = 4
# An approach that has not lined up after this many steps is given up for another grasp
# (a typical approach takes 25-45 steps).
APPROACH_TIMEOUT = 80
DESCEND_TIMEOUT = 50  # typical descents take 15-25 steps
# Blocked more than this (m) above the grasp point, the hand is on something else.
BLOCKED_ABOVE = 0.01
# Finger opening (m, sum of the two finger joints) below which the fingers closed on nothing:
# ~0.078 open, ~0.0023 fully closed, ~0.006 on a bowl's rim.
EMPTY_GRIPPER_WIDTH = 0.0035
# The object must rise this much (m) once the hand has lifted LIFT_CHECK_RISE, else regrasp.
LIFT_CHECK_RISE = 0.03
OBJECT_RISE_MIN = 0.015
# While carrying, the object may move this far (m) from where it hung after the lift before
# the expert decides it slipped out and regrasps.
SLIP_DISTANCE = 0.03
# take_over(): an object whose origin is within this distance (m) of the EEF, risen and held
# by fingers closed on something, hangs in the hand (a bowl's rim grasp holds it ~6 cm away).
HELD_DISTANCE = 0.12


@dataclass(frozen=True)
class GraspGeometry:
    """How to grasp one kind of object. Lengths in metres, relative to the object's origin
    (the observation's ``<name>_pos``).

    grasp_height: EEF height above the grasped point when the fingers close (the EEF sits
        ~1 cm above the fingertips and the palm ~3 cm above the EEF, so tall objects are
        taken within the top ~3 cm).
    rim_offset: horizontal distance from the origin to the grasped wall (a bowl's rim,
        taken from a side with room, see RIM_ANGLES); 0 grasps the centre line.
    rim_height: height of the grasped point above the origin in the object's own frame.
    bottom: height of the origin above the object's lowest point (upright object).
    yaws: centre grasps: hand yaws to try (0: fingers close along world y, pi/2: along x);
        only those across which the object is narrower than the open fingers (7.7 cm).
    slide: centre grasps: the hand may also shift this far (m) along the object's long side
        to keep clear of neighbours.
    shift: centre grasps: after the grasps above, the hand may also shift this far (m) along
        the fingers' closing axis (one finger nearer the object) to keep the other clear of a
        neighbour; 0: never.
    rim_centre: rim grasps: centre (x, y) of the rim in the object's own frame (a mug's cup
        sits off its origin, which lies between the cup and the handle).
    handle: rim grasps: direction (x, y) of a handle in the object's own frame; rims within
        HANDLE_KEEP_OUT of it are not taken (a finger would land on the handle).
    """

    grasp_height: float
    rim_offset: float
    rim_height: float
    bottom: float
    yaws: tuple = (0.0,)
    slide: float = 0.0
    shift: float = 0.0
    rim_centre: tuple = (0.0, 0.0)
    handle: tuple | None = None


ALONG_X = np.pi / 2  # hand yaw at which the fingers close along world x

# Per-object grasp geometry, from the collision meshes of LIBERO's assets (extents measured
# in the simulator at the benchmark's init states).
OBJECT_GEOMETRY = {
    # Bowl: 10.7 cm wide, 5.2 cm tall, origin at its base. Top-down pinch of the rim wall at
    # r = 4.7 cm with the EEF 0.7 cm below the rim top (fingertips ~3.5 cm above the base):
    # the recipe of DESIGN.md that solved libero_spatial task 0 in 50 of 50 episodes.
    "akita_black_bowl": GraspGeometry(grasp_height=-0.017, rim_offset=0.047, rim_height=0.052, bottom=0.0),
    # Cans 6.3 cm wide (fingers open to 7.7 cm), 7.6 cm tall, origin at the centre: pads on
    # the upper half, palm just clear of the lid.
    "alphabet_soup": GraspGeometry(0.010, 0.0, 0.0, bottom=0.038, yaws=(0.0, ALONG_X)),
    "tomato_sauce": GraspGeometry(0.010, 0.0, 0.0, bottom=0.038, yaws=(0.0, ALONG_X)),
    # Flat boxes 1.7-2.7 cm tall lying on the floor, 7.6-8.2 cm long along x and 4-4.6 cm
    # wide along y: fingertips ~0.3 cm above the floor, fingers across the width only.
    "cream_cheese": GraspGeometry(0.004, 0.0, 0.0, bottom=0.009, slide=0.022),
    "butter": GraspGeometry(0.004, 0.0, 0.0, bottom=0.009, slide=0.02),
    "chocolate_pudding": GraspGeometry(0.002, 0.0, 0.0, bottom=0.013, slide=0.022),
    # Bottles 14.5 cm tall (origin at mid-height, 3.6 x 5.3 cm): taken by the neck, 2.5 cm
    # below the cap.
    "salad_dressing": GraspGeometry(0.048, 0.0, 0.0, bottom=0.073, yaws=(0.0, ALONG_X)),
    "ketchup": GraspGeometry(0.047, 0.0, 0.0, bottom=0.072, yaws=(0.0, ALONG_X)),
    # BBQ sauce bottle 10.7 cm tall.
    "bbq_sauce": GraspGeometry(0.028, 0.0, 0.0, bottom=0.055, yaws=(0.0, ALONG_X)),
    # Cartons 13.1 cm tall, 5.3 cm square, with a gabled top: taken just below the gable.
    "milk": GraspGeometry(0.032, 0.0, 0.0, bottom=0.070, yaws=(0.0, ALONG_X)),
    "orange_juice": GraspGeometry(0.032, 0.0, 0.0, bottom=0.070, yaws=(0.0, ALONG_X)),
}


@dataclass(frozen=True)
class PlaceGeometry:
    """Where a carried object goes, relative to the target's origin (``<target>_pos``).

    surface: height of the surface the object lands on.
    clear_height: the carried object's bottom stays this high above the target's origin
        while travelling (tallest thing in the scene it may pass over, or the basket rim).
    xy_tolerance: how far from the target's centre the object's origin may land and still
        satisfy the goal (plate: LIBERO's 3 cm "on" test; basket: its contain region).
    """

    surface: float
    clear_height: float
    xy_tolerance: float


TARGET_GEOMETRY = {
    # Plate 1.9 cm tall; bowls (5.2 cm) and ramekins (4.3 cm) stand on the same table.
    "plate": PlaceGeometry(surface=0.012, clear_height=0.07, xy_tolerance=0.03),
    # Basket: contain region +-6.1 cm around its centre, walls up to 14.6 cm; the bottles
    # standing beside it are as tall.
    "basket": PlaceGeometry(surface=0.010, clear_height=0.165, xy_tolerance=0.061),
}


@dataclass(frozen=True)
class Drawer:
    """The inside of an open drawer: a box the open fingers do not fit into.

    interior: [4, 2] corners (m, world xy) of its inner walls; floor: height of its floor.
    width_axis: unit xy vector along its wider inner side, the only way the fingers fit.
    out_axis: unit xy vector pointing out of the cabinet.
    front_wall, overhang: inner front wall and the cabinet's front edge (whose top plank
        overhangs the back of the drawer) as distances (m) along out_axis from the interior's
        centre (the latter negative: behind it).
    """

    interior: np.ndarray
    floor: float
    width_axis: np.ndarray
    out_axis: np.ndarray
    front_wall: float
    overhang: float

    def centre(self) -> np.ndarray:
        return self.interior.mean(axis=0)


@dataclass(frozen=True)
class Fixture:
    """A fixed piece of furniture that the observations do not report.

    footprint: [K, 2] corners (m, world xy) of its convex footprint.
    top: height (m, world z) of its highest surface.
    drawer: where its drawer opens, if one can hold the object (only its top drawer, open in
        "pick up the black bowl in the top drawer"; closed, that space is inside the cabinet,
        so an object found there at the drawer's floor height is in the open drawer).
    """

    name: str
    footprint: np.ndarray
    top: float
    drawer: Drawer | None = None


# Fixtures per suite, measured from the collision geometry of every libero_spatial task (the
# cabinet stands yawed ~64 degrees behind the table's -y edge and moves ~1 cm between tasks;
# the union over tasks is used). Its carcass carries the top plank; its closed drawers and
# their handles stick out ~2 cm further but stay below the plank. The Panda's hand is 21 cm
# long along the finger axis, so a bowl near the cabinet must be taken from a side that keeps
# the hand off it, and a bowl carried off the cabinet must clear its top.
SCENE_FIXTURES = {
    "libero_spatial": (
        Fixture(
            name="wooden_cabinet",
            footprint=np.array([[-0.050, -0.125], [0.185, -0.238], [0.075, -0.465], [-0.162, -0.350]]),
            top=1.131,
            # Top drawer pulled out: inner walls 15.8 cm deep (front to back) and 20.8 cm wide,
            # walls 6 cm above its floor, so a bowl (10.7 cm) leaves ~2.5 cm in front and behind
            # and ~5 cm at each side; the open fingers reach 11 cm out from the bowl's centre.
            # The plank 1 cm above a bowl's rim reaches 4.2 cm over the back of the drawer: a
            # bowl is slid forward before it is lifted.
            drawer=Drawer(
                interior=np.array([[0.210, -0.118], [0.023, -0.026], [-0.046, -0.168], [0.141, -0.260]]),
                floor=1.063,
                width_axis=np.array([0.9, -0.44]),
                out_axis=np.array([0.44, 0.9]),
                front_wall=0.079,
                overhang=-0.042,
            ),
        ),
        Fixture(
            name="wooden_cabinet_drawer_fronts",
            footprint=np.array([
                [-0.065, -0.128], [0.040, -0.138], [0.126, -0.180], [0.185, -0.250],
                [0.095, -0.437], [-0.150, -0.320],
            ]),
            top=1.122,
        ),
    ),
    "libero_object": (),
}

# The arm's shoulder (robot base + 0.333 m) per suite, world xyz. The Panda's elbow straightens
# (joint 4 at its -0.07 rad limit) when the wrist, ~WRIST_ABOVE_EEF above a downward-pointing
# EEF, is ~0.77-0.79 m from the shoulder; the OSC then cannot move the hand at all (measured:
# stuck at (0.04, -0.31, 1.17) over the cabinet and at (0.11, 0.17, 1.01) beyond the plate).
# Grasps that need the wrist further than REACH_LIMIT away are avoided, and the reference
# point is kept within REACH_GUARD (this crude model is only good to ~1 cm: a bowl whose
# grasp point lies at 0.766 was reached, the hand stuck at 0.779).
SHOULDER = {"libero_spatial": np.array([-0.66, 0.0, 1.245]), "libero_object": np.array([-0.60, 0.0, 0.333]),
            "libero_goal": np.array([-0.66, 0.0, 1.245])}
WRIST_ABOVE_EEF = 0.21
REACH_LIMIT = 0.76
REACH_GUARD = 0.772

# Panda hand geometry relative to the EEF (measured from its collision meshes): the palm
# spans +-HAND_HALF_LENGTH along the finger axis and starts PALM_HEIGHT above the EEF; open
# fingers sit FINGER_OPEN_OFFSET to each side and reach FINGERTIP_DEPTH below the EEF.
HAND_HALF_LENGTH = 0.105
HAND_HALF_WIDTH = 0.035
PALM_HEIGHT = 0.03
FINGER_OPEN_OFFSET = 0.045
FINGERTIP_DEPTH = 0.01
# Rim grasps to try, every 22.5 degrees, in order of preference: the angle (rad, world frame)
# of the direction from the bowl's centre to the grasped rim; the fingers close along that
# direction. The rim nearest the robot (-x, angle pi) comes first, then its neighbours: the
# hand then stays closest to the robot at both ends, and the arm cannot reach a hand held
# 5 cm beyond a plate at the far side.
# A rim grasp keeps the fingers this far (rad, about the rim's centre) from a mug's handle.
HANDLE_KEEP_OUT = np.deg2rad(50)
RIM_ANGLES = tuple(sorted((np.pi * (1 - k / 8) for k in range(16)), key=lambda a: abs(np.pi - a % (2 * np.pi))))

# A grasp whose open hand keeps this gap (m) to everything tall enough to touch it (and its
# palm this far above a tilted bowl's rim) is taken.
GRASP_CLEARANCE = 0.012
# (radius, top above the origin) in m of objects that may stand next to the grasped one
# (from the collision meshes; boxes get half their longer side); unknown kinds get a
# cautious default.
NEIGHBOUR_SIZE = {
    "akita_black_bowl": (0.054, 0.052),
    "glazed_rim_porcelain_ramekin": (0.045, 0.043),
    "plate": (0.070, 0.016),
    "cookies": (0.045, 0.009),
    "alphabet_soup": (0.032, 0.038),
    "tomato_sauce": (0.032, 0.038),
    "cream_cheese": (0.042, 0.009),
    "butter": (0.039, 0.009),
    "chocolate_pudding": (0.041, 0.014),
    "salad_dressing": (0.027, 0.073),
    "ketchup": (0.029, 0.073),
    "bbq_sauce": (0.024, 0.052),
    "milk": (0.027, 0.061),
    "orange_juice": (0.027, 0.061),
    "basket": (0.085, 0.151),
    "wine_bottle": (0.016, 0.158),  # libero_goal
}
DEFAULT_NEIGHBOUR_SIZE = (0.05, 0.15)
# A grasp inside a drawer pre-shapes the hand: with the fingers fully open, they close for
# PRESHAPE_STEPS steps above it (to ~4.2 cm apart, measured), then hold that opening on the
# way down (GRIPPER_HOLD: robosuite adds the sign of the gripper command to the fingers'
# target each step, so 0 keeps it). The hand must be lined up within PRESHAPE_ALIGN (m) first:
# the narrowed fingers leave ~1.5 cm either side of the rim.
PRESHAPE_STEPS = 4
PRESHAPE_ALIGN = 0.004
GRIPPER_HOLD = 0.0
FINGERS_OPEN_WIDTH = 0.075
# A bowl lifted from a drawer drags along its floor: take 0.5 cm more of its rim. The palm,
# 3 cm above the EEF and as long as the drawer is wide, must stay above the drawer's walls,
# which allows at most ~0.6 cm (measured on task 4: 1.25 cm deeper put the palm on the wall).
DRAWER_EXTRA_DEPTH = 0.005
# Sliding the held bowl forward in its drawer, slowly (action units).
SLIDE_SPEED = 0.25
# Radius (m) of a bowl's footprint, for sliding it out from under the cabinet's plank.
BOWL_RADIUS = 0.054
# Horizontal radius (m) of a carried object's footprint when checking it against fixtures.
CARRY_RADIUS = 0.06
# Near where it was picked up, a carried object rises at least this much (m) before moving
# away: bowls come out of the cabinet's drawer (walls 6 cm above its floor) and off the ramekin.
START_CLEARANCE = 0.07
START_ZONE = 0.10


def finger_yaw(direction_angle: float) -> float:
    """Hand yaw (rad, in (-pi/2, pi/2]) whose fingers close along direction_angle: at yaw 0 they
    close along world y; the two fingers are alike, so yaw and yaw + pi are the same grasp."""
    yaw = direction_angle - np.pi / 2
    return float(np.pi / 2 - (np.pi / 2 - yaw) % np.pi)


def polygon_distance(point: np.ndarray, polygon: np.ndarray) -> float:
    """Signed distance (m) from xy point [2] to a convex polygon [K, 2]; < 0 inside."""
    x, y = polygon[:, 0], polygon[:, 1]
    if np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)) < 0:  # clockwise: make it CCW
        polygon = polygon[::-1]
    worst = -np.inf
    inside = True
    for a, b in zip(polygon, np.roll(polygon, -1, axis=0)):
        edge = b - a
        normal = np.array([edge[1], -edge[0]]) / np.linalg.norm(edge)  # outward for CCW
        d = float(np.dot(point - a, normal))
        worst = max(worst, d)
        inside &= d <= 0
    if inside:
        return worst
    # Outside: distance to the nearest edge segment.
    best = np.inf
    for a, b in zip(polygon, np.roll(polygon, -1, axis=0)):
        t = np.clip(np.dot(point - a, b - a) / np.dot(b - a, b - a), 0.0, 1.0)
        best = min(best, float(np.linalg.norm(point - (a + t * (b - a)))))
    return best


@dataclass(frozen=True)
class EpisodeStyle:
    """One episode's motion parameters (drawn in ``ScriptedExpert.reset``)."""

    approach_height: float  # m above the grasp point where the descent starts
    carry_margin: float  # m of extra clearance above the target's clear_height
    release_height: float  # m between the object's bottom and the surface at release
    speed: float  # max reference speed in free space, action units (1.0 ~ 1.3 cm/step)
    fine_speed: float  # max reference speed near the grasp and place points
    accel: float  # max reference acceleration, action units per step
    approach_gain: float  # fraction of the remaining distance the reference aims to cover per step
    grasp_offset: np.ndarray  # [3] m added to the grasp point
    yaw_offset: float  # rad added to the hand's grasp yaw
    place_offset: np.ndarray  # [2] m added to the target centre
    close_steps: int  # steps the gripper is held closed before lifting
    release_steps: int  # steps the gripper is held open before retreating
    start_delay: int  # idle steps before moving, like a human's reaction time
    wobble_amp: np.ndarray  # [K, 3] action-unit amplitudes of the smooth wobble
    wobble_freq: np.ndarray  # [K, 3] cycles per step
    wobble_phase: np.ndarray  # [K, 3] radians


def draw_style(rng: np.random.Generator, noise: float) -> EpisodeStyle:
    """Draw one episode's style; ``noise`` scales every deviation (0 -> the nominal expert)."""

    def u(lo: float, hi: float, size=None):
        return noise * rng.uniform(lo, hi, size)

    # Draw everything even when noise == 0, so the rng stream is consumed identically.
    k = 3  # wobble components per axis
    return EpisodeStyle(
        approach_height=0.08 + u(-0.02, 0.05),
        carry_margin=0.04 + u(-0.01, 0.05),
        release_height=0.015 + u(0.0, 0.015),
        speed=0.9 + u(-0.25, 0.1),
        fine_speed=0.4 + u(-0.1, 0.1),
        accel=0.12 + u(-0.03, 0.05),
        approach_gain=0.2 + u(-0.04, 0.05),
        grasp_offset=u(-0.003, 0.003, 3),
        yaw_offset=u(-0.08, 0.08),
        place_offset=u(-0.008, 0.008, 2),
        close_steps=9 + int(round(u(0, 3))),
        release_steps=5 + int(round(u(0, 3))),
        start_delay=int(round(u(0, 4))),
        wobble_amp=u(0.0, 0.12, (k, 3)),
        wobble_freq=rng.uniform(0.01, 0.06, (k, 3)),
        wobble_phase=rng.uniform(0, 2 * np.pi, (k, 3)),
    )


def _clip_norm(v: np.ndarray, limit: float) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v * (limit / n) if n > limit else v


def object_kind(name: str) -> str:
    """``"akita_black_bowl_1"`` -> ``"akita_black_bowl"``; ``"basket_1_contain_region"`` -> ``"basket"``."""
    name = re.sub(r"_contain_region$", "", name)
    return re.sub(r"_\d+$", "", name)


def target_body(name: str) -> str:
    """The observed body of a goal target: ``"basket_1_contain_region"`` -> ``"basket_1"``."""
    return re.sub(r"_contain_region$", "", name)


def parse_goal(task) -> tuple[str, str, str]:
    """(predicate, object, target body) of a single pick-and-place goal, or ValueError."""
    if task.suite not in SUPPORTED_SUITES:
        raise ValueError(
            f"the scripted expert cannot solve suite {task.suite!r} (task {task.task_id}: "
            f"{task.instruction!r}); supported suites: {', '.join(SUPPORTED_SUITES)}"
        )
    goal = tuple(task.goal)
    if len(goal) != 1 or len(goal[0]) != 3 or goal[0][0] not in ("on", "in"):
        raise ValueError(
            f"the scripted expert needs one ('on'|'in', object, target) goal, got {goal!r} "
            f"for {task.suite} task {task.task_id}"
        )
    predicate, obj, target = goal[0]
    if object_kind(obj) not in OBJECT_GEOMETRY:
        raise ValueError(
            f"no grasp geometry for object {obj!r} ({task.suite} task {task.task_id}); "
            f"known kinds: {', '.join(sorted(OBJECT_GEOMETRY))}"
        )
    if object_kind(target) not in TARGET_GEOMETRY:
        raise ValueError(
            f"no place geometry for target {target!r} ({task.suite} task {task.task_id}); "
            f"known kinds: {', '.join(sorted(TARGET_GEOMETRY))}"
        )
    return predicate, obj, target_body(target)


def quat_xyzw_to_rotation(q: np.ndarray) -> Rotation:
    """robosuite observations store quaternions as (x, y, z, w), scipy's order."""
    return Rotation.from_quat(np.asarray(q, dtype=np.float64))


class ScriptedExpert:
    """Closed-loop pick-and-place expert; see the module docstring.

    ``act(obs)`` returns actions [n, 7] to execute before the next call (n = 1: the expert
    re-reads the scene every step).
    """

    def __init__(self, noise: float = 1.0):
        if not np.isfinite(noise) or noise < 0:
            raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
        self.noise = float(noise)
        self.task = None

    # ------------------------------------------------------------------ episode set-up
    def reset(self, task, rng: np.random.Generator) -> None:
        """Start an episode of ``task`` (collect_actions.TaskInfo) with a style drawn from rng."""
        self.predicate, self.obj, self.target = parse_goal(task)
        self.task = task
        self.grasp = OBJECT_GEOMETRY[object_kind(self.obj)]
        self.place = TARGET_GEOMETRY[object_kind(self.target)]
        self.style = draw_style(rng, self.noise)
        self._reset_motion()
        self._reset_pick()
        self.fixtures = SCENE_FIXTURES.get(task.suite, ())

    def _reset_motion(self) -> None:
        """The episode's clock, phase and motion references."""
        self.t = 0
        self.phase = "wait"
        self.phase_t = 0
        self.ref = None  # smooth reference point the hand follows [3]
        self.ref_vel = None  # its velocity, m per step [3]
        self.ref_yaw = 0.0  # smooth yaw reference (rad) relative to the starting orientation
        self.ref_yaw_vel = 0.0  # rad per step
        self.ref_rotation = None  # orientation held for the episode, set at the first act()
        self.grasp_yaw = 0.0  # hand yaw (rad, about world z) for the grasp; 0 = fingers along y
        self.stall = 0
        self.prev_eef = None

    def _reset_pick(self) -> None:
        """The state of one pick-and-place of self.obj."""
        self.attempts = 0
        self.grasp_choice = None  # see _grasp_candidates
        self.failed_grasps = []  # choices that were blocked or did not lift the object
        self.hold_point = None  # grasp point frozen while the fingers close
        self.lift_start = None  # (eef z, object z) when the lift began
        self.hold_offset = None  # eef - object, measured once the object hangs in the hand
        self.start_bottom = None  # object's bottom height when it was grasped
        self.pick_xy = None  # object's xy when it was grasped [2]
        self.slide_target = None  # where a bowl taken in a drawer is slid to before the lift [3]

    def take_over(self, obs: dict, first_obs: dict) -> str:
        """Continue, from the state ``obs``, an episode that another policy started in
        ``first_obs`` (call right after ``reset``); returns the phase it starts in.

        The expert skips its start delay, keeps the episode's starting orientation as its
        reference (so the hand's yaw goal is where it would have been from the start), and
        infers the one thing its phase machine cannot see afresh: whether the object already
        hangs in the hand. If it does (the object stands higher than at the start and the
        fingers are closed on something), it carries on from the lift with the current grasp;
        otherwise it approaches the object as at the start of an episode, opening the hand.
        """
        if self.task is None:
            raise RuntimeError(f"{type(self).__name__}.take_over() called before reset(task, rng)")
        self._take_over_orientation(obs, first_obs)
        return self._take_over_pick(obs, first_obs)

    def _take_over_orientation(self, obs: dict, first_obs: dict) -> None:
        """The reference orientation of an episode taken over: the start's, turned about the
        vertical to where the hand is now."""
        start_rotation = quat_xyzw_to_rotation(first_obs["robot0_eef_quat"])
        self.ref_rotation = start_rotation
        turned = quat_xyzw_to_rotation(obs["robot0_eef_quat"]) * start_rotation.inv()
        self.ref_yaw = float(turned.as_rotvec()[2])

    def _held_at_take_over(self, obs: dict, first_obs: dict) -> bool:
        """Whether the object hangs in the hand: it stands higher than at the start, the fingers
        are closed on something and the hand is next to it."""
        eef, obj = np.asarray(obs["robot0_eef_pos"], dtype=np.float64), self._obj_pos(obs)
        start_obj = np.asarray(first_obs[f"{self.obj}_pos"], dtype=np.float64)
        width = self._gripper_width(obs)
        return bool(obj[2] - start_obj[2] > OBJECT_RISE_MIN
                    and EMPTY_GRIPPER_WIDTH < width < FINGERS_OPEN_WIDTH
                    and np.linalg.norm(eef - obj) < HELD_DISTANCE)

    def _take_over_pick(self, obs: dict, first_obs: dict) -> str:
        """Carry on from the lift with the current grasp when the object is held, else approach
        it as at the start of an episode; returns the phase."""
        eef, obj = np.asarray(obs["robot0_eef_pos"], dtype=np.float64), self._obj_pos(obs)
        start_obj = np.asarray(first_obs[f"{self.obj}_pos"], dtype=np.float64)
        if self._held_at_take_over(obs, first_obs):
            self.grasp_choice = ("held", (0.0, 0.0), self.ref_yaw - self.style.yaw_offset, "open")
            self.grasp_yaw = self.grasp_choice[2]
            self.hold_point = eef.copy()
            self.lift_start = (float(eef[2]), float(obj[2]))
            self.start_bottom = float(start_obj[2]) - self.grasp.bottom
            self.pick_xy = start_obj[:2].copy()
            self.hold_offset = eef - obj
            self._enter("lift")
        else:
            self._enter("approach")
        return self.phase

    # ------------------------------------------------------------------ geometry
    def _obj_pos(self, obs) -> np.ndarray:
        return np.asarray(obs[f"{self.obj}_pos"], dtype=np.float64)

    def _target_pos(self, obs) -> np.ndarray:
        """Position [3] of the place target's reference point (its origin)."""
        return np.asarray(obs[f"{self.target}_pos"], dtype=np.float64)

    def _grasp_candidates(self, obs):
        """Yield (choice, grasp point [3], finger axis [2], outer finger points, rim top z under
        the palm (None: not a rim grasp)).

        choice = ("rim", direction (x, y), yaw, hand) for a bowl's rim or ("centre", offset
        (x, y), yaw, hand); hand is "open" or "preshape" (narrowed fingers, in a drawer).
        """
        g = self.grasp
        drawer = self._drawer_holding_object(obs)
        if g.rim_offset > 0 and drawer is not None:
            # Only along the drawer's width is there room for a finger beside the bowl, and only
            # the side nearer the robot is within reach.
            for d in sorted((-drawer.width_axis, drawer.width_axis), key=lambda v: v[0])[:1]:
                angle = float(np.arctan2(d[1], d[0]))
                rim = self._rim_point(obs, d)
                point = rim + np.array([0.0, 0.0, g.grasp_height - DRAWER_EXTRA_DEPTH])
                yield ("rim", (d[0], d[1]), finger_yaw(angle), "preshape"), point, d, [], None
            return
        if g.rim_offset > 0:
            for angle in RIM_ANGLES:
                d, yaw = np.array([np.cos(angle), np.sin(angle)]), finger_yaw(angle)
                if g.handle is not None and self._near_handle(obs, d):
                    continue
                rim = self._rim_point(obs, d)
                point = rim + np.array([0.0, 0.0, g.grasp_height])
                # The finger inside the bowl touches nothing; the palm spans the whole bowl,
                # so a tilted bowl's rim must stay below it wherever the palm passes over it.
                yield (("rim", (d[0], d[1]), yaw, "open"), point, d, [rim[:2] + FINGER_OPEN_OFFSET * d],
                       self._rim_top_under_palm(obs, rim[:2], d))
            return
        p = self._obj_pos(obs)
        shifts = (0.0,) if g.shift == 0 else (0.0, -g.shift, g.shift)
        for shift in shifts:  # the unshifted grasps first
            for yaw in g.yaws:
                axis = np.array([-np.sin(yaw), np.cos(yaw)])  # the fingers close along this
                across = np.array([axis[1], -axis[0]])
                for slide in dict.fromkeys((0.0, -g.slide, g.slide)):
                    if shift != 0 and slide != 0:
                        continue
                    offset = slide * across + shift * axis
                    point = p + np.array([offset[0], offset[1], g.grasp_height])
                    fingers = [point[:2] + FINGER_OPEN_OFFSET * axis, point[:2] - FINGER_OPEN_OFFSET * axis]
                    yield ("centre", (offset[0], offset[1]), yaw, "open"), point, axis, fingers, None

    def _choose_grasp(self, obs) -> tuple:
        """The first candidate grasp that keeps the open hand GRASP_CLEARANCE from fixtures and
        neighbouring objects, the palm above a tilted bowl's rim, and the arm within reach
        at the object and over the target. Grasps that already failed in this episode come
        after the untried ones; if none qualifies, the one that misses least."""
        scored = []
        for choice, point, axis, fingers, rim_top in self._grasp_candidates(obs):
            slack = min(
                self._grasp_clearance(obs, point[:2], axis, point[2], fingers) - GRASP_CLEARANCE,
                self._reach_margin(obs, point),
                np.inf if rim_top is None else point[2] + PALM_HEIGHT - rim_top - GRASP_CLEARANCE,
            )
            scored.append((choice, slack))
        for choice, slack in scored:
            if slack >= 0 and choice not in self.failed_grasps:
                return choice
        fits = [choice for choice, slack in scored if slack >= 0]
        if fits:  # every good grasp failed once: retry the one that failed least often
            return min(fits, key=self.failed_grasps.count)
        return max(scored, key=lambda cs: cs[1])[0]

    def _drawer_holding_object(self, obs):
        """The open drawer the object lies in, or None."""
        p = self._obj_pos(obs)
        for fixture in self.fixtures:
            d = fixture.drawer
            if d is not None and abs(p[2] - d.floor) < 0.015 and polygon_distance(p[:2], d.interior) < 0:
                return d
        return None

    def _reach_margin(self, obs, point) -> float:
        """How far (m) inside the arm's reach the hand stays when grasping at point [3] and
        when holding the object the same way over the target's centre."""
        target = self._target_pos(obs)
        at_target = target + point - self._obj_pos(obs)
        at_target[2] = point[2] - self._obj_pos(obs)[2] + float(target[2]) + 0.03
        return min(self._reach_left(point), self._reach_left(at_target))

    def _reach_left(self, eef, limit: float = REACH_LIMIT) -> float:
        """limit minus the wrist's distance (m) from the shoulder for the EEF at eef [3]."""
        shoulder = self._shoulder()
        if shoulder is None:
            return np.inf
        wrist = np.asarray(eef, dtype=np.float64) + np.array([0.0, 0.0, WRIST_ABOVE_EEF])
        return limit - float(np.linalg.norm(wrist - shoulder))

    def _shoulder(self) -> np.ndarray | None:
        """World position [3] of the arm's shoulder in this task's scene (None: not modelled)."""
        return SHOULDER.get(self.task.suite)

    def _grasp_clearance(self, obs, grasp_xy, d, eef_z, fingers) -> float:
        """Smallest horizontal gap (m) between the open hand (closing along d at grasp_xy,
        outer fingers at the given xy points) and anything tall enough to touch it (fixtures,
        other objects); negative = collision."""
        across = np.array([-d[1], d[0]])
        palm = [grasp_xy + a * d + b * across
                for a in np.linspace(-HAND_HALF_LENGTH, HAND_HALF_LENGTH, 9)
                for b in (-HAND_HALF_WIDTH, HAND_HALF_WIDTH)]
        palm_z, finger_z = eef_z + PALM_HEIGHT, eef_z - FINGERTIP_DEPTH
        gap = np.inf
        for fixture in self.fixtures:
            if fixture.top > palm_z - 0.003:
                gap = min(gap, min(polygon_distance(q, fixture.footprint) for q in palm))
            if fixture.top > finger_z:
                gap = min(gap, min((polygon_distance(f, fixture.footprint) for f in fingers), default=np.inf))
        for key, pos in obs.items():
            if not self._is_neighbour(key):
                continue
            radius, height = NEIGHBOUR_SIZE.get(object_kind(key[:-4]), DEFAULT_NEIGHBOUR_SIZE)
            top = float(pos[2]) + height
            if top > palm_z:
                gap = min(gap, min(float(np.linalg.norm(q - pos[:2])) for q in palm) - radius)
            if top > finger_z:
                gap = min(gap, min((float(np.linalg.norm(f - pos[:2])) for f in fingers), default=np.inf) - radius)
        return gap

    def _is_neighbour(self, key: str) -> bool:
        """Whether observation ``key`` is the position of an object beside the grasped one."""
        return key.endswith("_pos") and "_to_" not in key and not key.startswith("robot0") and key != f"{self.obj}_pos"

    def _rim_top_under_palm(self, obs, grasp_xy, d) -> float:
        """Highest point (world z) of the object's rim under a palm closing along d at grasp_xy."""
        across = np.array([-d[1], d[0]])
        tops = [self._rim_point(obs, (np.cos(a), np.sin(a))) for a in np.linspace(0, 2 * np.pi, 24, endpoint=False)]
        under = [p[2] for p in tops if abs(np.dot(p[:2] - grasp_xy, across)) < HAND_HALF_WIDTH + 0.01]
        return max(under, default=-np.inf)

    def _near_handle(self, obs, direction) -> bool:
        """Whether horizontal direction [2] from the rim's centre points within HANDLE_KEEP_OUT
        of the object's handle."""
        h = quat_xyzw_to_rotation(obs[f"{self.obj}_quat"]).apply([*self.grasp.handle, 0.0])[:2]
        cos = float(np.dot(h, direction)) / max(float(np.linalg.norm(h) * np.linalg.norm(direction)), 1e-9)
        return cos > np.cos(HANDLE_KEEP_OUT)

    def _rim_point(self, obs, direction) -> np.ndarray:
        """Point [3] of the object's rim toward horizontal direction [2], following its tilt."""
        p = self._obj_pos(obs)
        if any(self.grasp.rim_centre):
            p = p + quat_xyzw_to_rotation(obs[f"{self.obj}_quat"]).apply([*self.grasp.rim_centre, 0.0])
        up = quat_xyzw_to_rotation(obs[f"{self.obj}_quat"]).as_matrix()[:, 2]  # bowls tilt on a ramekin
        d = np.array([direction[0], direction[1], 0.0])
        d = d - d.dot(up) * up
        d /= np.linalg.norm(d)
        return p + self.grasp.rim_height * up + self.grasp.rim_offset * d

    def _grasp_point(self, obs) -> np.ndarray:
        """EEF position [3] at which the fingers close, from the object's current pose."""
        if self.grasp_choice is None:
            self.grasp_choice = self._choose_grasp(obs)
        kind, where, self.grasp_yaw, _ = self.grasp_choice
        if kind == "rim":
            point = self._rim_point(obs, where)
        else:
            point = self._obj_pos(obs) + np.array([where[0], where[1], 0.0])
        depth = DRAWER_EXTRA_DEPTH if self.grasp_choice[3] == "preshape" else 0.0
        point = point + np.array([0.0, 0.0, self.grasp.grasp_height - depth])
        return point + self.style.grasp_offset

    def _carry_z(self, obs, goal_xy=None) -> float:
        """EEF height for travelling with the object from where it is to goal_xy (object xy;
        default: stay here): its bottom clears the table clutter, the fixtures it passes over
        and, near where it was picked up, whatever it stood in or on."""
        here = self._obj_pos(obs)[:2]
        goal_xy = here if goal_xy is None else goal_xy
        bottom_z = float(self._target_pos(obs)[2]) + self.place.clear_height
        for f in np.linspace(0.0, 1.0, 12):
            p = here + f * (goal_xy - here)
            for fixture in self.fixtures:
                if polygon_distance(p, fixture.footprint) < CARRY_RADIUS:
                    bottom_z = max(bottom_z, fixture.top)
            if np.linalg.norm(p - self.pick_xy) < START_ZONE:
                bottom_z = max(bottom_z, self.start_bottom + START_CLEARANCE - self.style.carry_margin)
        return bottom_z + self.style.carry_margin + self._eef_above_bottom(obs)

    def _eef_above_bottom(self, obs) -> float:
        hold = self.hold_offset if self.hold_offset is not None else (
            np.asarray(obs["robot0_eef_pos"]) - self._obj_pos(obs))
        return float(hold[2]) + self.grasp.bottom

    def _place_point(self, obs) -> np.ndarray:
        """EEF position [3] at release: the object's bottom release_height above the surface."""
        t = self._target_pos(obs)
        xy = t[:2] + self.style.place_offset + self.hold_offset[:2]
        z = t[2] + self.place.surface + self.style.release_height + self._eef_above_bottom(obs)
        return np.array([xy[0], xy[1], z])

    def _goal_reached(self, obs) -> bool:
        """The goal as LIBERO checks it, approximately, from poses only (used after a release)."""
        p, t = self._obj_pos(obs), self._target_pos(obs)
        return bool(np.linalg.norm(p[:2] - t[:2]) < self.place.xy_tolerance and p[2] < t[2] + 0.12)

    def _attached(self, obs) -> bool:
        eef = np.asarray(obs["robot0_eef_pos"])
        return bool(np.linalg.norm(eef - self._obj_pos(obs) - self.hold_offset) < SLIP_DISTANCE)

    def _gripper_width(self, obs) -> float:
        q = np.asarray(obs["robot0_gripper_qpos"])
        return float(q[0] - q[1])

    # ------------------------------------------------------------------ control
    def act(self, obs: dict) -> np.ndarray:
        """Next actions [1, 7] for observation ``obs`` (xyz, axis-angle, gripper in [-1, 1])."""
        if self.task is None:
            raise RuntimeError("ScriptedExpert.act() called before reset(task, rng)")
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        if self.ref_rotation is None:
            self.ref_rotation = quat_xyzw_to_rotation(obs["robot0_eef_quat"])
        moved = np.inf if self.prev_eef is None else float(np.linalg.norm(eef - self.prev_eef))
        pushing = self.ref is not None and np.linalg.norm(self.ref - eef) > 0.005
        self.stall = self.stall + 1 if (moved < STALL_SPEED and pushing) else 0
        self.prev_eef = eef

        for _ in range(4):  # a phase that finishes hands over to the next within the same step
            phase = self.phase
            target, vmax, wobble, gripper = getattr(self, f"_phase_{phase}")(obs, eef)
            if self.phase == phase:
                break
        motion = self._motion(obs, eef, target, vmax, wobble)
        self.t += 1
        self.phase_t += 1
        return np.concatenate([motion, [gripper]])[None].astype(np.float64)

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.phase_t = 0
        self.stall = 0

    def _motion(self, obs, eef, target, vmax, wobble) -> np.ndarray:
        """Advance the smooth reference toward target [3]; return the arm command [6]."""
        s = self.style
        if self.ref is None:
            self.ref, self.ref_vel = eef.copy(), np.zeros(3)
        lag = self.ref - eef
        if np.linalg.norm(lag) > REFERENCE_LEASH:
            self.ref = eef + lag * (REFERENCE_LEASH / np.linalg.norm(lag))
        desired = _clip_norm(s.approach_gain * (target - self.ref), vmax * METERS_PER_ACTION)
        desired = desired + wobble * METERS_PER_ACTION * np.sum(
            s.wobble_amp * np.sin(2 * np.pi * s.wobble_freq * self.t + s.wobble_phase), axis=0)
        self.ref_vel = self.ref_vel + _clip_norm(desired - self.ref_vel, s.accel * METERS_PER_ACTION)
        self.ref = self.ref + self.ref_vel
        over = -self._reach_left(self.ref, REACH_GUARD)
        if over > 0:  # keep the reference where the arm can follow without straightening
            shoulder = self._shoulder()
            wrist = self.ref + np.array([0.0, 0.0, WRIST_ABOVE_EEF])
            self.ref = shoulder + (wrist - shoulder) * (REACH_GUARD / (REACH_GUARD + over)) \
                - np.array([0.0, 0.0, WRIST_ABOVE_EEF])
            self.ref_vel = np.zeros(3)
        cmd = (self.ref_vel + FEEDBACK_GAIN * (self.ref - eef)) / METERS_PER_ACTION
        # Orientation: the episode's starting orientation turned by a smooth yaw reference
        # (same bounded-acceleration profile) toward the grasp's yaw. The error is a world-frame
        # rotation vector, the frame OSC_POSE's rotation deltas are applied in.
        yaw_goal = self.grasp_yaw + s.yaw_offset
        yaw_desired = float(np.clip(s.approach_gain * (yaw_goal - self.ref_yaw),
                                    -MAX_YAW_SPEED * RADIANS_PER_ACTION, MAX_YAW_SPEED * RADIANS_PER_ACTION))
        self.ref_yaw_vel += float(np.clip(yaw_desired - self.ref_yaw_vel,
                                          -s.accel * RADIANS_PER_ACTION, s.accel * RADIANS_PER_ACTION))
        self.ref_yaw += self.ref_yaw_vel
        goal = self._orientation_goal()
        rot_err = (goal * quat_xyzw_to_rotation(obs["robot0_eef_quat"]).inv()).as_rotvec()
        rot = (self._rotation_feedforward() + ROTATION_GAIN * rot_err) / RADIANS_PER_ACTION
        return np.clip(np.concatenate([cmd, rot]), -1.0, 1.0)

    def _orientation_goal(self) -> Rotation:
        """The hand's orientation reference: the starting orientation turned by the yaw reference."""
        return Rotation.from_rotvec([0.0, 0.0, self.ref_yaw]) * self.ref_rotation

    def _rotation_feedforward(self) -> np.ndarray:
        """World-frame rotation (rad per step) [3] of the orientation reference."""
        return np.array([0.0, 0.0, self.ref_yaw_vel])

    @staticmethod
    def _fade(distance: float) -> float:
        """Wobble weight: full in free space, zero within ~3 cm of a waypoint."""
        return float(np.clip((distance - 0.03) / 0.08, 0.0, 1.0))

    # Each phase returns (target EEF position [3], max speed, wobble weight, gripper command).
    def _phase_wait(self, obs, eef):
        if self.phase_t >= self.style.start_delay:
            self._enter("approach")
        return eef, 0.0, 0.0, GRIPPER_OPEN

    def _phase_approach(self, obs, eef):
        if self.phase_t > APPROACH_TIMEOUT:  # the hand cannot get there: try another grasp
            self._fail_grasp()
            return eef, 0.0, 0.0, GRIPPER_OPEN
        gp = self._grasp_point(obs)
        xy_dist = float(np.linalg.norm(gp[:2] - eef[:2]))
        # Stay higher while far away so the fingers pass over neighbouring objects.
        z = gp[2] + self.style.approach_height + min(0.6 * max(xy_dist - 0.02, 0.0), 0.10)
        target = np.array([gp[0], gp[1], z])
        if self.grasp_choice[3] == "preshape":
            settled = self.ref_vel is not None and np.linalg.norm(self.ref_vel) < 0.1 * METERS_PER_ACTION
            fingers_open = self._gripper_width(obs) > FINGERS_OPEN_WIDTH
            if xy_dist < PRESHAPE_ALIGN and abs(eef[2] - z) < 0.01 and settled and fingers_open:
                self._enter("preshape")
        elif xy_dist < 0.01 and eef[2] > gp[2]:
            self._enter("descend")
        return target, self.style.speed, self._fade(np.linalg.norm(target - eef)), GRIPPER_OPEN

    def _phase_preshape(self, obs, eef):
        """Narrow the fingers above a grasp in a drawer, holding the hand still."""
        if self.phase_t >= PRESHAPE_STEPS:
            self._enter("descend")
        gp = self._grasp_point(obs)
        return np.array([gp[0], gp[1], eef[2]]), self.style.fine_speed, 0.0, GRIPPER_CLOSE

    def _phase_descend(self, obs, eef):
        gp = self._grasp_point(obs)
        err = gp - eef
        if self.phase_t > DESCEND_TIMEOUT:  # neither there nor blocked: try another grasp
            self._fail_grasp()
            return eef, 0.0, 0.0, GRIPPER_OPEN
        if np.linalg.norm(err[:2]) > 0.025:  # the object moved away: line up again
            self._enter("approach")
        elif np.linalg.norm(err) < GRASP_TOLERANCE or (self.stall >= STALL_STEPS and err[2] > -BLOCKED_ABOVE):
            self.hold_point = gp
            self._enter("close")
        elif self.stall >= STALL_STEPS:  # the fingers sit on something above the grasp point
            self._fail_grasp()
            return eef, 0.0, 0.0, GRIPPER_OPEN
        vmax = self.style.fine_speed if abs(err[2]) < 0.04 else self.style.speed * 0.7
        gripper = GRIPPER_HOLD if self.grasp_choice[3] == "preshape" else GRIPPER_OPEN
        return gp, vmax, 0.0, gripper

    def _phase_close(self, obs, eef):
        if self.phase_t >= self.style.close_steps:
            obj = self._obj_pos(obs)
            self.lift_start = (float(eef[2]), float(obj[2]))
            self.start_bottom = float(obj[2]) - self.grasp.bottom
            self.pick_xy = obj[:2].copy()
            self.hold_offset = None
            self._enter("slide" if self.grasp_choice[3] == "preshape" else "lift")
        return self.hold_point, self.style.fine_speed, 0.0, GRIPPER_CLOSE

    def _phase_slide(self, obs, eef):
        """In a drawer: slide the held bowl forward until no part of it is under the
        cabinet's plank (without touching the drawer's front wall), then lift."""
        if self.phase_t == 0:
            drawer = self._drawer_holding_object(obs)
            shift = 0.0
            if drawer is not None:
                along = float(np.dot(self._obj_pos(obs)[:2] - drawer.centre(), drawer.out_axis))
                needed = drawer.overhang + BOWL_RADIUS + 0.008 - along
                room = drawer.front_wall - 0.004 - BOWL_RADIUS - along
                shift = float(np.clip(needed, 0.0, max(room, 0.0)))
                self.slide_target = self.hold_point + np.r_[shift * drawer.out_axis, 0.003]
            else:
                self.slide_target = self.hold_point.copy()
        if np.linalg.norm(self.slide_target - eef) < 0.004 or self.phase_t > 25:
            self.hold_point = self.slide_target  # lift from where the bowl now is
            self._enter("lift")
        return self.slide_target, SLIDE_SPEED, 0.0, GRIPPER_CLOSE

    def _phase_lift(self, obs, eef):
        carry_z = self._carry_z(obs)
        target = np.array([self.hold_point[0], self.hold_point[1], carry_z])
        if self.hold_offset is None and eef[2] - self.lift_start[0] > LIFT_CHECK_RISE:
            rose = self._obj_pos(obs)[2] - self.lift_start[1]
            if rose < OBJECT_RISE_MIN or self._gripper_width(obs) < EMPTY_GRIPPER_WIDTH:
                self._fail_grasp()
                return eef, 0.0, 0.0, GRIPPER_OPEN
            self.hold_offset = eef - self._obj_pos(obs)
        if self.hold_offset is not None and eef[2] > carry_z - 0.03:
            self._enter("carry")
        vmax = self.style.fine_speed if self.hold_offset is None else self.style.speed
        return target, vmax, 0.0, GRIPPER_CLOSE

    def _phase_carry(self, obs, eef):
        if not self._attached(obs):
            self._enter("regrasp")
            return eef, 0.0, 0.0, GRIPPER_OPEN
        place = self._place_point(obs)
        target = np.array([place[0], place[1], self._carry_z(obs, place[:2] - self.hold_offset[:2])])
        xy_dist = float(np.linalg.norm(place[:2] - eef[:2]))
        if xy_dist < 0.012:
            self._enter("lower")
        return target, self.style.speed, self._fade(np.linalg.norm(target - eef)), GRIPPER_CLOSE

    def _phase_lower(self, obs, eef):
        if not self._attached(obs):
            self._enter("regrasp")
            return eef, 0.0, 0.0, GRIPPER_OPEN
        place = self._place_point(obs)
        err = place - eef
        if np.linalg.norm(err) < GRASP_TOLERANCE or self.stall >= STALL_STEPS:
            self.hold_point = eef.copy()
            self._enter("release")
        vmax = self.style.fine_speed if abs(err[2]) < 0.04 else self.style.speed * 0.7
        return place, vmax, 0.0, GRIPPER_CLOSE

    def _phase_release(self, obs, eef):
        if self.phase_t >= self.style.release_steps:
            self._enter("retreat")
        return self.hold_point, self.style.fine_speed, 0.0, GRIPPER_OPEN

    def _phase_retreat(self, obs, eef):
        target = self.hold_point + np.array([0.0, 0.0, 0.08])
        if eef[2] > target[2] - 0.02:
            if self._goal_reached(obs):
                self._enter("idle")
            else:
                self._restart()
        return target, self.style.speed, 0.0, GRIPPER_OPEN

    def _phase_idle(self, obs, eef):
        return self.hold_point + np.array([0.0, 0.0, 0.08]), self.style.speed, 0.0, GRIPPER_OPEN

    def _phase_regrasp(self, obs, eef):
        """Open, back off upward, then line up on the object's new pose."""
        if self.phase_t == 0:
            self.hold_point = eef.copy()
        target = self.hold_point + np.array([0.0, 0.0, 0.05])
        if self.phase_t >= 6 and eef[2] > target[2] - 0.02:
            self._restart()
        return target, self.style.fine_speed, 0.0, GRIPPER_OPEN

    def _fail_grasp(self) -> None:
        """This way of grasping did not work here: back off and try the next candidate."""
        self.failed_grasps.append(self.grasp_choice)
        self._enter("regrasp")

    def _restart(self) -> None:
        self.attempts += 1
        self.grasp_choice = None
        self.hold_offset = None
        self._enter("approach")
