"""Phase 3: learn adaptive depth's stop rule from the main policy's own decoding.

    python train_stop.py --policy policy.pt --rollouts rollouts.hdf5 --output stop.pt --json stop.json

Adaptive depth stops adding layers once it judges that the rest would not change the actions
much. The ``expected_norm`` rule judges by the expected size of the layer just decoded, a
latent-space quantity; ``bench_decoding.py --stop_study`` shows it does little better than a
fixed depth. This script fits a small ``StopModel`` that predicts the quantity itself: the
action gap of stopping after a layer, the max abs difference (normalized action units) between
the actions of the layers so far and those of all L, from what the engine knows at that point
(``rsd_engine_core.LearnedStop``: the latent the kept codes sum to, and which layer it is).

Its data are the chunk-start states of the main policy's own rollouts on training init states
(``collect_actions.py --policy token --init_states train``; rollouts from the held-out init
states, where the evaluation starts, are refused), each decoded densely once: every layer gives one
example, its features and the log of its gap. Episodes are split into training and validation;
the validation episodes' states report the model's error and a stop study (the learned rule at
several thresholds against the ``expected_norm`` rule and fixed depths, as mean layers kept and
the action gap left). ``eval_libero.py --stop_model stop.pt`` and ``bench_decoding.py
--stop_model stop.pt`` use it; ``--adaptive_threshold`` is then the predicted action gap.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import cli
import policy_models as pm
from cli import arg
from demos import episode_identity, split_by_episode
from fileio import check_outputs
from policy_data import batches, one_cycle, policy_states, training_rollouts
from rsd_engine_core import LearnedStop, RSDEngine, build_engine
from stop_study import print_stop_rules, study_rows

log = logging.getLogger("train_stop")


@dataclass
class StopArgs(cli.OptimArgs):
    policy: str = arg(None, "main policy checkpoint (variant ar)", required=True, metavar="PATH")
    rollouts: list[str] = arg(None, "the main policy's own rollouts on training init states "
                                    "(collect_actions.py --policy token --init_states train)",
                              factory=list, required=True, nargs="+", metavar="FILE")
    tokenizer: str | None = arg(None, "tokenizer checkpoint (default: the one recorded in the policy, "
                                      "hash-checked)", metavar="PATH")
    val_fraction: float = arg(0.1, "episodes held out for validation")
    min_layers: int = arg(2, "as eval_libero.py's, for the validation study")
    thresholds: list[float] = arg(None, "comma list of predicted action gaps for the validation study",
                                  factory=lambda: [0.05, 0.1, 0.15, 0.2], type=cli.float_list)
    expected_norm_thresholds: list[float] = arg(None, "comma list of the expected_norm rule's thresholds "
                                                      "for the validation study",
                                                factory=lambda: [0.07, 0.1], type=cli.float_list)
    hidden: int = arg(64, "hidden width of the stop model")
    batch_size: int = arg(512, "examples per optimisation step")
    lr: float = arg(3e-3, "peak learning rate")
    output: str = cli.output_arg("stop.pt", "the stop model checkpoint")
    json: str | None = cli.json_arg()

    def __post_init__(self):
        self.check_optim()
        cli.require(self.hidden >= 1, f"--hidden must be >= 1, got {self.hidden}")
        cli.require(0 < self.val_fraction < 1, f"--val_fraction must be in (0, 1), got {self.val_fraction}")
        cli.require(self.min_layers >= 1, f"--min_layers must be >= 1, got {self.min_layers}")


@torch.no_grad()
def examples(engine: RSDEngine, episodes: list, desc: str) -> dict:
    """Dense decoding of every chunk-start state of ``episodes``: the stop model's inputs
    [M * (L-1), in_dim] for stopping after layers 1..L-1 (after the last there is nothing left),
    the gaps [M, L], and the expected_norm signals [M, L]."""
    obs, tasks = policy_states(engine.policy.config, engine.tokenizer.config.chunk_size, episodes,
                               sorted({e.source for e in episodes}))
    L = engine.policy.config.num_layers
    x, gaps, signals = [], [], []
    for o, task in cli.progress(list(zip(obs, tasks)), desc=desc, unit="state"):
        logits, codes, gap = engine.dense_trace(o, int(task))
        stop = LearnedStop(engine)
        x += [stop.features(l, codes[..., l]) for l in range(L - 1)]
        gaps.append(gap)
        signals.append(engine.expected_refinements(logits, codes))
    return {"x": torch.cat(x), "gap": np.array(gaps), "signal": np.array(signals)}


def targets(model_eps: float, gap: np.ndarray) -> torch.Tensor:
    """log(gap + eps) of stopping after layers 1..L-1, in the order of ``examples``' inputs."""
    return torch.as_tensor(np.log(gap[:, :-1] + model_eps).reshape(-1), dtype=torch.float32)


def fit(train: dict, val: dict, args, num_layers: int) -> tuple[pm.StopModel, list[dict]]:
    config = pm.StopConfig(in_dim=train["x"].shape[1], num_layers=num_layers, hidden=args.hidden)
    torch.manual_seed(args.seed)
    model = pm.StopModel(config).to(train["x"].device)
    model.mean.copy_(train["x"].mean(0))
    std = train["x"].std(0)
    model.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # constant features: left as they are
    y_train, y_val = (targets(config.gap_eps, d["gap"]).to(train["x"].device) for d in (train, val))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    n = len(y_train)
    sched = one_cycle(opt, args.lr, args.epochs * math.ceil(n / args.batch_size))
    gen = torch.Generator().manual_seed(args.seed)
    best, history = None, []
    for epoch in cli.progress(range(1, args.epochs + 1), desc="stop model", unit="epoch"):
        model.train()
        total = 0.0
        for idx in batches(n, args.batch_size, gen):
            loss = ((model(train["x"][idx]) - y_train[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            val_mse = float(((model(val["x"]) - y_val) ** 2).mean())
        if not math.isfinite(val_mse) or not math.isfinite(total):
            raise ValueError(f"training diverged at epoch {epoch} (validation MSE {val_mse}); lower --lr")
        history.append({"epoch": epoch, "train_mse": total / n, "val_mse": val_mse})
        if best is None or val_mse < best["val_mse"]:
            best = {**history[-1], "state": {k: v.clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(best.pop("state"))
    return model.eval(), history


def study(model: pm.StopModel, val: dict, args: StopArgs) -> list[dict]:
    """On the validation states: layers kept and action gap left by the learned rule, the
    expected_norm rule and every fixed depth (as ``bench_decoding.py --stop_study``)."""
    gaps = val["gap"]
    M, L = gaps.shape
    with torch.no_grad():  # log(gap + eps), compared as the engine compares it
        predicted = model(val["x"]).cpu().numpy().reshape(M, L - 1)
    predicted = np.concatenate([predicted, np.full((M, 1), -np.inf)], 1)  # after the last layer: done
    return study_rows(gaps, val["signal"], predicted, model.config.gap_eps, args.expected_norm_thresholds,
                      args.thresholds, [], args.min_layers)


def build_parser() -> cli.ArgsParser:
    return cli.ArgsParser(StopArgs, "Train adaptive depth's learned stop rule on the main policy's own rollouts (phase 3).")

def main(args: StopArgs) -> dict:
    cli.start(args, log)
    check_outputs({"--output": args.output, "--json": args.json},
                  {"--policy": args.policy, "--rollouts": args.rollouts, "--tokenizer": args.tokenizer})
    torch.set_num_threads(args.threads)
    engine = build_engine(args.policy, tokenizer=args.tokenizer, device=args.device)
    policy, tokenizer = engine.policy, engine.tokenizer
    if policy.config.num_layers < 2:
        raise ValueError(f"{args.policy} has one layer: there is no depth to choose")
    if args.min_layers > policy.config.num_layers:
        raise ValueError(f"--min_layers {args.min_layers} exceeds the policy's {policy.config.num_layers} layers")
    tok_path = args.tokenizer or pm.load_policy(args.policy)[1]["provenance"]["tokenizer"]
    episodes = training_rollouts(args.rollouts, tokenizer.config.action_dim)
    train_eps, val_eps = split_by_episode(episodes, args.val_fraction, seed=args.seed)
    t0 = time.perf_counter()
    train, val = examples(engine, train_eps, "train states"), examples(engine, val_eps, "validation states")
    L = policy.config.num_layers
    log.info("%d train and %d validation states (%d and %d episodes)", len(train["gap"]), len(val["gap"]),
             len(train_eps), len(val_eps))
    model, history = fit(train, val, args, L)
    best = min(history, key=lambda h: h["val_mse"])
    y_val = targets(model.config.gap_eps, val["gap"])
    rules = study(model, val, args)
    provenance = {"args": cli.settings_dict(args), "seed": args.seed, "policy": os.path.abspath(args.policy),
                  "tokenizer": os.path.abspath(tok_path),
                  "data": {"files": [os.path.abspath(p) for p in args.rollouts],
                           "train_episodes": [episode_identity(e) for e in train_eps],
                           "val_episodes": [episode_identity(e) for e in val_eps]},
                  "metrics": {"val_mse": best["val_mse"], "best_epoch": best["epoch"]}}
    pm.save_stop(model, args.output, pm.file_sha256(args.policy), provenance)
    result = {"states": {"train": len(train["gap"]), "val": len(val["gap"])},
              "episodes": {"train": len(train_eps), "val": len(val_eps)},
              "val_mse": best["val_mse"], "val_target_variance": float(y_val.var()),
              "best_epoch": best["epoch"], "history": history, "val_study": rules,
              "train_seconds": time.perf_counter() - t0, "output": args.output}
    print(f"\nvalidation: log(gap + {model.config.gap_eps}) predicted with MSE {best['val_mse']:.4f} "
          f"(its variance: {result['val_target_variance']:.4f}), best epoch {best['epoch']} of {args.epochs}")
    print(f"on the {len(val['gap'])} validation states (at least {args.min_layers} layers kept but fixed):")
    print_stop_rules(rules)
    print(f"wrote {args.output}")
    cli.save_json(args.json, result, log)
    return result



if __name__ == "__main__":
    cli.run(main, build_parser())
