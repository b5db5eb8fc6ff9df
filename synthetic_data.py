"""Synthetic smooth action episodes, for self-checks, tests and benchmarks without a simulator."""

from __future__ import annotations

import numpy as np


def synthetic_episodes(num_episodes: int, seed: int = 0, action_dim: int = 7,
                       noise: float = 0.002) -> list[np.ndarray]:
    """Smooth pick-and-place-like action sequences for self-checks and tests, no simulator.

    Like one task of a scripted expert: in each episode [N, action_dim] (N ~ 100-150) a clipped
    proportional controller with its own gain moves the end effector (dims 0-2, in [-1, 1])
    through approach / grasp / lift / carry / release, towards targets that vary by a few cm
    between episodes; the middle dims turn towards a new random orientation in each phase;
    the last dim is a binary gripper (-1 open, +1 closed) switching between phases.
    Gaussian noise of std ``noise`` is added to all but the gripper.
    """
    if action_dim < 4:
        raise ValueError(f"synthetic actions need action_dim >= 4 (xyz + gripper), got {action_dim}")
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(num_episodes):
        pos, rot = np.zeros(3), np.zeros(action_dim - 4)

        def near(centre, spread=0.06):  # one task: object positions vary by a few cm
            return np.asarray(centre) + rng.uniform(-spread, spread, 3)

        phases = [  # (target position, gripper, steps to hold still)
            (near([0.2, -0.15, -0.2]), -1.0, 0),
            (None, 1.0, int(rng.integers(8, 12))),
            (near([0.2, -0.15, 0.0]), 1.0, 0),
            (near([-0.1, 0.2, 0.0]), 1.0, 0),
            (None, -1.0, int(rng.integers(6, 10))),
        ]
        gain = rng.uniform(6, 10)
        actions = []
        for target, grip, hold in phases:
            rot_target = rng.uniform(-0.3, 0.3, rot.shape)
            for steps in range(1, 81):
                step = np.zeros(action_dim)
                if target is not None:
                    step[:3] = np.clip(gain * (target - pos), -1, 1)
                    pos = pos + step[:3] * 0.012  # ~1.2 cm per unit action (OSC_POSE)
                step[3:-1] = np.clip(2 * (rot_target - rot), -0.5, 0.5)
                rot = rot + step[3:-1] * 0.15
                step[-1] = grip
                actions.append(step)
                if (np.abs(target - pos).max() < 0.01) if target is not None else steps >= hold:
                    break
        a = np.asarray(actions, dtype=np.float32)
        a[:, :-1] += rng.normal(0, noise, a[:, :-1].shape).astype(np.float32)
        episodes.append(a)
    return episodes

