"""Scripted expert for LIBERO's libero_goal and libero_10 suites: objects placed on or in
fixtures' regions, a cabinet drawer pulled open or pushed shut, the stove's knob turned, a plate
carried by its rim, several objects placed in turn (libero_10's two-step goals).

It extends ``scripted_expert.ScriptedExpert`` (smooth reference motion, per-episode style,
grasp choice, regrasps) and also reads the fixtures' state that ``collect_actions`` adds to the
observation of these suites (``FIXTURE_OBS_SUITES``): ``<fixture>_pos``, ``<fixture>_quat``,
``<fixture>_qpos`` (drawers, knob) and ``<region>_pos`` (the BDDL file's region sites).

A task's BDDL goal becomes a list of stages, done in order::

    open     turn the hand to point at the cabinet, grip the drawer's handle, pull it out
    close    lean the closed hand toward the cabinet and push the drawer's handle in
    pick     the pick-and-place phases of ScriptedExpert, onto an object or into a region
    turn_on  grip the stove's knob from above and turn the hand about the vertical

("in the top drawer" is preceded by opening that drawer when it is closed; a drawer is closed
after what goes into it.) Each stage checks
its own result from the observation and repeats its motion when it failed (the drawer did not
open far enough, the knob slipped, the object slipped out). The same checks let the expert take
over an episode another policy started (``TaskExpert.take_over``, DAgger data): the stages whose
result holds are done, the first one left starts from wherever the hand is.

A libero_10 goal lists several predicates; they are done in the listed order (a drawer's close
after what goes into it), and each stage leaves the earlier ones' results alone, since LIBERO
checks all predicates at once. In task 5 the upright book, taken by its top edge, is turned on the
way until it lies along the caddy's back compartment and lowered into it (``RegionPlace.turn_along``).
In task 9 the hand, pointing down, cannot reach under the microwave's roof: the mug is taken by its
handle, lowered in front of the opening and slid in, released, pushed deeper by the closed hand
leaning toward the microwave until its handle clears the door, and the door is then pushed shut
from outside along its arc (stages ``microwave_in``, ``microwave_push``, ``microwave_close``).

``SuiteExpert`` is the scripted expert of every supported suite: it hands libero_spatial and
libero_object tasks to ``ScriptedExpert`` unchanged and libero_goal and libero_10 tasks to
``TaskExpert``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
from scipy.spatial.transform import Rotation

import scripted_expert as se
from scripted_expert import (GRIPPER_CLOSE, GRIPPER_OPEN, RADIANS_PER_ACTION, Fixture,
                             GraspGeometry, PlaceGeometry, ScriptedExpert, draw_style, object_kind,
                             quat_xyzw_to_rotation)

TASK_SUITES = ("libero_goal", "libero_10")
SUPPORTED_SUITES = se.SUPPORTED_SUITES + TASK_SUITES

# Objects of the libero_goal scene that the pick-and-place tables of scripted_expert lack.
# Lengths from the collision meshes, measured in the simulator at the benchmark's init states.
TASK_OBJECT_GEOMETRY = {
    # Plate: a 6 cm base and a rim of eight slats rising at 20 degrees from r = 3 cm to its edge at
    # r = 6.6 cm, 1.6 cm up; it weighs ~10 g. Far too wide for the fingers (7.8 cm), it is pinched
    # at the rim: the hand centred 5.8 cm out, the outer finger beyond the edge, the inner one's
    # tip down on the base, so that it meets the slat near its foot as the fingers close and they
    # hold the whole slat (taken 6 mm higher, the fingers held only its edge: 14 of 20 lifts).
    "plate": GraspGeometry(grasp_height=0.012, rim_offset=0.058, rim_height=0.0, bottom=0.001),
    # Wine bottle: origin at its bottom, body 3 cm wide up to 7.3 cm, a 2.3 cm ring up to 10 cm,
    # neck 1.1 cm wide up to 15.8 cm. Taken by the neck, 2.5 cm below its top (the palm clears it).
    "wine_bottle": GraspGeometry(grasp_height=0.133, rim_offset=0.0, rim_height=0.0, bottom=0.0,
                                 yaws=(0.0, se.ALONG_X)),
    # libero_10's mugs, too wide for the open fingers (cups 9.6 and 10.6 cm across): taken by
    # the cup's wall like a bowl's rim, the EEF 1.7 cm below the rim, away from the handle.
    # Origin at the bottom, between the cup's centre and the handle. White mug: cup centred 1.25
    # cm along its own x, rim 10.8 cm up, handle toward -x; yellow-white mug: cup centred 1.85 cm
    # along -x, rim 10.3 cm up, handle toward +x.
    "porcelain_mug": GraspGeometry(grasp_height=-0.017, rim_offset=0.042, rim_height=0.108, bottom=0.0,
                                   rim_centre=(0.0125, 0.0), handle=(-1.0, 0.0)),
    "white_yellow_mug": GraspGeometry(grasp_height=-0.017, rim_offset=0.047, rim_height=0.103, bottom=0.0,
                                      rim_centre=(-0.0185, 0.0), handle=(1.0, 0.0)),
}

# Objects too wide for the open fingers (7.7 cm) everywhere but at a handle, and light enough to
# hang from it: taken by the handle from above, the fingers closing across it. Per kind: the
# handle's grasped point (x, y) and the fingers' closing axis (x, y), both in the object's own
# frame; the height is the GraspGeometry's grasp_height.
HANDLE_GRASPS = {
    # Moka pot (68 g): an octagonal body 7.4-8 cm across, 15.2 cm tall, origin 6.6 cm above its
    # bottom; a handle ~1.5 cm thick sticks out 4-5.5 cm along its own +y, its top 6.7 cm above
    # the origin near the body. The EEF 2.2 cm below the handle's top, 6.5 cm out from the axis
    # (the palm, 3 cm above the EEF, clears the lid's top).
    "moka_pot": ((0.0, 0.065), (1.0, 0.0)),
}
TASK_OBJECT_GEOMETRY["moka_pot"] = GraspGeometry(grasp_height=0.045, rim_offset=0.0, rim_height=0.0, bottom=0.066)
# libero_10's black book (43 g) stands upright on its bottom edge: a box 2.87 cm thick (its own x),
# 11.04 cm wide (own y) and 13.44 cm tall, its origin at the bottom, 1.2 cm off the box's centre
# along its own -y, the box's bottom 0.2 cm above the origin (from its collision box). Taken from
# above at its top edge like a handle (the same point of its own frame, the fingers closing across
# its thickness, the hand's yaw following the book's): the box's centre line, the EEF 2.8 cm below
# the top edge (the palm, 3 cm above the EEF, just clear of it).
HANDLE_GRASPS["black_book"] = ((-0.0005, -0.012), (1.0, 0.0))
TASK_OBJECT_GEOMETRY["black_book"] = GraspGeometry(grasp_height=0.108, rim_offset=0.0, rim_height=0.0, bottom=-0.002)

# Grasps that differ in a suite's scenes: libero_10's living room crowds the flat boxes between
# tall bottles and cartons (7-8 cm from a box's centre), where the hand's 21 cm long body or an
# open finger meets them. The hand may also turn BOX_TURN (rad) off the box's width (the box
# is then 6.4-7.1 cm across the fingers, which open to 7.7 cm; closing turns it square) and
# shift 1.2 cm along the fingers' axis (the open fingers leave ~1.7 cm beside a box 4-4.6 cm wide).
BOX_TURN = 0.35
SUITE_OBJECT_GEOMETRY = {
    "libero_10": {kind: replace(se.OBJECT_GEOMETRY[kind], shift=0.012, yaws=(0.0, -BOX_TURN, BOX_TURN))
                  for kind in ("cream_cheese", "butter", "chocolate_pudding")},
}

# The arm's shoulder (robot base + 0.333 m, world xyz) per LIBERO scene, for the suites whose
# tasks are set in more than one scene (libero_10): the robot stands at another place and
# height in each (measured: base at (-0.51, 0, 0.42) in the living room, (-0.66, 0, 0.912) in
# the kitchen, (-0.75, 0, 0.912) in the study). See scripted_expert.SHOULDER.
SCENE_SHOULDER = {
    "LIVING_ROOM": np.array([-0.51, 0.0, 0.753]),
    "KITCHEN": np.array([-0.66, 0.0, 1.245]),
    "STUDY": np.array([-0.75, 0.0, 1.245]),
}


def task_shoulder(task) -> np.ndarray:
    """The shoulder [3] of ``task``'s scene: per suite (scripted_expert.SHOULDER) or, in
    libero_10, from the scene named at the start of the task's name (``KITCHEN_SCENE3_...``)."""
    if task.suite in se.SHOULDER:
        return se.SHOULDER[task.suite]
    m = re.match(r"^(?P<scene>[A-Z_]+?)_SCENE\d+_", task.name)
    if m is None or m.group("scene") not in SCENE_SHOULDER:
        raise ValueError(f"no arm placement known for the scene of {task.suite} task {task.task_id} "
                         f"({task.name!r}); known scenes: {', '.join(SCENE_SHOULDER)}")
    return SCENE_SHOULDER[m.group("scene")]


@dataclass(frozen=True)
class RegionPlace:
    """Where a carried object goes in a region or on an object (see scripted_expert.PlaceGeometry).

    place: surface, clear_height and xy_tolerance relative to the target's reference point
        (an object's origin, a region site's centre).
    shift: [3] m added to that point in the frame of the fixture the region belongs to, to keep
        the object off the region's edges or within the arm's reach.
    lay_along: None (the object is put down upright) or [3] the direction, in the fixture's
        frame, along which the object's own vertical axis is laid (a bottle on a slanted rack):
        the hand tilts the held object that way during the carry.
    turn_along: None or [2] a horizontal direction in the fixture's frame (a narrow slot's
        width): during the carry the hand turns the held object about the vertical until its own
        x axis lies along it (either way, the smaller turn) and brings the object's grasped point
        (HANDLE_GRASPS, at its bottom) over the place, measured from the object's observed pose;
        it goes down only once both are within SLOT_YAW_TOLERANCE and SLOT_XY_TOLERANCE, with no
        place offset of the episode's style.
    """

    place: PlaceGeometry
    shift: tuple = (0.0, 0.0, 0.0)
    lay_along: tuple | None = None
    turn_along: tuple | None = None


# Keyed by target_kind(name). Heights measured from the collision geometry of the goal scene.
PLACES = {
    "plate": RegionPlace(se.TARGET_GEOMETRY["plate"]),
    # The table region in front of the stove (+-4 cm), its site 0.8 cm below the plate's origin when
    # the plate lies on the table. The cream cheese stands just short of the region's -y edge:
    # the plate goes 1.5 cm beyond the centre.
    "main_table_stove_front_region": RegionPlace(PlaceGeometry(surface=0.008, clear_height=0.08, xy_tolerance=0.03),
                                                 shift=(0.0, 0.015, 0.0)),
    # Cream cheese into the bowl: onto its floor, within LIBERO's 3 cm "on" test.
    "akita_black_bowl": RegionPlace(PlaceGeometry(surface=0.005, clear_height=0.07, xy_tolerance=0.02)),
    # The stove's cook region (+-7.5 cm), its site at the burner box's centre, the plate 2.5 cm up.
    "flat_stove_cook_region": RegionPlace(PlaceGeometry(surface=0.025, clear_height=0.06, xy_tolerance=0.05)),
    # The cabinet's top (+-12.5 x +-9.4 cm), its site on the top plank: the part nearest the robot.
    "wooden_cabinet_top_side": RegionPlace(PlaceGeometry(surface=0.002, clear_height=0.03, xy_tolerance=0.04),
                                           shift=(0.06, -0.04, 0.0)),
    # The open top drawer: its site 2.7 cm above the floor, in the middle of the drawer; walls
    # ~3.5 cm above the site. Placed toward the drawer's front, clear of the cabinet's plank.
    "wooden_cabinet_top_region": RegionPlace(PlaceGeometry(surface=-0.027, clear_height=0.045, xy_tolerance=0.05)),
    # The wine rack: an upper shelf rising at 31 degrees along the rack's y axis with a lip at its
    # low end, where the region's site is (a slab 20 cm along the lip, 4.4 cm across, reaching
    # 9.75 cm up the shelf). The bottle is laid on the shelf, its bottom just above the lip, to
    # the side of the post that holds the shelves in the middle.
    "wine_rack_top_region": RegionPlace(PlaceGeometry(surface=0.0, clear_height=0.05, xy_tolerance=0.03),
                                        shift=(0.05, 0.017, 0.03), lay_along=(0.0, 0.855, 0.519)),
}

# Places that differ in a suite's scenes (keyed like PLACES): libero_10's living room has mugs
# 10.8 cm tall on the table, which a mug carried to a plate must pass over.
SUITE_PLACES = {
    "libero_10": {
        "plate": RegionPlace(PlaceGeometry(surface=0.012, clear_height=0.13, xy_tolerance=0.03)),
    },
}
# libero_10's kitchen: a moka pot (15.2 cm tall) is carried over the other pot.
SUITE_PLACES["libero_10"]["flat_stove_cook_region"] = RegionPlace(
    PlaceGeometry(surface=0.025, clear_height=0.17, xy_tolerance=0.05))
# Targets that take more than one object side by side: when a task puts several objects there,
# the n-th pick stage onto the target adds the n-th shift (m, in the fixture's frame) to the place's own. Two moka pots on the
# stove's cook region (+-7.5 cm): one behind the other along the stove's x axis (away from the
# robot in libero_10). The hand holds a pot by its handle, beside the pot, and the pots' handles
# point along the stove's -y there, so side by side along y the fingers would meet the first pot;
# the far slot first, so that the arm does not come down over a placed pot.
SHARED_PLACE_SLOTS = {
    "flat_stove_cook_region": ((0.045, 0.0, 0.0), (-0.045, 0.0, 0.0)),
}

# libero_10's kitchen: the white cabinet's open bottom drawer (the same drawers and handles as
# the wooden cabinet's). Its region's site moves with the drawer, 2.6 cm above the drawer's floor,
# 8.35 cm behind the drawer's front wall; walls 3 cm above the site. Pulled out 14-16 cm, the
# drawer leaves no room for the bowl (10.7 cm) between its front wall and the handle of the
# drawer above, which the bowl's far rim passes in the last 3-5 cm of its descent: the bowl goes
# 1.8 cm out from the site, ~1.2 cm clear of the front wall, and its rim scrapes past the handle
# (placed 2.6 cm out, the bowl landed on the front wall in 2 of 5 episodes, tilted, and its rim
# then caught the shelf above when the drawer was pushed in).
PLACES["white_cabinet_bottom_region"] = RegionPlace(
    PlaceGeometry(surface=-0.026, clear_height=0.045, xy_tolerance=0.05), shift=(0.0, -0.018, 0.0))

# libero_10's study: the desk caddy's back compartment (caddy frame, from its collision boxes): a
# slot 6.0 cm across (x, between the middle divider, 9.9 cm tall, and the back wall, 16.8 cm) and
# 12.9 cm long (y, between side walls 15-16.8 cm tall), its floor 1.4 cm above the caddy's origin.
# The region's site is 8.6 cm above the origin, 0.1 cm behind and 0.3 cm beside the slot's centre;
# LIBERO counts the book in while its origin (at its bottom) is within +-2.8 x +-6.2 cm of the site
# and between 7.05 cm below it and 6 cm above it: from the moment its bottom enters the slot 2.2 cm
# below the back wall's top until it stands on the floor, where its origin, 0.2 cm below its box,
# is 0.35 cm too low (measured: out again once released). LIBERO ends an episode at its first
# success, with the book held in the slot. The book (2.87 x 11.04 cm) goes down upright, its
# thickness across the slot and its centre over the slot's centre: 0.9 cm to spare along the slot,
# 1.6 cm across it. Carried with its bottom 10 cm above the site, 1.4 cm above the walls.
PLACES["desk_caddy_back_contain_region"] = RegionPlace(
    PlaceGeometry(surface=-0.0718, clear_height=0.10, xy_tolerance=0.0275),
    shift=(-0.001, 0.0032, 0.0), turn_along=(1.0, 0.0))
# A slotted place (RegionPlace.turn_along): the held object goes down once its axis is within
# SLOT_YAW_TOLERANCE (rad) of the slot's and its grasped point within SLOT_XY_TOLERANCE (m) of the
# place (a book 5 degrees off the slot's axis spans 11.25 x 3.8 cm of the 12.9 x 6 cm slot).
SLOT_YAW_TOLERANCE = 0.05
SLOT_XY_TOLERANCE = 0.004

# libero_10's living-room places.
PLACES.update({
    # The basket's contain region: its site 7.2 cm above the basket's origin (the basket's floor
    # 1 cm above that, its walls up to 14.6 cm); scripted_expert.TARGET_GEOMETRY["basket"].
    "basket_contain_region": RegionPlace(PlaceGeometry(surface=-0.062, clear_height=0.093, xy_tolerance=0.04)),
    # The table region right of the plate (+-5 cm, its site 2.6 cm below the table top, the
    # plate's rim reaching 2 cm into it): toward the region's far side from the plate.
    "living_room_table_plate_right_region": RegionPlace(PlaceGeometry(surface=0.026, clear_height=0.13,
                                                                      xy_tolerance=0.03),
                                                        shift=(0.0, 0.02, 0.0)),
})

# (The plate is pinched at its rim and carried into the region in front of the stove: pushed, it
# got there from 6 of 20 held-out init states, carried from 20; see the libero_goal notebook note.)
# Dishes taken by a pinch of their rim (see TASK_OBJECT_GEOMETRY): one hangs from the fingers
# and, as the lift starts, pivots on its far edge, so its origin rises about half as fast as the
# hand (at least PINCHED_RISE_MIN (m) once the hand has risen se.LIFT_CHECK_RISE); it swings
# under the hand on the way, so it counts as held while its origin stays within PINCHED_SWING
# (m) of the EEF, and it is placed by where it hangs now, not where it hung after the lift.
PINCHED = ("plate",)
PINCHED_RISE_MIN = 0.006
PINCHED_SWING = 0.09

# Cabinet drawers: the handle's centre in the cabinet's frame at a closed drawer (the drawer
# slides along the cabinet's y axis, joint position negative = pulled out; LIBERO counts it open
# below -0.14 and the joint stops at -0.16), per drawer.
DRAWER_HANDLE = {"top": (-0.003, -0.1016, 0.1839), "middle": (-0.003, -0.1016, 0.1104),
                 "bottom": (-0.003, -0.1016, 0.0411)}
DRAWER_JOINT = {"top": 0, "middle": 1, "bottom": 2}  # index in <cabinet>_qpos
DRAWER_OPEN_QPOS = -0.14
# Where a bowl fits into a drawer (cabinet frame, distances out of the cabinet, at a closed drawer):
# the region's centre DRAWER_REGION_Y, the front wall's inside DRAWER_FRONT_INNER, the top plank's
# front edge PLANK_EDGE. LIBERO counts the bowl in once its base is between the walls; there its
# body, BOWL_UNDER_PLANK (m) wide from the centre at the plank's height, must be clear of the plank.
DRAWER_REGION_Y = 0.01128
DRAWER_FRONT_INNER = 0.0725
PLANK_EDGE = 0.078
BOWL_UNDER_PLANK = 0.04
DRAWER_PULL_TO = -0.155  # pulled this far (m) to be safely open
# The hand points at the drawer's front (turned 90 degrees from pointing down) so that its
# fingers close vertically on the horizontal handle bar: pointing down, its 21 cm long body
# would hit the cabinet's front or the handle above. The EEF stops HANDLE_DEPTH (m) past the
# bar's centre toward the cabinet (the fingertips reach 1 cm further; the drawer's front is
# 2.4 cm behind the bar) and starts its approach HANDLE_STANDOFF in front of it.
HANDLE_DEPTH = 0.004
HANDLE_STANDOFF = 0.06
PULL_SPEED = 0.7  # action units
RISE_STEPS = 60  # longest rise (steps) after a take-over, before the stage starts anyway
# Backing away from a drawer that is open: this many steps straight out along the drawer, then on
# to the next stage (the hand points down again on its way there).
HANDLE_BACK_STEPS = 8
TILT_DONE = 0.05  # rad of tilt left at which a hand pointing down again may go down to a grasp
# The open top drawer may overhang the bowl on the table beside the cabinet (its floor 15 cm up,
# the bowl 5.2 cm tall): lifted straight up, the bowl's rim met the drawer's floor and was pulled
# out of the fingers. A grasped object whose footprint comes within DRAWER_MARGIN (m) of an open
# drawer (pulled out more than DRAWER_PULLED) is first slid straight away from it on the table, at
# SLIDE_OUT_SPEED (action units), at most SLIDE_OUT_MAX (m). Cabinet frame: a drawer as wide as
# DRAWER_HALF_WIDTH either side, from the carcass's front (CABINET_FRONT) to HANDLE_TO_FRONT behind
# its handle's centre (from the collision boxes).
CABINET_FRONT = -0.112
DRAWER_HALF_WIDTH = 0.11
HANDLE_TO_FRONT = 0.024
DRAWER_MARGIN = 0.01
DRAWER_PULLED = 0.03
SLIDE_OUT_SPEED = 0.4
SLIDE_OUT_MAX = 0.06
TILT_SPEED = 0.8  # fastest tilt of the hand, action units (1.0 ~ 4.8 degrees per step)
TILT_TOLERANCE = 0.12  # rad of tilt error at which the hand may go in for the handle

# Closing a drawer: the closed fingers, leaning CLOSE_TILT (rad) toward the cabinet (the wrist
# and palm away from the handles above), push the front of the handle bar (HANDLE_FRONT m in front
# of its centre) at its height until the joint passes DRAWER_CLOSED_QPOS (LIBERO counts a drawer
# closed above 0; its stop is at 0.01). They start CLOSE_STANDOFF in front of the bar.
CLOSE_TILT = 0.8
HANDLE_FRONT = 0.008
CLOSE_STANDOFF = 0.025
DRAWER_CLOSED_QPOS = 0.004
DRAWER_CLOSE_TO = 0.012  # the push aims this far (joint position) into the cabinet: past the stop
CLOSE_SPEED = 0.6  # action units
# A drawer already out this far (m, joint position) has room for an object: no need to pull it.
DRAWER_ROOM_QPOS = -0.13

# The stove's knob: a hinge about the vertical at the stove's origin; LIBERO counts the stove on
# at a joint angle >= 0.5 rad (its stop is 2.1). Its grip ridge runs along KNOB_RIDGE_AXIS
# (the stove's frame); the fingers close across it with the EEF KNOB_GRIP_HEIGHT above the
# stove's origin, and the hand turns KNOB_TURN rad counter-clockwise.
KNOB_RIDGE_AXIS = (1.0, 0.0)
KNOB_GRIP_HEIGHT = 0.035
KNOB_ON = 0.5
KNOB_TURN = 1.0
KNOB_TURNED = 0.75

# libero_10 task 9: the white-yellow mug into the microwave, the door shut. Microwave frame (its
# collision boxes in microwave.xml; the microwave stands unturned, its opening toward -y): cavity
# floor at z 0.024, roof from z 0.168 to 0.187, floor and roof end at the front at y -0.088, side
# walls' inner faces at x -0.1435 and +0.0635; the door (25.9 cm, its outer face 2.5 cm from the
# hinge line, 19 cm tall) hinges about the vertical at MICROWAVE_HINGE, open at -1.33 to -2.06 rad
# in init states 0-19, shut at 0; LIBERO counts it closed above MICROWAVE_CLOSED_QPOS. The open door
# stands beside the opening on the robot's side, its top at z 0.19: the hand moves between the
# stages at MICROWAVE_CLEAR_Z. Any part of the palm (3 cm above the EEF and up) under the roof
# meets it, and no pointing-down grasp of the mug's rim can set it on the floor (the palm's front
# stays 3.5 cm short of the roof's edge): the mug is taken by its handle (MICROWAVE_HANDLE_GRASPS),
# the cup ahead of the hand, lowered in front of the opening, slid in with the hand's front
# MICROWAVE_SLIDE_GAP short of the roof's edge, released on the floor, and then pushed in by the
# closed hand leaning CLOSE_TILT toward the microwave until the handle's end is behind the door
# (MICROWAVE_PUSH_TO); last, the door is pushed shut from outside along its arc.
# Measured with a waypoint probe of these steps (notebook/2026-12-03-libero-10-microwave.md).
MICROWAVE_SUITES = ("libero_10",)
MICROWAVE_HINGE = (-0.1725, -0.088, 0.096)
MICROWAVE_CLOSED_QPOS = -0.005
MICROWAVE_CLEAR_Z = 0.34  # the hand's height between the stages (0.15 m over the door's top)
MICROWAVE_CARRY_Z = 0.31  # EEF height carrying the mug: its bottom 5 cm over the door's top
MICROWAVE_CAVITY_X = -0.04  # the cavity's middle (x)
MICROWAVE_ENTRY_Y = -0.25  # EEF y in front of the opening, the cup (ahead of the hand) clear of it
MICROWAVE_ROOF_FRONT = -0.088
MICROWAVE_FLOOR = 0.024
MICROWAVE_SLIDE_GAP = 0.01  # the palm's front (se.HAND_HALF_WIDTH ahead of the EEF) this far short of the roof
MICROWAVE_LIFT_OFF = 0.02  # the mug's bottom this far above the floor while slid in, then set down (at 0.8 cm the slide
# stalled 6 cm short in init states 1 and 17, likely the cup, pitched down about the handle, against the floor's front
# edge, and the released mug fell off that edge)
MICROWAVE_BACK_Y = -0.23  # EEF y after letting go: the fingers out of the handle, in front of the opening
# Pushing the mug in: the leaning fingertips from MICROWAVE_PUSH_START_Y to MICROWAVE_PUSH_TO (EEF y,
# 1.5 cm behind the roof's edge), MICROWAVE_PUSH_Z above the microwave's origin (the handle's middle
# with the mug on the floor): the mug slid 6.8 cm deeper in the probe, its handle's end 1.5-2.5 cm
# behind the door's inner face (y -0.089). Done once that end is MICROWAVE_DOOR_CLEAR behind it.
MICROWAVE_PUSH_START_Y = -0.20
MICROWAVE_PUSH_TO = -0.073
MICROWAVE_PUSH_Z = 0.08
MICROWAVE_DOOR_INNER = -0.089
MICROWAVE_DOOR_CLEAR = 0.005
# Shutting the door: the closed hand, its long side along the door, pushes the door's outer face
# DOOR_PUSH_RADIUS from the hinge (inside the door's handle bar, 23.75 cm out), its EEF DOOR_PUSH_OUT
# from the hinge line (0.5 cm into the outer face: it presses) and DOOR_PUSH_DROP below the hinge's
# height, aiming DOOR_PUSH_LEAD rad ahead of the door's angle (never past shut); it starts
# DOOR_STANDOFF further out. Probe: shut in 20/20 init states, 61-79 steps of pushing.
DOOR_PUSH_RADIUS = 0.18
DOOR_PUSH_OUT = 0.03
DOOR_PUSH_DROP = 0.02
DOOR_PUSH_LEAD = 0.25
DOOR_STANDOFF = 0.06
MICROWAVE_TRIES = 3  # repeats of a stalled push
# Objects taken by their handle for the microwave (HANDLE_GRASPS' form, in this task only: task 4
# takes the same mug by its rim): the white-yellow mug's handle is a vertical bar at its own
# (0.064, 0), 1.75 cm wide along its own y, from 2.7 to 8.5 cm up; the EEF 7 cm up (the palm above
# the cup's rim, 10.3 cm), the fingers closing along its own y. The handle's end is 6.8 cm out.
MICROWAVE_HANDLE_GRASPS = {"white_yellow_mug": ((0.064, 0.0), (0.0, 1.0), 0.07, 0.068)}



@dataclass(frozen=True)
class Stage:
    """One step of a task. kind: pick | open | close | turn_on | microwave_in | microwave_push |
    microwave_close; obj: the object moved (pick, microwave_in/_push);
    target: where it goes (an object or a region site); fixture, part: the fixture acted
    on (a cabinet and its drawer 'top' / 'middle' / 'bottom'; a stove)."""

    kind: str
    obj: str = ""
    target: str = ""
    fixture: str = ""
    part: str = ""


_DRAWER_REGION = re.compile(r"^(?P<fixture>.+_cabinet_\d+)_(?P<part>top|middle|bottom)_region$")
_MICROWAVE_REGION = re.compile(r"^(?P<fixture>microwave_\d+)_heating_region$")


def target_kind(name: str) -> str:
    """``"wooden_cabinet_1_top_side"`` -> ``"wooden_cabinet_top_side"``; ``"plate_1"`` -> ``"plate"``."""
    return re.sub(r"_\d+(?=_|$)", "", name)


def region_fixture(name: str, task) -> str | None:
    """The fixture a region site belongs to (``"flat_stove_1_cook_region"`` -> ``"flat_stove_1"``),
    or None for an object or a table region."""
    m = re.match(r"^(?P<fixture>.+?_\d+)_.+$", name)
    if m is None or m.group("fixture") in task.objects or m.group("fixture").startswith("main_table"):
        return None
    return m.group("fixture")


def plan_stages(task) -> list[Stage]:
    """The stages that solve ``task`` (collect_actions.TaskInfo), or ValueError naming what
    the expert cannot do."""
    if task.suite not in TASK_SUITES:
        raise ValueError(
            f"the scripted expert cannot solve suite {task.suite!r} (task {task.task_id}: "
            f"{task.instruction!r}); supported suites: {', '.join(SUPPORTED_SUITES)}"
        )
    stages = []
    closing = []  # (drawer region, close stage), placed once the other stages are known
    for predicate in task.goal:
        name = predicate[0].lower()
        if name == "open" and _DRAWER_REGION.match(predicate[1]):
            m = _DRAWER_REGION.match(predicate[1])
            stages.append(Stage("open", fixture=m.group("fixture"), part=m.group("part")))
        elif name == "close" and _DRAWER_REGION.match(predicate[1]):
            m = _DRAWER_REGION.match(predicate[1])
            closing.append((predicate[1], Stage("close", fixture=m.group("fixture"), part=m.group("part"))))
        elif name == "turnon" and target_kind(predicate[1]) == "flat_stove":
            stages.append(Stage("turn_on", fixture=predicate[1]))
        elif name == "close" and task.suite in MICROWAVE_SUITES and target_kind(predicate[1]) == "microwave":
            stages.append(Stage("microwave_close", fixture=predicate[1]))
        elif (name == "in" and len(predicate) == 3 and task.suite in MICROWAVE_SUITES
              and _MICROWAVE_REGION.match(predicate[2]) and object_kind(predicate[1]) in MICROWAVE_HANDLE_GRASPS):
            fixture = _MICROWAVE_REGION.match(predicate[2]).group("fixture")
            stages.append(Stage("microwave_in", obj=predicate[1], target=predicate[2], fixture=fixture))
            stages.append(Stage("microwave_push", obj=predicate[1], target=predicate[2], fixture=fixture))
        elif name in ("on", "in") and len(predicate) == 3:
            obj, target = predicate[1], predicate[2]
            kind = object_kind(obj)
            if grasp_for(task.suite, obj) is None:
                raise ValueError(f"no grasp geometry for object {obj!r} ({task.suite} task {task.task_id})")
            if place_for(task.suite, target) is None:
                raise ValueError(f"no place geometry for target {target!r} ({task.suite} task {task.task_id}); "
                                 f"known: {', '.join(sorted(PLACES))}")
            drawer = _DRAWER_REGION.match(target)
            if drawer:
                stages.append(Stage("open", fixture=drawer.group("fixture"), part=drawer.group("part")))
            stages.append(Stage("pick", obj=obj, target=target))
        else:
            raise ValueError(f"the scripted expert cannot do {predicate!r} ({task.suite} task {task.task_id}: "
                             f"{task.instruction!r})")
    # A drawer is closed after the objects that go into it ("put the bowl in the drawer and close
    # it" lists the close first), else where the goal lists it.
    for region, stage in closing:
        into = [i for i, s in enumerate(stages) if s.kind == "pick" and s.target == region]
        stages.insert(into[-1] + 1 if into else len(stages), stage)
    return stages


def grasp_for(suite: str, obj: str) -> GraspGeometry | None:
    """How to grasp ``obj`` in ``suite``, or None if unknown."""
    kind = object_kind(obj)
    return (SUITE_OBJECT_GEOMETRY.get(suite, {}).get(kind) or TASK_OBJECT_GEOMETRY.get(kind)
            or se.OBJECT_GEOMETRY.get(kind))


def place_for(suite: str, target: str) -> RegionPlace | None:
    """Where a carried object goes on or in ``target`` in ``suite``, or None if unknown."""
    kind = target_kind(target)
    return SUITE_PLACES.get(suite, {}).get(kind) or PLACES.get(kind)


def split_yaw(rotation: Rotation) -> tuple[float, np.ndarray]:
    """rotation = lean * turn about the vertical (swing-twist): (the turn's angle in rad, the
    lean's rotation vector [3], horizontal)."""
    x, y, z, w = rotation.as_quat()
    yaw = 2.0 * float(np.arctan2(z, w)) if abs(z) + abs(w) > 1e-12 else 0.0
    lean = (rotation * Rotation.from_rotvec([0.0, 0.0, yaw]).inv()).as_rotvec()
    return float((yaw + np.pi) % (2 * np.pi) - np.pi), lean


def _yaw_rotation(obs, fixture: str) -> Rotation:
    """The fixture's orientation (LIBERO's fixtures stand upright, turned about the vertical)."""
    return quat_xyzw_to_rotation(obs[f"{fixture}_quat"])


# Fixtures of the goal scene for carrying and grasp clearance: footprint (cabinet frame x, y box)
# and top above the fixture's origin.
FIXTURE_BOXES = {
    # The cabinet's carcass and its closed drawers' fronts and handles.
    "wooden_cabinet": ((-0.125, 0.125), (-0.112, 0.112), 0.223),
    # The stove's base and knob (origin at the knob; the burner 15 cm along its x axis).
    "flat_stove": ((-0.06, 0.25), (-0.1, 0.1), 0.045),
    # The wine rack's stand, slanted shelves and the post between them.
    "wine_rack": ((-0.14, 0.14), (-0.12, 0.08), 0.33),
    # libero_10's white cabinet: its carcass (the closed drawers' fronts and handles 3 cm in front).
    "white_cabinet": ((-0.118, 0.118), (-0.112, 0.11), 0.222),
}


def scene_fixtures(obs) -> tuple:
    """Fixture footprints of the scene from the observed fixture poses."""
    out = []
    for key in obs:
        if not key.endswith("_qpos") and key.endswith("_quat"):
            name = key[: -len("_quat")]
            kind = target_kind(name)
            if kind not in FIXTURE_BOXES or f"{name}_pos" not in obs:
                continue
            (x0, x1), (y0, y1), top = FIXTURE_BOXES[kind]
            rot = _yaw_rotation(obs, name).as_matrix()[:2, :2]
            corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) @ rot.T + np.asarray(obs[f"{name}_pos"])[:2]
            out.append(Fixture(name=name, footprint=corners, top=float(obs[f"{name}_pos"][2]) + top))
    return tuple(out)


class TaskExpert(ScriptedExpert):
    """Closed-loop expert for the stages of a libero_goal or libero_10 task; see the module docstring."""

    # ------------------------------------------------------------------ episode set-up
    def reset(self, task, rng: np.random.Generator) -> None:
        self.stages = plan_stages(task)
        self.task = task
        self.shoulder = task_shoulder(task)
        self.style = draw_style(rng, self.noise)
        self._reset_motion()
        self.obj = self.target = ""
        self.region = None  # RegionPlace of a pick stage
        self._reset_pick()
        self.fixtures = ()
        self.tilt_axis = np.array([1.0, 0.0, 0.0])  # world axis the hand tilts about
        self.ref_tilt = 0.0  # tilt reference (rad) and its rate (rad per step)
        self.ref_tilt_vel = 0.0
        self.tilt_goal = 0.0
        self.stage_index = -1
        self.stage = None
        self.start_phase = "approach"
        self.tries = 0  # repeats of the current stage's motion
        self.grip_point = None  # where the hand took hold of a handle, a knob [3]
        self._next_stage()

    def take_over(self, obs: dict, first_obs: dict) -> str:
        """Continue, from the state ``obs``, an episode that another policy started in
        ``first_obs`` (call right after ``reset``); returns the phase it starts in.

        The stages whose result already holds (a drawer open or closed, the knob on, an object
        in place and out of the hand) are done, except the last. The first
        stage left starts afresh: a pick stage from the hand's current pose, or, its object
        hanging in the hand, from the lift (``ScriptedExpert.take_over``); any other stage after
        the hand has risen to the episode's starting height (phase ``rise``). The hand's orientation
        is split into a turn about the vertical (the reference yaw) and a lean (the tilt the
        drawer phases use), which the first stage then steers to its own goal.
        """
        if self.task is None:
            raise RuntimeError("TaskExpert.take_over() called before reset(task, rng)")
        while self.stage_index + 1 < len(self.stages) and self._stage_done(obs, first_obs):
            self._next_stage()
        self._take_over_orientation(obs, first_obs)
        if self.stage.kind == "pick":
            return self._take_over_pick(obs, first_obs)
        # first up to the height the episode started at, the hand open and pointing down, as at
        # the start of an episode: a hand left low between the fixtures can catch on them
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        self.hold_point = np.array([eef[0], eef[1], max(float(eef[2]), float(first_obs["robot0_eef_pos"][2]))])
        self._enter("rise")
        return self.phase

    def _take_over_orientation(self, obs: dict, first_obs: dict) -> None:
        self.ref_rotation = quat_xyzw_to_rotation(first_obs["robot0_eef_quat"])
        turned = quat_xyzw_to_rotation(obs["robot0_eef_quat"]) * self.ref_rotation.inv()
        yaw, lean = split_yaw(turned)
        self.ref_yaw = yaw
        angle = float(np.linalg.norm(lean))
        self.tilt_axis = lean / angle if angle > 1e-9 else np.array([1.0, 0.0, 0.0])
        self.ref_tilt, self.ref_tilt_vel, self.tilt_goal = angle, 0.0, 0.0

    def _stage_done(self, obs: dict, first_obs: dict) -> bool:
        """Whether the current stage's result already holds in ``obs``."""
        kind = self.stage.kind
        if kind == "open":
            return self._drawer(obs)[2] < DRAWER_OPEN_QPOS
        if kind == "close":
            return self._drawer(obs)[2] > DRAWER_CLOSED_QPOS
        if kind == "turn_on":
            return self._knob(obs)[2] >= KNOB_ON
        if kind == "microwave_close":
            return self._door(obs)[1] > MICROWAVE_CLOSED_QPOS
        if kind in ("microwave_in", "microwave_push"):
            return self._mug_behind_door(obs) and not self._held_at_take_over(obs, first_obs)
        return self._goal_reached(obs) and not self._held_at_take_over(obs, first_obs)

    def _next_stage(self) -> None:
        self.stage_index += 1
        st = self.stage = self.stages[self.stage_index]
        self.tries = 0
        if st.kind == "pick":
            self.obj, self.target = st.obj, st.target
            kind = object_kind(st.obj)
            self.grasp = grasp_for(self.task.suite, st.obj)
            self.region = place_for(self.task.suite, st.target)
            slots = SHARED_PLACE_SLOTS.get(target_kind(st.target))
            sharing = [i for i, s in enumerate(self.stages) if s.kind == "pick" and s.target == st.target]
            if slots is not None and len(sharing) > 1:  # a single object keeps the place's own spot
                n = sharing.index(self.stage_index)
                if n >= len(slots):
                    raise ValueError(f"no room for {st.obj!r} on {st.target!r}: {len(slots)} objects at most "
                                     f"({self.task.suite} task {self.task.task_id})")
                self.region = replace(self.region, shift=tuple(np.add(self.region.shift, slots[n])))
            self.place = self.region.place
            self._reset_pick()
            self.start_phase = "approach"
        elif st.kind == "open":
            self.start_phase = "handle_approach"
        elif st.kind == "close":
            self.start_phase = "close_approach"
        elif st.kind.startswith("microwave"):
            self.obj, self.target = st.obj, st.target
            self.start_phase = {"microwave_in": "mw_rise", "microwave_push": "push_rise",
                                "microwave_close": "door_over"}[st.kind]
        else:  # turn_on
            self.start_phase = "knob_approach"
        if self.stage_index > 0:
            ScriptedExpert._enter(self, self.start_phase)

    def _enter(self, phase: str) -> None:
        if phase == "idle" and self.stage_index + 1 < len(self.stages):
            self._next_stage()
            return
        super()._enter(phase)

    def act(self, obs: dict) -> np.ndarray:
        if self.task is not None and not self.fixtures:
            self.fixtures = scene_fixtures(obs)
        return super().act(obs)

    # ------------------------------------------------------------------ geometry
    def _shoulder(self) -> np.ndarray:
        return self.shoulder

    def _is_neighbour(self, key: str) -> bool:
        if not self.task.objects:
            return super()._is_neighbour(key)
        name = key[: -len("_pos")]
        return key.endswith("_pos") and name in self.task.objects and name != self.obj

    def _grasp_candidates(self, obs):
        """ScriptedExpert's candidates, or for an object in HANDLE_GRASPS the one grasp of its
        handle (as a centre grasp: the handle's offset from the origin and the hand's yaw
        follow the object's current pose)."""
        handle = HANDLE_GRASPS.get(object_kind(self.obj))
        if handle is None:
            yield from super()._grasp_candidates(obs)
            return
        point_local, axis_local = handle
        rot = quat_xyzw_to_rotation(obs[f"{self.obj}_quat"])
        offset = rot.apply([*point_local, 0.0])[:2]
        axis = rot.apply([*axis_local, 0.0])[:2]
        axis = axis / np.linalg.norm(axis)
        point = self._obj_pos(obs) + np.array([offset[0], offset[1], self.grasp.grasp_height])
        fingers = [point[:2] + se.FINGER_OPEN_OFFSET * axis, point[:2] - se.FINGER_OPEN_OFFSET * axis]
        yaw = se.finger_yaw(float(np.arctan2(axis[1], axis[0])))
        yield ("centre", (offset[0], offset[1]), yaw, "open"), point, axis, fingers, None

    def _target_pos(self, obs) -> np.ndarray:
        p = np.asarray(obs[f"{self.target}_pos"], dtype=np.float64)
        fixture = region_fixture(self.target, self.task)
        if fixture is None:
            return p + np.asarray(self.region.shift)
        shift = np.asarray(self.region.shift, dtype=np.float64)
        drawer = _DRAWER_REGION.match(self.target)
        if drawer is not None and drawer.group("part") == "top":  # under the top plank (libero_10's bottom
            #                                                         drawer has its own measured shift)
            shift = shift + np.array([0.0, -self._drawer_place_out(obs, drawer.group("fixture"), drawer.group("part")), 0.0])
        return p + _yaw_rotation(obs, fixture).apply(shift)

    def _drawer_place_out(self, obs, fixture: str, part: str) -> float:
        """How far (m) out of the cabinet from the drawer region's centre a bowl goes in: midway
        between the cabinet's top plank and the drawer's front wall at the drawer's opening now
        (the hand on its way to the bowl may have pushed the drawer partly shut), but never under
        the plank."""
        q = float(np.asarray(obs[f"{fixture}_qpos"])[DRAWER_JOINT[part]])
        back = PLANK_EDGE + BOWL_UNDER_PLANK
        front = DRAWER_FRONT_INNER - q - se.BOWL_RADIUS
        return max(back, 0.5 * (back + front)) - (-DRAWER_REGION_Y - q)

    def _lay_rotation(self, obs) -> Rotation | None:
        """The tilt that lays the held object along the region's lay_along direction, or None."""
        if self.region.lay_along is None:
            return None
        u = _yaw_rotation(obs, region_fixture(self.target, self.task)).apply(self.region.lay_along)
        u = u / np.linalg.norm(u)
        axis = np.cross([0.0, 0.0, 1.0], u)
        return Rotation.from_rotvec(axis / np.linalg.norm(axis) * float(np.arccos(np.clip(u[2], -1.0, 1.0))))

    def _grasped_point(self, obs) -> np.ndarray:
        """World position [3] of the held object's grasped point of HANDLE_GRASPS at the height of
        its origin (a book's: the centre of its bottom), or its origin."""
        handle = HANDLE_GRASPS.get(object_kind(self.obj))
        local = (0.0, 0.0) if handle is None else handle[0]
        return self._obj_pos(obs) + quat_xyzw_to_rotation(obs[f"{self.obj}_quat"]).apply([*local, 0.0])

    def _slot_turn(self, obs) -> float:
        """Turn (rad, about the vertical, in [-pi/2, pi/2)) that lays the held object's own x axis
        along the place's turn_along direction, either way."""
        along = _yaw_rotation(obs, region_fixture(self.target, self.task)).apply([*self.region.turn_along, 0.0])
        own_x = quat_xyzw_to_rotation(obs[f"{self.obj}_quat"]).apply([1.0, 0.0, 0.0])
        turn = float(np.arctan2(along[1], along[0]) - np.arctan2(own_x[1], own_x[0]))
        return (turn + np.pi / 2) % np.pi - np.pi / 2

    def _place_point(self, obs) -> np.ndarray:
        if self.region.turn_along is not None:  # the grasped point over the place, from where it is now
            eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
            t = self._target_pos(obs)
            xy = eef[:2] + t[:2] - self._grasped_point(obs)[:2]
            z = t[2] + self.place.surface + self.style.release_height + self._eef_above_bottom(obs)
            return np.array([xy[0], xy[1], z])
        lay = self._lay_rotation(obs)
        if lay is None:
            return super()._place_point(obs)
        origin = self._target_pos(obs) + np.array([*self.style.place_offset, 0.0])
        return origin + lay.apply(self.hold_offset)

    def _pinched(self) -> bool:
        return object_kind(self.obj) in PINCHED

    def _phase_lift(self, obs, eef):
        if self._pinched() and self.hold_offset is None and eef[2] - self.lift_start[0] > se.LIFT_CHECK_RISE:
            rose = self._obj_pos(obs)[2] - self.lift_start[1]
            if rose >= PINCHED_RISE_MIN and self._gripper_width(obs) >= se.EMPTY_GRIPPER_WIDTH:
                self.hold_offset = eef - self._obj_pos(obs)
        return super()._phase_lift(obs, eef)

    def _phase_lower(self, obs, eef):
        if self._pinched() and self._attached(obs):
            self.hold_offset = eef - self._obj_pos(obs)
        return super()._phase_lower(obs, eef)

    def _attached(self, obs) -> bool:
        if self._pinched():
            return bool(np.linalg.norm(np.asarray(obs["robot0_eef_pos"]) - self._obj_pos(obs)) < PINCHED_SWING)
        if self.region.lay_along is None:
            return super()._attached(obs)
        held = Rotation.from_rotvec(self.tilt_axis * self.ref_tilt).apply(self.hold_offset)
        return bool(np.linalg.norm(np.asarray(obs["robot0_eef_pos"]) - self._obj_pos(obs) - held) < 1.5 * se.SLIP_DISTANCE)

    def _phase_carry(self, obs, eef):
        if self.region.turn_along is not None and self._attached(obs):
            return self._carry_into_slot(obs, eef)
        if self._pinched() and self._attached(obs):
            self.hold_offset = eef - self._obj_pos(obs)
        lay = self._lay_rotation(obs)
        if lay is not None:  # tilt the held object on the way
            rv = lay.as_rotvec()
            self.tilt_axis, self.tilt_goal = rv / np.linalg.norm(rv), float(np.linalg.norm(rv))
        return super()._phase_carry(obs, eef)

    def _carry_into_slot(self, obs, eef):
        """The carry to a slotted place: the hand turns the held object about the vertical until it
        lies along the slot (its yaw goal: the hand's observed yaw plus the object's remaining turn),
        and goes down only once the object is turned and over the place (RegionPlace.turn_along)."""
        turn = self._slot_turn(obs)
        hand_yaw, _ = split_yaw(quat_xyzw_to_rotation(obs["robot0_eef_quat"]) * self.ref_rotation.inv())
        self.grasp_yaw = hand_yaw + turn - self.style.yaw_offset
        phase_t = self.phase_t
        out = super()._phase_carry(obs, eef)
        if self.phase == "lower":
            off = float(np.linalg.norm(self._place_point(obs)[:2] - eef[:2]))
            if abs(turn) > SLOT_YAW_TOLERANCE or off > SLOT_XY_TOLERANCE:
                self.phase, self.phase_t = "carry", phase_t  # not yet: keep turning and lining up
        return out

    def _restart(self) -> None:
        self.tilt_goal = 0.0  # an object slipped out of a tilted hand: point it down again
        super()._restart()

    def _goal_reached(self, obs) -> bool:
        p, t = self._obj_pos(obs), self._target_pos(obs)
        return bool(np.linalg.norm(p[:2] - t[:2]) < self.place.xy_tolerance + 0.02
                    and t[2] + self.place.surface - 0.03 < p[2] - self.grasp.bottom < t[2] + self.place.surface + 0.06)

    def _fixture_frame(self, obs, fixture: str) -> tuple[np.ndarray, Rotation]:
        return np.asarray(obs[f"{fixture}_pos"], dtype=np.float64), _yaw_rotation(obs, fixture)

    def _open_drawer_footprints(self, obs) -> list:
        """Footprints [4, 2] (world xy) of every cabinet drawer pulled out more than DRAWER_PULLED."""
        out = []
        for key in obs:
            m = re.match(r"^(?P<fixture>.+_cabinet_\d+)_qpos$", key)
            if m is None or f"{m.group('fixture')}_pos" not in obs:
                continue
            pos, rot = self._fixture_frame(obs, m.group("fixture"))
            qpos = np.asarray(obs[key], dtype=np.float64)
            for part, joint in DRAWER_JOINT.items():
                if joint < len(qpos) and qpos[joint] < -DRAWER_PULLED:
                    front = DRAWER_HANDLE[part][1] + qpos[joint] + HANDLE_TO_FRONT
                    corners = np.array([[-DRAWER_HALF_WIDTH, front], [DRAWER_HALF_WIDTH, front],
                                        [DRAWER_HALF_WIDTH, CABINET_FRONT], [-DRAWER_HALF_WIDTH, CABINET_FRONT]])
                    out.append(corners @ rot.as_matrix()[:2, :2].T + pos[:2])
        return out

    def _slide_out(self, obs) -> np.ndarray:
        """Horizontal move [2] (m) that takes the grasped object's footprint DRAWER_MARGIN clear of
        every open drawer, straight away from the nearest one; zero when it is clear."""
        p = self._obj_pos(obs)[:2]
        radius = se.NEIGHBOUR_SIZE.get(object_kind(self.obj), se.DEFAULT_NEIGHBOUR_SIZE)[0]
        footprints = self._open_drawer_footprints(obs)
        if not footprints:
            return np.zeros(2)
        nearest = min(footprints, key=lambda f: se.polygon_distance(p, f))
        gap = se.polygon_distance(p, nearest)
        if gap >= radius + DRAWER_MARGIN or gap <= 0.0:
            return np.zeros(2)
        eps = 1e-4  # the direction in which the gap grows fastest
        grad = np.array([se.polygon_distance(p + [eps, 0.0], nearest) - gap,
                         se.polygon_distance(p + [0.0, eps], nearest) - gap])
        return grad / max(float(np.linalg.norm(grad)), 1e-9) * min(radius + DRAWER_MARGIN - gap, SLIDE_OUT_MAX)

    def _phase_close(self, obs, eef):
        out = super()._phase_close(obs, eef)
        if self.phase == "lift":
            move = self._slide_out(obs)
            if np.any(move):
                self.slide_target = self.hold_point + np.r_[move, 0.003]
                self._enter("slide")
        return out

    def _phase_slide(self, obs, eef):
        """Slide the held object out from under an open drawer, then lift."""
        if np.linalg.norm(self.slide_target - eef) < 0.004 or self.phase_t > 25:
            self.hold_point = self.slide_target
            self._enter("lift")
        return self.slide_target, SLIDE_OUT_SPEED, 0.0, GRIPPER_CLOSE

    def _phase_approach(self, obs, eef):
        """As ScriptedExpert's, but going down to the grasp only once the hand points down
        again (after a drawer, it turns on its way to the grasp)."""
        phase_t = self.phase_t
        out = super()._phase_approach(obs, eef)
        if self.phase == "descend" and abs(self.ref_tilt) > TILT_DONE:
            self.phase, self.phase_t = "approach", phase_t  # line up again once the hand has turned
        return out

    # ------------------------------------------------------------------ orientation
    def _orientation_goal(self) -> Rotation:
        tilt = Rotation.from_rotvec(self.tilt_axis * self.ref_tilt)
        return tilt * Rotation.from_rotvec([0.0, 0.0, self.ref_yaw]) * self.ref_rotation

    def _rotation_feedforward(self) -> np.ndarray:
        return np.array([0.0, 0.0, self.ref_yaw_vel]) + self.tilt_axis * self.ref_tilt_vel

    def _motion(self, obs, eef, target, vmax, wobble) -> np.ndarray:
        s = self.style
        limit = TILT_SPEED * RADIANS_PER_ACTION
        desired = float(np.clip(s.approach_gain * (self.tilt_goal - self.ref_tilt), -limit, limit))
        self.ref_tilt_vel += float(np.clip(desired - self.ref_tilt_vel, -s.accel * RADIANS_PER_ACTION,
                                           s.accel * RADIANS_PER_ACTION))
        self.ref_tilt += self.ref_tilt_vel
        return super()._motion(obs, eef, target, vmax, wobble)

    def _reach_left(self, eef, limit: float = se.REACH_LIMIT) -> float:
        """As ScriptedExpert's, with the wrist where the tilted hand puts it (WRIST_ABOVE_EEF
        along the hand's axis, not straight above the EEF)."""
        shoulder = self._shoulder()
        if shoulder is None:
            return np.inf
        up = Rotation.from_rotvec(self.tilt_axis * self.ref_tilt).apply([0.0, 0.0, 1.0])
        wrist = np.asarray(eef, dtype=np.float64) + se.WRIST_ABOVE_EEF * up
        return limit - float(np.linalg.norm(wrist - shoulder))

    def _tilt_error(self, obs) -> float:
        """Angle (rad) between the hand's orientation and its final tilted goal."""
        tilt = Rotation.from_rotvec(self.tilt_axis * self.tilt_goal)
        goal = tilt * Rotation.from_rotvec([0.0, 0.0, self.grasp_yaw + self.style.yaw_offset]) * self.ref_rotation
        return float((goal * quat_xyzw_to_rotation(obs["robot0_eef_quat"]).inv()).magnitude())

    # ------------------------------------------------------------------ phases: start
    def _phase_wait(self, obs, eef):
        if self.phase_t >= self.style.start_delay:
            self._enter(self.start_phase)
        return eef, 0.0, 0.0, GRIPPER_OPEN

    def _phase_rise(self, obs, eef):
        """After a take-over: up to ``hold_point``, then the stage's first phase."""
        if (np.linalg.norm(self.hold_point - eef) < 0.02 and abs(self.ref_tilt) < 0.1) \
                or self.stall >= 3 * se.STALL_STEPS or self.phase_t > RISE_STEPS:
            self._enter(self.start_phase)
        return self.hold_point, self.style.speed, 0.0, GRIPPER_OPEN

    # ------------------------------------------------------------------ phases: open a drawer
    def _drawer(self, obs):
        """(handle centre [3], out direction [3] (horizontal, away from the cabinet), joint position)."""
        st = self.stage
        pos, rot = self._fixture_frame(obs, st.fixture)
        q = float(np.asarray(obs[f"{st.fixture}_qpos"])[DRAWER_JOINT[st.part]])
        x, y, z = DRAWER_HANDLE[st.part]
        handle = pos + rot.apply([x, y + q, z])
        out = rot.apply([0.0, -1.0, 0.0])
        out[2] = 0.0
        return handle, out / np.linalg.norm(out), q

    def _point_at(self, direction) -> None:
        """Tilt goal: the hand (pointing down at the start) turned to point along horizontal direction [3]."""
        axis = np.cross([0.0, 0.0, -1.0], direction)
        self.tilt_axis = axis / np.linalg.norm(axis)
        self.tilt_goal = np.pi / 2

    def _phase_handle_approach(self, obs, eef):
        handle, out, q = self._drawer(obs)
        if q < DRAWER_OPEN_QPOS or (q < DRAWER_ROOM_QPOS and self._drawer_receives_object()):  # already open
            self.hold_point = eef.copy()
            self._enter("handle_back")
            return eef, 0.0, 0.0, GRIPPER_OPEN
        self.grasp_yaw = 0.0
        self._point_at(-out)
        front = handle + out * HANDLE_STANDOFF
        dist = float(np.linalg.norm(front - eef))
        if dist < 0.015 and self._tilt_error(obs) < TILT_TOLERANCE:
            self._enter("handle_insert")
        # Stay above the handle's height until the hand is in front of it.
        ahead = float(np.dot(eef[:2] - handle[:2], out[:2]))
        target = front if ahead > HANDLE_STANDOFF * 0.6 else front + np.array([0.0, 0.0, 0.06])
        return target, self.style.speed, self._fade(dist), GRIPPER_OPEN

    def _phase_handle_insert(self, obs, eef):
        handle, out, _ = self._drawer(obs)
        grip = handle - out * HANDLE_DEPTH
        err = grip - eef
        if np.linalg.norm(err) < se.GRASP_TOLERANCE or (self.stall >= se.STALL_STEPS and self.phase_t > 5):
            self.grip_point = grip
            self._enter("handle_close")
        elif self.phase_t > se.DESCEND_TIMEOUT:
            self._enter("handle_back")
        return grip, self.style.speed * 0.6, 0.0, GRIPPER_OPEN

    def _phase_handle_close(self, obs, eef):
        if self.phase_t >= self.style.close_steps:
            self._enter("pull")
        handle, out, _ = self._drawer(obs)
        return handle - out * HANDLE_DEPTH, self.style.fine_speed, 0.0, GRIPPER_CLOSE

    def _phase_pull(self, obs, eef):
        handle, out, q = self._drawer(obs)
        # The handle moves with the drawer: aim the hand where the handle is when fully pulled.
        goal = handle - out * HANDLE_DEPTH + out * (q - DRAWER_PULL_TO)
        slipped = np.linalg.norm((handle - out * HANDLE_DEPTH) - eef) > 0.03
        if q <= DRAWER_PULL_TO + 0.003 or slipped or (self.stall >= se.STALL_STEPS * 2 and self.phase_t > 10):
            self.hold_point = eef.copy()
            self._enter("handle_release")
        return goal, PULL_SPEED, 0.0, GRIPPER_CLOSE

    def _phase_handle_release(self, obs, eef):
        if self.phase_t >= self.style.release_steps:
            self._enter("handle_back")
        return self.hold_point, self.style.fine_speed, 0.0, GRIPPER_OPEN

    def _phase_handle_back(self, obs, eef):
        """Back away from the handle, then point the hand down again. With the drawer open and
        a stage to follow, that stage starts as soon as the hand is clear of the handle: the hand
        turns down on its way and goes down to a grasp only then (_phase_approach). Waiting here
        for it took ~30 of the 300 steps of 'open the top drawer and put the bowl inside'."""
        handle, out, q = self._drawer(obs)
        if self.phase_t == 0:
            self.hold_point = eef + out * 0.06
        target = self.hold_point + (np.array([0.0, 0.0, 0.06]) if self.phase_t > HANDLE_BACK_STEPS else 0.0)
        if self.phase_t > HANDLE_BACK_STEPS:
            self.tilt_goal = 0.0
            if q < DRAWER_OPEN_QPOS and self.stage_index + 1 < len(self.stages):
                self._enter("idle")
                return target, self.style.speed, 0.0, GRIPPER_OPEN
        if self.phase_t > HANDLE_BACK_STEPS and abs(self.ref_tilt) < TILT_DONE and np.linalg.norm(target - eef) < 0.03:
            if q < DRAWER_OPEN_QPOS:
                self.hold_point = eef - np.array([0.0, 0.0, 0.08])
                self._enter("idle")
            else:
                self.tries += 1
                self._enter("handle_approach")
        return target, self.style.speed, 0.0, GRIPPER_OPEN

    def _drawer_receives_object(self) -> bool:
        """Whether the next stage puts an object into the drawer of the current stage."""
        st = self.stage
        nxt = self.stages[self.stage_index + 1] if self.stage_index + 1 < len(self.stages) else None
        return nxt is not None and nxt.kind == "pick" and nxt.target == f"{st.fixture}_{st.part}_region"

    # ------------------------------------------------------------------ phases: close a drawer
    def _close_point(self, obs, ahead: float) -> tuple:
        """(EEF position [3] with the leaning fingertips ``ahead`` m in front of the handle bar's
        front, at its height; the drawer's joint position). Also sets the hand's lean and yaw."""
        handle, out, q = self._drawer(obs)
        d = -out  # the push: into the cabinet
        tip = handle + out * (HANDLE_FRONT + ahead)
        axis = np.cross([0.0, 0.0, -1.0], d)
        self.tilt_axis, self.tilt_goal = axis / np.linalg.norm(axis), CLOSE_TILT
        self.grasp_yaw = se.finger_yaw(float(np.arctan2(d[1], d[0])) + np.pi / 2)  # fingers side by side
        pointing = d * np.sin(CLOSE_TILT) - np.array([0.0, 0.0, np.cos(CLOSE_TILT)])
        return tip - pointing * se.FINGERTIP_DEPTH, q

    def _phase_close_approach(self, obs, eef):
        start, q = self._close_point(obs, CLOSE_STANDOFF)
        if q > DRAWER_CLOSED_QPOS:
            self.hold_point = eef.copy()
            self._enter("idle")
            return eef, 0.0, 0.0, GRIPPER_CLOSE
        above = start + np.array([0.0, 0.0, self.style.approach_height])
        if np.linalg.norm(above - eef) < 0.015 and self._tilt_error(obs) < TILT_TOLERANCE:
            self._enter("close_descend")
        return above, self.style.speed, self._fade(np.linalg.norm(above - eef)), GRIPPER_CLOSE

    def _phase_close_descend(self, obs, eef):
        start, _ = self._close_point(obs, CLOSE_STANDOFF)
        if np.linalg.norm(start - eef) < se.GRASP_TOLERANCE or self.stall >= se.STALL_STEPS:
            self._enter("close_push")
        return start, self.style.fine_speed, 0.0, GRIPPER_CLOSE

    def _phase_close_push(self, obs, eef):
        """Push toward where the bar's front is once the drawer is in, past its stop."""
        _, out, q = self._drawer(obs)
        goal, _ = self._close_point(obs, -(DRAWER_CLOSE_TO - q))
        stalled = self.stall >= se.STALL_STEPS * 2 and self.phase_t > 15
        if q > DRAWER_CLOSED_QPOS or stalled or self.phase_t > 120:
            self.hold_point = eef + out * 0.05
            self._enter("close_retreat")
        return goal, CLOSE_SPEED, 0.0, GRIPPER_CLOSE

    def _phase_close_retreat(self, obs, eef):
        _, _, q = self._drawer(obs)
        target = self.hold_point + (np.array([0.0, 0.0, 0.06]) if self.phase_t > 6 else 0.0)
        if self.phase_t > 6:
            self.tilt_goal = 0.0
        if self.phase_t > 6 and abs(self.ref_tilt) < 0.05 and np.linalg.norm(target - eef) < 0.03:
            if q > DRAWER_CLOSED_QPOS:
                self.hold_point = eef - np.array([0.0, 0.0, 0.08])
                self._enter("idle")
            else:
                self.tries += 1
                self._enter("close_approach")
        return target, self.style.speed, 0.0, GRIPPER_CLOSE

    # ------------------------------------------------------------------ phases: turn the knob
    def _knob(self, obs):
        """(knob centre [3], ridge direction [2] in the world, knob angle)."""
        st = self.stage
        pos, rot = self._fixture_frame(obs, st.fixture)
        q = float(np.asarray(obs[f"{st.fixture}_qpos"])[0])
        ridge = Rotation.from_rotvec([0.0, 0.0, q]).apply(rot.apply([*KNOB_RIDGE_AXIS, 0.0]))
        return pos, ridge[:2] / np.linalg.norm(ridge[:2]), q

    def _phase_knob_approach(self, obs, eef):
        knob, ridge, q = self._knob(obs)
        if q >= KNOB_TURNED:
            self.hold_point = eef.copy()
            self._enter("idle")
            return eef, 0.0, 0.0, GRIPPER_OPEN
        # Fingers close across the ridge (fingers close along world y at yaw 0).
        self.grasp_yaw = se.finger_yaw(float(np.arctan2(ridge[1], ridge[0])) + np.pi / 2)
        grip = knob + np.array([0.0, 0.0, KNOB_GRIP_HEIGHT])
        above = grip + np.array([0.0, 0.0, self.style.approach_height])
        xy = float(np.linalg.norm(grip[:2] - eef[:2]))
        target = above if xy > 0.01 else grip
        if xy < 0.01:
            self._enter("knob_descend")
        return target, self.style.speed, self._fade(np.linalg.norm(above - eef)), GRIPPER_OPEN

    def _phase_knob_descend(self, obs, eef):
        knob, _, _ = self._knob(obs)
        grip = knob + np.array([0.0, 0.0, KNOB_GRIP_HEIGHT])
        if np.linalg.norm(grip - eef) < se.GRASP_TOLERANCE or self.stall >= se.STALL_STEPS:
            self.grip_point = eef.copy()
            self._enter("knob_close")
        return grip, self.style.fine_speed, 0.0, GRIPPER_OPEN

    def _phase_knob_close(self, obs, eef):
        if self.phase_t >= self.style.close_steps:
            self.turn_from = self.grasp_yaw
            self._enter("knob_turn")
        return self.grip_point, self.style.fine_speed, 0.0, GRIPPER_CLOSE

    def _phase_knob_turn(self, obs, eef):
        _, _, q = self._knob(obs)
        self.grasp_yaw = self.turn_from + KNOB_TURN
        turned = abs(self.ref_yaw - (self.grasp_yaw + self.style.yaw_offset)) < 0.05
        if q >= KNOB_TURNED or (turned and self.phase_t > 10) or self.phase_t > 60:
            self.hold_point = self.grip_point
            self._enter("knob_release")
        return self.grip_point, self.style.fine_speed, 0.0, GRIPPER_CLOSE

    def _phase_knob_release(self, obs, eef):
        if self.phase_t >= self.style.release_steps:
            self._enter("knob_lift")
        return self.hold_point, self.style.fine_speed, 0.0, GRIPPER_OPEN

    def _phase_knob_lift(self, obs, eef):
        _, _, q = self._knob(obs)
        target = self.hold_point + np.array([0.0, 0.0, 0.08])
        if eef[2] > target[2] - 0.02:
            if q >= KNOB_ON:
                self.hold_point = target - np.array([0.0, 0.0, 0.08])
                self._enter("idle")
            else:
                self.tries += 1
                self._enter("knob_approach")
        return target, self.style.speed, 0.0, GRIPPER_OPEN

    # ------------------------------------------------------------------ phases: the microwave
    def _mw(self, obs, local) -> np.ndarray:
        """World position [3] of ``local`` [3] in the frame of the stage's microwave."""
        pos, rot = self._fixture_frame(obs, self.stage.fixture)
        return pos + rot.apply(np.asarray(local, dtype=np.float64))

    def _mw_local(self, obs, world) -> np.ndarray:
        pos, rot = self._fixture_frame(obs, self.stage.fixture)
        return rot.inv().apply(np.asarray(world, dtype=np.float64) - pos)

    def _mug_handle(self, obs) -> tuple:
        """(the handle's grasped point [3], the hand's yaw for it, the handle's end [3] at the
        grasped height) of the stage's object, from its observed pose."""
        (px, py), axis_local, height, end = MICROWAVE_HANDLE_GRASPS[object_kind(self.obj)]
        rot = quat_xyzw_to_rotation(obs[f"{self.obj}_quat"])
        origin = self._obj_pos(obs)
        axis = rot.apply([*axis_local, 0.0])
        yaw = se.finger_yaw(float(np.arctan2(axis[1], axis[0])))
        return origin + rot.apply([px, py, height]), yaw, origin + rot.apply([end, py, height])

    def _mug_behind_door(self, obs) -> bool:
        """Whether the mug stands in the microwave with its handle's end behind the shut door's place."""
        _, _, end = self._mug_handle(obs)
        origin = self._mw_local(obs, self._obj_pos(obs))
        return bool(self._mw_local(obs, end)[1] > MICROWAVE_DOOR_INNER + MICROWAVE_DOOR_CLEAR
                    and origin[2] < MICROWAVE_FLOOR + 0.01 and origin[1] > MICROWAVE_ROOF_FRONT)

    def _mw_grasp_local(self) -> float:
        """EEF height above the mug's bottom while it hangs from the hand."""
        return MICROWAVE_HANDLE_GRASPS[object_kind(self.obj)][2]

    def _phase_mw_rise(self, obs, eef):
        """Straight up first: the hand starts over the open door's free end, and turning there
        swings the palm into the door."""
        self.grasp_yaw = self.ref_yaw - self.style.yaw_offset
        target = np.array([eef[0], eef[1], self._mw(obs, [0.0, 0.0, MICROWAVE_CLEAR_Z])[2]])
        if self.phase_t == 0:
            self.hold_point = target
        if np.linalg.norm(self.hold_point - eef) < 0.02 or self.phase_t > RISE_STEPS:
            self._enter("mw_over")
        return self.hold_point, self.style.speed, 0.0, GRIPPER_OPEN

    def _phase_mw_over(self, obs, eef):
        grip, yaw, _ = self._mug_handle(obs)
        self.grasp_yaw = yaw
        above = np.array([grip[0], grip[1], self._mw(obs, [0.0, 0.0, MICROWAVE_CLEAR_Z])[2]])
        if np.linalg.norm(above[:2] - eef[:2]) < 0.01 and abs(self.ref_yaw - yaw - self.style.yaw_offset) < 0.1:
            self._enter("mw_descend")
        return above, self.style.speed, self._fade(np.linalg.norm(above - eef)), GRIPPER_OPEN

    def _phase_mw_descend(self, obs, eef):
        grip, _, _ = self._mug_handle(obs)
        if np.linalg.norm(grip - eef) < se.GRASP_TOLERANCE or (self.stall >= se.STALL_STEPS and self.phase_t > 5):
            self.grip_point, self.lift_start = eef.copy(), (eef[2], self._obj_pos(obs)[2])
            self._enter("mw_grip")
        return grip, self.style.speed if eef[2] > grip[2] + 0.05 else self.style.fine_speed, 0.0, GRIPPER_OPEN

    def _phase_mw_grip(self, obs, eef):
        if self.phase_t >= self.style.close_steps:
            self._enter("mw_lift")
        return self.grip_point, self.style.fine_speed, 0.0, GRIPPER_CLOSE

    def _phase_mw_lift(self, obs, eef):
        target = np.array([self.grip_point[0], self.grip_point[1], self._mw(obs, [0.0, 0.0, MICROWAVE_CARRY_Z])[2]])
        if eef[2] - self.lift_start[0] > se.LIFT_CHECK_RISE and \
                self._obj_pos(obs)[2] - self.lift_start[1] < 0.5 * (eef[2] - self.lift_start[0]):
            self.tries += 1  # the handle slipped out: let go and take it again
            self.hold_point = eef.copy()
            self._enter("mw_drop")
        elif np.linalg.norm(target - eef) < 0.02:
            self._enter("mw_front")
        return target, self.style.speed, 0.0, GRIPPER_CLOSE

    def _phase_mw_drop(self, obs, eef):
        if self.phase_t >= self.style.release_steps:
            self._enter("mw_rise")
        return self.hold_point, self.style.fine_speed, 0.0, GRIPPER_OPEN

    def _phase_mw_front(self, obs, eef):
        target = self._mw(obs, [MICROWAVE_CAVITY_X, MICROWAVE_ENTRY_Y, MICROWAVE_CARRY_Z])
        if np.linalg.norm(target - eef) < 0.015:
            self._enter("mw_lower")
        return target, self.style.speed, self._fade(np.linalg.norm(target - eef)), GRIPPER_CLOSE

    def _mw_low(self) -> float:
        return MICROWAVE_FLOOR + MICROWAVE_LIFT_OFF + self._mw_grasp_local()

    def _phase_mw_lower(self, obs, eef):
        target = self._mw(obs, [MICROWAVE_CAVITY_X, MICROWAVE_ENTRY_Y, self._mw_low()])
        if np.linalg.norm(target - eef) < 0.01 or (self.stall >= se.STALL_STEPS and self.phase_t > 10):
            self._enter("mw_slide")
        return target, self.style.speed, 0.0, GRIPPER_CLOSE

    def _phase_mw_slide(self, obs, eef):
        y = MICROWAVE_ROOF_FRONT - se.HAND_HALF_WIDTH - MICROWAVE_SLIDE_GAP
        target = self._mw(obs, [MICROWAVE_CAVITY_X, y, self._mw_low()])
        if np.linalg.norm(target - eef) < 0.008 or (self.stall >= se.STALL_STEPS and self.phase_t > 10):
            self.hold_point = target - np.array([0.0, 0.0, MICROWAVE_LIFT_OFF])
            self._enter("mw_set")
        return target, self.style.fine_speed, 0.0, GRIPPER_CLOSE

    def _phase_mw_set(self, obs, eef):
        if np.linalg.norm(self.hold_point - eef) < 0.004 or self.phase_t > 8:
            self._enter("mw_release")
        return self.hold_point, self.style.fine_speed, 0.0, GRIPPER_CLOSE

    def _phase_mw_release(self, obs, eef):
        if self.phase_t >= self.style.release_steps:
            self._enter("mw_back")
        return self.hold_point, self.style.fine_speed, 0.0, GRIPPER_OPEN

    def _phase_mw_back(self, obs, eef):
        target = self._mw(obs, [MICROWAVE_CAVITY_X, MICROWAVE_BACK_Y, self._mw_low()])
        if np.linalg.norm(target - eef) < 0.015 or self.phase_t > 40:
            self.hold_point = eef.copy()
            self._enter("idle")
        return target, self.style.speed, 0.0, GRIPPER_OPEN

    def _phase_push_rise(self, obs, eef):
        """Up in front of the opening, the closed hand leaning toward the microwave."""
        _, rot = self._fixture_frame(obs, self.stage.fixture)
        into = rot.apply([0.0, 1.0, 0.0])
        axis = np.cross([0.0, 0.0, -1.0], into)
        self.tilt_axis, self.tilt_goal = axis / np.linalg.norm(axis), CLOSE_TILT
        local = self._mw_local(obs, eef)
        target = self._mw(obs, [MICROWAVE_CAVITY_X, min(local[1], MICROWAVE_PUSH_START_Y), MICROWAVE_CLEAR_Z - 0.06])
        if self.phase_t == 0:
            self.hold_point = target
        if np.linalg.norm(self.hold_point - eef) < 0.03 and self._tilt_error(obs) < TILT_TOLERANCE:
            self._enter("push_descend")
        return self.hold_point, self.style.speed, 0.0, GRIPPER_CLOSE

    def _phase_push_descend(self, obs, eef):
        target = self._mw(obs, [MICROWAVE_CAVITY_X, MICROWAVE_PUSH_START_Y, MICROWAVE_PUSH_Z])
        if np.linalg.norm(target - eef) < 0.015 or (self.stall >= se.STALL_STEPS and self.phase_t > 10):
            self._enter("push_in")
        return target, self.style.speed, 0.0, GRIPPER_CLOSE

    def _phase_push_in(self, obs, eef):
        target = self._mw(obs, [MICROWAVE_CAVITY_X, MICROWAVE_PUSH_TO, MICROWAVE_PUSH_Z])
        stalled = self.stall >= se.STALL_STEPS * 2 and self.phase_t > 15
        if np.linalg.norm(target - eef) < 0.008 or stalled or self.phase_t > 120:
            self._enter("push_out")
        return target, CLOSE_SPEED, 0.0, GRIPPER_CLOSE

    def _phase_push_out(self, obs, eef):
        target = self._mw(obs, [MICROWAVE_CAVITY_X, MICROWAVE_PUSH_START_Y, MICROWAVE_PUSH_Z])
        if np.linalg.norm(target - eef) < 0.015 or self.phase_t > 40:
            if self._mug_behind_door(obs) or self.tries >= MICROWAVE_TRIES:
                self._enter("push_up")
            else:
                self.tries += 1
                self._enter("push_in")
        return target, self.style.speed, 0.0, GRIPPER_CLOSE

    def _phase_push_up(self, obs, eef):
        self.tilt_goal = 0.0
        target = self._mw(obs, [MICROWAVE_CAVITY_X, MICROWAVE_PUSH_START_Y, MICROWAVE_CLEAR_Z])
        if np.linalg.norm(target - eef) < 0.03 and abs(self.ref_tilt) < TILT_DONE:
            self.hold_point = eef.copy()
            self._enter("idle")
        return target, self.style.speed, 0.0, GRIPPER_CLOSE

    def _door(self, obs):
        """((hinge [3], the door's direction from the hinge [3], its outer face's normal [3]), the
        door's joint position)."""
        q = float(np.asarray(obs[f"{self.stage.fixture}_qpos"])[0])
        return self._door_at(obs, q), q

    def _door_at(self, obs, angle: float) -> tuple:
        hinge = self._mw(obs, MICROWAVE_HINGE)
        _, rot = self._fixture_frame(obs, self.stage.fixture)
        along = rot.apply([np.cos(angle), np.sin(angle), 0.0])
        out = rot.apply([np.sin(angle), -np.cos(angle), 0.0])
        return hinge, along, out

    def _door_point(self, obs, angle: float, out_by: float) -> np.ndarray:
        """EEF position [3] pushing the door's outer face at ``angle``, ``out_by`` m from the hinge line;
        sets the hand's yaw (its long side along the door)."""
        hinge, along, out = self._door_at(obs, angle)
        _, rot = self._fixture_frame(obs, self.stage.fixture)
        self.grasp_yaw = angle + np.pi / 2 + float(rot.as_rotvec()[2])  # at angle -pi/2 the start's yaw
        return hinge + DOOR_PUSH_RADIUS * along + out_by * out - np.array([0.0, 0.0, DOOR_PUSH_DROP])

    def _phase_door_over(self, obs, eef):
        _, q = self._door(obs)
        if q > MICROWAVE_CLOSED_QPOS:
            self.hold_point = eef.copy()
            self._enter("idle")
            return eef, 0.0, 0.0, GRIPPER_CLOSE
        start = self._door_point(obs, q, DOOR_PUSH_OUT + DOOR_STANDOFF)
        above = np.array([start[0], start[1], self._mw(obs, [0.0, 0.0, MICROWAVE_CLEAR_Z])[2]])
        if np.linalg.norm(above - eef) < 0.02:
            self._enter("door_down")
        return above, self.style.speed, self._fade(np.linalg.norm(above - eef)), GRIPPER_CLOSE

    def _phase_door_down(self, obs, eef):
        _, q = self._door(obs)
        start = self._door_point(obs, q, DOOR_PUSH_OUT + DOOR_STANDOFF)
        if np.linalg.norm(start - eef) < 0.02 or (self.stall >= se.STALL_STEPS and self.phase_t > 10):
            self._enter("door_push")
        return start, self.style.speed, 0.0, GRIPPER_CLOSE

    def _phase_door_push(self, obs, eef):
        _, q = self._door(obs)
        goal = self._door_point(obs, min(q + DOOR_PUSH_LEAD, 0.0), DOOR_PUSH_OUT)
        stalled = self.stall >= se.STALL_STEPS * 2 and self.phase_t > 15
        if q <= MICROWAVE_CLOSED_QPOS and (stalled or self.phase_t > 150) and self.tries < MICROWAVE_TRIES:
            self.tries += 1
            self._enter("door_over")
        return goal, CLOSE_SPEED, 0.0, GRIPPER_CLOSE


class SuiteExpert:
    """The scripted expert of every supported suite: ``reset`` picks ScriptedExpert (pick and
    place: libero_spatial, libero_object) or TaskExpert (libero_goal, libero_10) for the task's suite;
    everything else is the chosen expert's."""

    def __init__(self, noise: float = 1.0):
        ScriptedExpert(noise)  # validates noise
        self.noise = float(noise)
        self.expert = None

    def reset(self, task, rng: np.random.Generator) -> None:
        if task.suite not in SUPPORTED_SUITES:
            raise ValueError(
                f"the scripted expert cannot solve suite {task.suite!r} (task {task.task_id}: "
                f"{task.instruction!r}); supported suites: {', '.join(SUPPORTED_SUITES)}"
            )
        cls = TaskExpert if task.suite in TASK_SUITES else ScriptedExpert
        if type(self.expert) is not cls:
            self.expert = cls(self.noise)
        self.expert.reset(task, rng)

    def act(self, obs: dict) -> np.ndarray:
        if self.expert is None:
            raise RuntimeError("SuiteExpert.act() called before reset(task, rng)")
        return self.expert.act(obs)

    def take_over(self, obs: dict, first_obs: dict) -> str:
        if self.expert is None:
            raise RuntimeError("SuiteExpert.take_over() called before reset(task, rng)")
        return self.expert.take_over(obs, first_obs)

    def __getattr__(self, name):
        expert = self.__dict__.get("expert")
        if expert is None:
            raise AttributeError(name)
        return getattr(expert, name)
