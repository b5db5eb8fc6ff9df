"""The demo file format: episodes in, episodes out, chunks and splits by episode.

Demo files are HDF5 in the robomimic / LIBERO layout, so one reader opens the files the toolkit
writes, LIBERO's official demos and robomimic or robosuite demos::

    data/                       attrs: suite, policy, source, created, toolkit version, ...
      demo_0/                   attrs: num_samples, task_suite, task_id, instruction, success,
                                       init_state_id, seed
        actions   (N, D) float  exactly what was sent to env.step
        obs/<key> (N, ...)      low-dim observations; images only if asked
        rewards, dones (N,)

``load_episodes`` also reads a local LeRobot dataset folder (``lerobot_format.py``). Nothing here
imports the simulator: training reads demos without it. Splits are by episode, never by chunk
(neighbouring chunks overlap and would leak).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import numpy as np

log = logging.getLogger(__name__)

# LIBERO ships 50 init states per task. Evaluation trials use the first 20 (trial i
# starts from init state i), so data collected for training starts from the other 30 and a
# policy or tokenizer is always tested on init states it never trained on.
NUM_INIT_STATES = 50
HELD_OUT_INIT_STATES = range(0, 20)
TRAIN_INIT_STATES = range(20, 50)

# LIBERO's settle steps hold this action (no motion, gripper open: -1 opens in LIBERO's
# convention), so it is what the robot "did" before an episode's first step (action history).
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)


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
    content_id: str = ""  # of the actions as read (``content_id``): the same episode in any file

    def __len__(self) -> int:
        return len(self.actions)


def content_id(actions: np.ndarray) -> str:
    """An episode's identity from its recorded actions alone (sha1 of the float32 array and its
    shape): two files that number their demos alike (every file's ``demo_0``) hold different
    episodes, and one episode copied into another file stays the same."""
    import hashlib

    a = np.ascontiguousarray(actions, dtype=np.float32)
    return hashlib.sha1(str(a.shape).encode() + a.tobytes()).hexdigest()


def episode_from(ep: Episode, start: int) -> Episode:
    """The part of ``ep`` from step ``start`` on: its observations, actions and labels."""
    if not 0 <= start < len(ep):
        raise ValueError(f"episode of {len(ep)} steps has no step {start}")
    return replace(ep, actions=ep.actions[start:], obs={k: v[start:] for k, v in ep.obs.items()},
                   expert_actions=None if ep.expert_actions is None else ep.expert_actions[start:])


# ----------------------------------------------------------------------------------------
# Demo files: HDF5 in the robomimic / LIBERO layout (data/demo_i/{actions, obs/<key>, ...})
# ----------------------------------------------------------------------------------------
FORMAT_VERSION = 1
TOOLKIT_VERSION = "0.1.0"


def partial_path(output: str) -> str:
    return output + ".partial"


PARTIAL_POLICIES = ("refuse", "resume", "overwrite")


class DemoWriter:
    """Writes episodes one by one to ``<output>.partial``; ``finish()`` renames it to ``output``.

    Nothing lost, nothing corrupt: each episode is written whole and flushed before the next
    one starts, so an interrupted run leaves ``<output>.partial`` holding only complete
    episodes (readable by ``load_episodes``), and ``output`` itself, including any file that
    was there before, is only ever replaced by a finished file.

    A ``.partial`` left by an earlier run is never truncated silently: ``partial="refuse"``
    (the default) stops with an error, ``"resume"`` appends to it (``existing`` lists the
    complete episodes already there; an episode cut short mid-write is dropped) and
    ``"overwrite"`` starts afresh.
    """

    def __init__(self, output: str, file_attrs: dict, partial: str = "refuse"):
        import h5py

        if partial not in PARTIAL_POLICIES:
            raise ValueError(f"partial must be one of {PARTIAL_POLICIES}, got {partial!r}")
        self.output = output
        self.tmp = partial_path(output)
        self.existing: list[dict] = []
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        if os.path.exists(self.tmp) and partial == "refuse":
            raise ValueError(f"{self.tmp} holds the episodes of an earlier, unfinished run: --resume "
                             "continues it, --overwrite discards it")
        if os.path.exists(self.tmp) and partial == "resume":
            self.file = h5py.File(self.tmp, "a")
            self.data = self.file["data"]
            self._check_resumable(file_attrs)
        else:
            self.file = h5py.File(self.tmp, "w")
            self.data = self.file.create_group("data")
            for k, v in file_attrs.items():
                self.data.attrs[k] = v
        self.count = len(self.existing)
        self.total = sum(int(a["num_samples"]) for a in self.existing)

    # what must match for an earlier run's episodes to be continued (not when it was created)
    RESUME_KEYS = ("suite", "policy", "noise", "perturb", "seed", "task_ids", "max_steps", "cameras",
                   "init_states", "takeover")

    def _check_resumable(self, file_attrs: dict) -> None:
        for k in self.RESUME_KEYS:
            if k not in file_attrs and k not in self.data.attrs:
                continue
            old, new = _decode_attr(self.data.attrs.get(k), None), file_attrs.get(k)
            if np.asarray(old).tolist() != np.asarray(new).tolist():
                self.file.close()
                raise ValueError(f"--resume: {self.tmp} was collected with {k}={old!r}, this run asks "
                                 f"for {new!r}; use the same settings, or --overwrite")
        for key in _demo_keys(self.data):
            g = self.data[key]
            if "actions" not in g or "dones" not in g or "num_samples" not in g.attrs:
                del self.data[key]  # written when the run was stopped: not a whole episode
                continue
            if key != f"demo_{len(self.existing)}":
                raise ValueError(f"--resume: {self.tmp} has a gap before {key}; use --overwrite")
            self.existing.append({k: _decode_attr(v, None) for k, v in g.attrs.items()})

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

    A folder is read as a LeRobot dataset (``lerobot_format.py``): its ``action`` column, its
    state columns as observations, episodes by ``episode_index``, task text as instruction.

    Raises DemoFileError naming the file (and demo) for a missing file, a file without
    ``data/demo_*/actions``, an empty demo, NaN/inf actions or observations, or an unexpected
    action dimension.
    """
    import h5py

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    episodes = []
    for path in paths:
        path = str(path)
        if os.path.isdir(path):
            episodes += _lerobot_episodes(path, action_dim)
            continue
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


def _lerobot_episodes(path: str, action_dim: int | None) -> list[Episode]:
    import lerobot_format

    if not lerobot_format.is_lerobot_dataset(path):
        raise DemoFileError(f"{path!r} is a folder but not a LeRobot dataset (no meta/info.json); "
                            "give an HDF5 demo file or a LeRobot dataset folder")
    episodes = []
    for e in lerobot_format.read_lerobot_dataset(path, only_success=False):
        if action_dim is not None and e["actions"].shape[1] != action_dim:
            raise DemoFileError(f"{path!r}: {e['key']} has actions of dimension {e['actions'].shape[1]}, "
                                f"expected {action_dim}")
        episodes.append(Episode(actions=e["actions"], obs=e["obs"], success=bool(e["success"]),
                                task_suite="lerobot", task_id=int(e["task_index"]), instruction=e["instruction"],
                                init_state_id=-1, seed=-1, source=path, key=e["key"],
                                content_id=content_id(e["actions"])))
    return episodes


def check_finite(values: np.ndarray, what: str) -> None:
    """Refuse NaN or inf, naming ``what`` and the first bad step: one bad value would make a
    normalizer, and then every weight trained through it, NaN."""
    bad = ~np.isfinite(values)
    if bad.any():
        raise DemoFileError(f"{what} holds NaN or inf (first at step {int(np.argwhere(bad)[0][0])})")


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
    if len(actions) == 0:
        raise DemoFileError(f"{path!r}: {key} has no steps (an empty demo)")
    check_finite(actions, f"{path!r}: {key}/actions")
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
                if len(obs[k]) != len(actions):
                    raise DemoFileError(f"{path!r}: {key}/obs/{k} has {len(obs[k])} steps, actions {len(actions)}")
                if np.issubdtype(obs[k].dtype, np.floating):
                    check_finite(obs[k], f"{path!r}: {key}/obs/{k}")
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
        content_id=content_id(actions),
    )


def episode_identity(ep: Episode) -> dict:
    """What a checkpoint records about an episode it used (provenance)."""
    return dict(source=os.path.abspath(ep.source) if ep.source else "", key=ep.key,
                task_suite=ep.task_suite, task_id=ep.task_id,
                init_state_id=ep.init_state_id, seed=ep.seed, content_id=ep.content_id)


def episode_key(episode_or_identity) -> tuple[str, str]:
    """(absolute source file, demo key) of an Episode or of its ``episode_identity``: how
    checkpoints and the episodes loaded now are matched."""
    e = episode_or_identity
    source, key = (e["source"], e["key"]) if isinstance(e, dict) else (e.source, e.key)
    return (os.path.abspath(source) if source else "", key)


# ----------------------------------------------------------------------------------------
# Chunks and splits
# ----------------------------------------------------------------------------------------

def validation_count(n: int, val_fraction: float) -> int:
    """Episodes held out for validation: the fraction, rounded, but at least one."""
    return max(1, int(round(val_fraction * n)))


def split_by_episode(episodes: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Split whole episodes (never chunks: neighbouring chunks overlap and would leak)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    n = len(episodes)
    n_val = validation_count(n, val_fraction)
    if n < 2 or n_val >= n:
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
    """Cut windows of ``chunk_size`` steps that lie inside whole demos (``Episode``s, or action
    arrays [N, D]).

    Returns [M, T, D] float32 (T = chunk_size). Episodes shorter than a chunk give none.
    """
    if chunk_size < 1 or stride < 1:
        raise ValueError(f"chunk_size and stride must be >= 1, got {chunk_size}, {stride}")
    episodes = [e if isinstance(e, Episode) else Episode(np.asarray(e), {}, True, "", -1, "", -1, -1)
                for e in episodes]
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
