"""Datasets for the token policies: (observation, instruction, target codes) per chunk.

Shared by the phase-2 and phase-3 scripts. A training chunk starts at every step of a demo (the
policy re-plans), lies inside the demo, and is paired with the observation at its first step;
its target codes come from the frozen phase-1 tokenizer. ``chunk_start_states`` gives the
observations a closed loop sees when it executes whole chunks (steps 0, T, 2T, ...), for the
offline benchmark and the stop model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from demos import HELD_OUT_INIT_STATES, SETTLE_ACTION, Episode, chunk_actions, episode_targets, load_episodes

log = logging.getLogger(__name__)

# An action this many half-ranges (q01..q99 of the tokenizer's training data) away from the centre
# is not a robot action but a corrupt value: its codes would be garbage and its error inf.
EXTREME_NORMALIZED_ACTION = 1e3


# The observation key of the fixtures' state: per fixture (sorted by name) its position and, if it has
# joints, their positions (a drawer's opening, the stove's knob, a door). LIBERO's "object-state" holds
# only the movable objects; collect_actions.py records the fixtures' keys in FIXTURE_OBS_SUITES.
FIXTURE_STATE = "fixture-state"


def fixture_names(obs: dict) -> list[str]:
    """The fixtures in an observation recorded by collect_actions.py: names with a ``_pos`` and a
    ``_quat`` but no ``_to_robot0_eef_pos`` (that is a movable object), the robot excluded."""
    return sorted(k[:-len("_quat")] for k in obs
                  if k.endswith("_quat") and not k.startswith("robot0_") and not k.endswith("_to_robot0_eef_quat")
                  and f"{k[:-len('_quat')]}_pos" in obs and f"{k[:-len('_quat')]}_to_robot0_eef_pos" not in obs)


def fixture_state(obs: dict) -> np.ndarray | None:
    """``FIXTURE_STATE`` of an episode's obs [N, ...] -> [N, F] (or of one step's obs -> [F]); None
    for a scene without fixtures (half of libero_10's) or an observation recorded without them."""
    parts = [np.asarray(obs[f"{n}{suffix}"], dtype=np.float32) for n in fixture_names(obs)
             for suffix in ("_pos", "_qpos") if f"{n}{suffix}" in obs]
    return np.concatenate(parts, -1) if parts else None


def _key_values(obs: dict, key: str) -> np.ndarray | None:
    return np.asarray(obs[key], dtype=np.float32) if key in obs else fixture_state(obs)


def obs_vector(obs: dict, keys, step: int | slice | None = None, widths=()) -> np.ndarray:
    """Concatenate low-dim observation keys: an episode's obs [N, ...] -> [N, obs_dim] (or one
    step's obs dict -> [obs_dim]). ``FIXTURE_STATE`` is built from the fixtures' keys unless it is
    recorded. With ``widths`` (one per key, ``obs_widths``) each key's values are zero-padded to its
    width, so that scenes with fewer objects or fixtures give vectors of one size. Raises naming the
    missing key or a key wider than its width."""
    missing = [k for k in keys if k not in obs and k != FIXTURE_STATE]
    if missing:
        raise KeyError(f"observation keys {missing} are missing (have: {sorted(obs)[:12]}...)")
    parts = [_key_values(obs, k) for k in keys]
    if step is not None:
        parts = [None if p is None else p[step] for p in parts]
    if any(p is None for p in parts):  # no fixtures: no values (zero-padded to the key's width below)
        ref = next((p for p in parts if p is not None), None)
        if ref is None:
            raise KeyError(f"observation keys {list(keys)}: {FIXTURE_STATE!r} alone, and the observation has no "
                           "fixtures; give it with another key")
        lead = ref.shape[:-1] if ref.ndim > 1 else ()
        parts = [np.zeros((*lead, 0), np.float32) if p is None else p for p in parts]
    if widths:
        parts = [_pad_last(p, w, k) for p, w, k in zip(parts, widths, keys)]
    lead = parts[0].shape[:-1] if parts[0].ndim > 1 else ()
    return np.concatenate([p.reshape(*lead, -1) if lead else p.reshape(-1) for p in parts], -1)


def _pad_last(x: np.ndarray, width: int, key: str) -> np.ndarray:
    if x.shape[-1] > width:
        raise ValueError(f"observation key {key!r} has {x.shape[-1]} values, more than the {width} the policy "
                         "was trained on (a scene with more objects or fixtures than any in its training data)")
    return np.concatenate([x, np.zeros((*x.shape[:-1], width - x.shape[-1]), np.float32)], -1)


def obs_widths(episodes, keys) -> tuple[int, ...]:
    """Per key, the most values any episode's observation has: the widths ``obs_vector`` pads to
    (the suites whose tasks play in different scenes, e.g. libero_10, differ in object count). A key
    without a value in any episode (``FIXTURE_STATE`` where no scene has fixtures) is an error."""
    widths = []
    for k in keys:
        parts = [_key_values(ep.obs, k) for ep in episodes]
        w = max((p.shape[-1] for p in parts if p is not None), default=0)
        if w == 0:
            raise ValueError(f"observation key {k!r} has no values in any episode (a {FIXTURE_STATE!r} of data "
                             "recorded without fixtures: collect_actions.py records them for libero_goal, "
                             "libero_10 and libero_90)")
        widths.append(int(w))
    return tuple(widths)


def action_history(actions: np.ndarray, h: int) -> np.ndarray:
    """The ``h`` actions executed before each step, oldest first: [N, D] -> [N, h * D].

    Before the first step the robot was settling with ``SETTLE_ACTION`` (no motion, gripper
    open), so that is what the history holds there."""
    actions = np.asarray(actions, dtype=np.float32)
    n, d = actions.shape
    pad = np.broadcast_to(np.asarray(SETTLE_ACTION, np.float32), (h, d))
    padded = np.concatenate([pad, actions])
    return np.concatenate([padded[j:j + n] for j in range(h)], axis=1) if h else np.zeros((n, 0), np.float32)


class ActionHistory:
    """The last ``h`` executed actions of a rollout, as ``action_history`` builds them for training."""

    def __init__(self, h: int, action_dim: int = 7):
        self.h, self.d = h, action_dim
        self.reset()

    def reset(self) -> None:
        self.buffer = np.broadcast_to(np.asarray(SETTLE_ACTION, np.float32), (self.h, self.d)).copy()

    def push(self, actions: np.ndarray) -> None:
        """actions: [n, D] executed (in order) since the last push."""
        if self.h:
            self.buffer = np.concatenate([self.buffer, np.asarray(actions, np.float32)])[-self.h:]

    def vector(self) -> np.ndarray:
        return self.buffer.reshape(-1)


@dataclass
class ChunkDataset:
    """obs [M, obs_dim] float32, task [M] long, codes [M, T', L] long (the policy's L layers),
    actions [M, T, D] raw."""

    obs: torch.Tensor
    task: torch.Tensor
    codes: torch.Tensor
    actions: torch.Tensor

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    def to(self, device) -> "ChunkDataset":
        return ChunkDataset(*(t.to(device) for t in (self.obs, self.task, self.codes, self.actions)))


def instruction_vocab(episodes: list[Episode]) -> tuple[str, ...]:
    return tuple(sorted({e.instruction for e in episodes}))


def build_dataset(episodes: list[Episode], tokenizer, obs_keys, instructions,
                  batch_size: int = 4096, targets: str = "actions", history: int = 0,
                  num_layers: int | None = None, widths=()) -> ChunkDataset:
    """Cut every in-demo chunk of the ``targets`` sequence (see ``episode_targets``), encode it
    with the tokenizer, keep its codes' first ``num_layers`` layers (the policy's; None: all),
    pair it with its first observation and, with ``history`` > 0, the ``history`` actions
    executed just before it (``action_history``; obs_dim grows by history * D); ``widths``: see
    ``obs_vector``."""
    T = tokenizer.config.chunk_size
    index = {s: i for i, s in enumerate(instructions)}
    obs, task, actions = [], [], []
    for ep in episodes:
        n = len(ep.actions) - T + 1
        if n <= 0:
            continue
        if ep.instruction not in index:
            raise ValueError(f"instruction {ep.instruction!r} of {ep.source}:{ep.key} is not in "
                             f"the policy's instruction vocabulary")
        try:
            ob = obs_vector(ep.obs, obs_keys, widths=widths)
        except ValueError as exc:
            raise ValueError(f"{ep.source}:{ep.key}: {exc}") from None
        if history:
            ob = np.concatenate([ob, action_history(ep.actions, history)], axis=1)
        obs.append(ob[:n])
        task.append(np.full(n, index[ep.instruction]))
        seq = episode_targets(ep, targets)
        actions.append(chunk_actions([replace(ep, actions=seq)], T, 1))
    if not obs:
        raise ValueError(f"no episode is longer than the chunk size {T}")
    actions_t = torch.from_numpy(np.concatenate(actions))
    check_action_range(tokenizer, episodes, targets)
    with torch.no_grad():
        codes = torch.cat([tokenizer.encode(actions_t[i:i + batch_size])[..., :num_layers]
                           for i in range(0, len(actions_t), batch_size)])
    return ChunkDataset(torch.from_numpy(np.concatenate(obs)), torch.from_numpy(np.concatenate(task)).long(),
                        codes, actions_t)


def check_action_range(tokenizer, episodes: list[Episode], targets: str = "actions") -> None:
    """Refuse an episode with an action far outside the range the tokenizer was fit on, naming it."""
    for ep in episodes:
        seq = torch.as_tensor(episode_targets(ep, targets), dtype=torch.float32)
        worst = tokenizer.normalize(seq).abs().amax(-1)
        if bool((worst > EXTREME_NORMALIZED_ACTION).any()):
            step = int(torch.nonzero(worst > EXTREME_NORMALIZED_ACTION)[0])
            raise ValueError(f"{ep.source}:{ep.key} step {step}: action {seq[step].tolist()} is far outside the "
                             "tokenizer's range (a corrupt value?)")


WARMUP_FRACTION = 0.05  # of a training run's steps, the one-cycle schedule's warm-up


def one_cycle(opt, lr: float, total_steps: int):
    """The training scripts' learning-rate schedule: warm-up over 5% of the steps, then cosine
    decay (one-cycle). A run so short that 5% is one step or less warms up over two steps (the
    schedule needs them); below four steps the rate stays constant."""
    if total_steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    pct = WARMUP_FRACTION if WARMUP_FRACTION * total_steps > 1 else 2.0 / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total_steps, pct_start=pct)


def optimizer_step(opt, sched, loss: torch.Tensor, what: str, epoch: int) -> None:
    """One step of a training loop: refuse a loss that is not finite (naming ``what`` was trained
    and the epoch), then backward, the optimizer's step and the schedule's."""
    if not torch.isfinite(loss):
        raise ValueError(f"{what} training diverged at epoch {epoch} (loss {float(loss)}); lower --lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def batches(n: int, batch_size: int, gen: torch.Generator | None = None, shuffle: bool = True):
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def chunk_start_states(episodes: list, keys, history: int, chunk_size: int,
                       widths=()) -> tuple[np.ndarray, list[str]]:
    """The observation vector (with the executed-action history) at steps 0, T, 2T, ... of
    every episode: [M, obs_dim], and each state's instruction."""
    obs, instructions = [], []
    for ep in episodes:
        x = obs_vector(ep.obs, keys, widths=widths)
        if history:
            x = np.concatenate([x, action_history(ep.actions, history)], 1)
        steps = np.arange(0, len(ep), chunk_size)
        obs.append(x[steps])
        instructions += [ep.instruction] * len(steps)
    return np.concatenate(obs).astype(np.float32), instructions


def policy_states(policy_config, chunk_size: int, episodes: list, source) -> tuple[np.ndarray, np.ndarray]:
    """The chunk-start observations of ``episodes`` as the policy reads them [M, obs_dim], and
    each one's task index [M]; episodes of an instruction the policy was not trained on, or
    observations of another size, are an error naming ``source``."""
    pc = policy_config
    obs, instructions = chunk_start_states(episodes, pc.obs_keys, pc.action_history, chunk_size, pc.obs_widths)
    unknown = sorted(set(instructions) - set(pc.instructions))
    if unknown:
        raise ValueError(f"{source}: the policy was not trained on the instruction(s) {unknown}")
    if obs.shape[1] != pc.obs_dim:
        raise ValueError(f"{source}: observation vectors have {obs.shape[1]} values, the policy expects {pc.obs_dim}")
    return obs, np.array([pc.instructions.index(i) for i in instructions])


def training_rollouts(files, action_dim: int) -> list:
    """The main policy's rollouts in ``files`` (failed ones too: they are states the policy
    reaches), refusing any that started from a held-out init state: the evaluation starts there."""
    eps = load_episodes(files, action_dim=action_dim, only_success=False)
    held = [e for e in eps if e.init_state_id in HELD_OUT_INIT_STATES]
    if held:
        e = held[0]
        raise ValueError(f"{e.source}: {len(held)} rollout(s) (e.g. {e.key}) start from held-out init "
                         f"state {e.init_state_id} ({HELD_OUT_INIT_STATES.start}.."
                         f"{HELD_OUT_INIT_STATES.stop - 1}), where the evaluation starts; record "
                         f"rollouts with collect_actions.py --policy token --init_states train")
    return eps
