"""What the policy, closed-loop and decoding tests share: a synthetic demo file, a tiny tokenizer,
a policy and a draft trained on them (module-scoped fixtures), rollout files, a fake env.

Test modules import the fixtures by name, with those they depend on (``from policy_fixtures
import draft, trained, workdir``: pytest looks a fixture's own fixtures up in the test's module);
each importing module trains its own copy once.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import collect_actions as ca
import demos
import train_draft
import train_policy
from rsd_engine_core import EngineConfig, RSDEngine
from rvq_tokenizer import RVQConfig, RVQTokenizer, save_tokenizer
from synthetic_data import synthetic_episodes

INSTRUCTIONS = ("put the bowl on the plate", "put the bowl on the stove")


def synthetic_demo_file(path, n_episodes=12, seed=0, instructions=INSTRUCTIONS, obs_dims=(8, 6)):
    """Episodes whose actions follow their observations, so a policy can learn them."""
    rng = np.random.default_rng(seed)
    w = demos.DemoWriter(str(path), {"suite": "libero_spatial"})
    for i, actions in enumerate(synthetic_episodes(n_episodes, seed=seed)):
        n = len(actions)
        # proprio: the cumulative motion so far (a state the actions depend on) + phase clock
        proprio = np.concatenate([np.cumsum(actions, 0), np.linspace(0, 1, n)[:, None]], 1)
        proprio = np.pad(proprio, ((0, 0), (0, obs_dims[0] - 8)))
        objects = np.repeat(rng.normal(size=(1, obs_dims[1])), n, 0)
        ep = demos.Episode(actions=actions, obs={"robot0_proprio-state": proprio, "object-state": objects},
                           success=True, task_suite="libero_spatial", task_id=i % len(instructions),
                           instruction=instructions[i % len(instructions)], init_state_id=20 + i, seed=i)
        w.add(ep)
    return w.finish()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """(folder, demo file): 12 synthetic demos of two instructions and a 3-layer tokenizer tok.pt."""
    d = tmp_path_factory.mktemp("policy")
    path = synthetic_demo_file(d / "demos.hdf5")
    torch.manual_seed(0)
    tok = RVQTokenizer(RVQConfig(chunk_size=10, latent_steps=2, num_layers=3, codebook_size=16,
                                 hidden_dim=32))
    chunks = demos.chunk_actions(demos.load_episodes(path), 10)
    tok.normalizer.fit(torch.from_numpy(chunks).reshape(-1, 7))
    tok.init_codebooks(torch.from_numpy(chunks))
    save_tokenizer(tok.eval(), str(d / "tok.pt"), {"test": True})
    return d, path


def policy_args(d, demo_file, **over) -> train_policy.PolicyArgs:
    """train_policy's settings for the tiny policy; ``over`` replaces fields (checked again)."""
    args = train_policy.build_parser().parse_args([
        "--data", str(demo_file), "--tokenizer", str(d / "tok.pt"), "--output", str(d / "policy.pt"),
        "--json", str(d / "policy.json"), "--epochs", "25", "--d_model", "32", "--n_blocks", "2",
        "--n_heads", "2", "--obs_tokens", "2", "--batch_size", "64", "--val_fraction", "0.2",
        "--threads", "1", "--dropout", "0.0"])
    if isinstance(over.get("data"), str):
        over["data"] = [over["data"]]
    return dataclasses.replace(args, **over)


@pytest.fixture(scope="module")
def trained(workdir):
    """(folder, demo file, train_policy's result): the policy policy.pt (3 layers of 16 codes,
    observations of 8 + 6 values, INSTRUCTIONS)."""
    d, path = workdir
    result = train_policy.main(policy_args(d, path))
    return d, path, result


def draft_args(policy, output, *flags) -> train_draft.DraftArgs:
    return train_draft.build_parser().parse_args(["--policy", str(policy), "--output", str(output), *flags])


@pytest.fixture(scope="module")
def draft(trained):
    """A one-pass draft of policy.pt proposing all its 3 layers (k = 3), from its embedding."""
    d, _, _ = trained
    path = d / "draft_k3.pt"
    train_draft.main(draft_args(d / "policy.pt", path, "--k", "3", "--epochs", "3", "--hidden", "32",
                                "--threads", "1", "--source", "embedding"))
    return path


def rollout_file(path, policy, tok, init_states, n=10):
    """Episodes of the main policy itself (its greedy actions executed in a synthetic state)."""
    rng = np.random.default_rng(5)
    engine = RSDEngine(policy, tok)
    w = demos.DemoWriter(str(path), {"suite": "libero_spatial"})
    for i in range(n):
        obs = rng.normal(size=(24, policy.config.obs_dim)).astype(np.float32)
        actions = np.concatenate([engine.act(o, i % 2, EngineConfig("dense"))[0][:1] for o in obs])
        ep = demos.Episode(actions=actions.astype(np.float32),
                           obs={"robot0_proprio-state": obs[:, :8], "object-state": obs[:, 8:]},
                           success=bool(i % 2), task_suite="libero_spatial", task_id=i % 2,
                           instruction=INSTRUCTIONS[i % 2], init_state_id=init_states[i % len(init_states)],
                           seed=100 + i)
        w.add(ep)
    return w.finish()


class FakeEnv:
    """Just enough of LiberoEnv for run_episode: succeeds after 12 steps; obs have the keys
    (the proprio state's values are all 0.1 x the step)."""

    def __init__(self, obs_dims=(7, 6)):
        self.task = ca.TaskInfo("libero_spatial", 0, "t", INSTRUCTIONS[0], "", 40)
        self.dims = obs_dims
        self.t = 0

    def _obs(self):
        return {"robot0_proprio-state": np.full(self.dims[0], self.t * 0.1, np.float32),
                "object-state": np.zeros(self.dims[1], np.float32)}

    def reset(self, init_state_id, scene_seed=None):
        self.t = 0
        return self._obs()

    def step(self, action):
        self.t += 1
        return self._obs(), self.t >= 12

    def close(self):
        pass
