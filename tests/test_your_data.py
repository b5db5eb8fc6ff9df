"""Your data, your model, your hardware: LeRobot dataset folders through the tokenizer scripts, the
tokenizer's Python API (fit, save_pretrained / from_pretrained), files with the user's umask,
--device on every script with a model, the Ray backend, and openpi policies in the evaluation."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

import analyze_rvq_compression
import bench_decoding
import bench_tokenizer
import collect_actions as ca
import demos
import eval_libero
import train_draft
import train_policy
import train_rvq_tokenizer
import train_stop
from lerobot_fixtures import write_lerobot_v21, write_lerobot_v30
from rvq_tokenizer import RVQConfig, RVQTokenizer, load_tokenizer
from synthetic_data import synthetic_episodes


def lerobot_episodes(n, seed):
    """Smooth pick-and-place-like actions of two tasks, with an 8-D state, as LeRobot episodes."""
    return [{"actions": a, "state": np.cumsum(a[:, :8] if a.shape[1] >= 8 else np.pad(a, ((0, 0), (0, 1))), 0)
             .astype(np.float32), "task": ("pick the bowl", "open the drawer")[i % 2]}
            for i, a in enumerate(synthetic_episodes(n, seed=seed))]


@pytest.mark.parametrize("writer", [write_lerobot_v30, write_lerobot_v21])
def test_lerobot_folders_train_and_analyze_a_tokenizer(tmp_path, writer):
    train_dir = writer(tmp_path / "train", lerobot_episodes(8, seed=0))
    test_dir = writer(tmp_path / "test", lerobot_episodes(3, seed=1))
    episodes = demos.load_episodes(train_dir)
    assert len(episodes) == 8 and {e.instruction for e in episodes} == {"pick the bowl", "open the drawer"}
    assert episodes[0].obs["observation.state"].shape[1] == 8
    tok = str(tmp_path / "tok.pt")
    result = train_rvq_tokenizer.main(train_rvq_tokenizer.parse_args(
        ["--data", train_dir, "--output", tok, "--epochs", "2", "--batch_size", "64", "--num_layers", "3",
         "--no_progress"]))
    assert result["metrics"]["train_episodes"] == 7 and result["metrics"]["val_episodes"] == 1
    analysis = analyze_rvq_compression.main(analyze_rvq_compression.build_parser().parse_args(
        ["--model", tok, "--data", test_dir, "--fast_scales", "10"]))
    assert analysis["data"]["episodes"] == 3 and analysis["data"]["excluded_seen_episodes"] == 0
    mse = [p["mse"] for p in analysis["rvq"]]
    assert all(b < a for a, b in zip(mse, mse[1:]))  # each layer refines the held-out chunks


@pytest.mark.parametrize("encoder", ["mlp", "none", "pca"])
def test_save_pretrained_round_trip_is_bit_exact(tmp_path, encoder):
    episodes = synthetic_episodes(8, seed=2)
    tok = RVQTokenizer.fit(episodes, epochs=2, num_layers=4, codebook_size=16, latent_steps=5, encoder=encoder)
    assert len(tok.fit_history["val_prefix_mse"][-1]) == 4
    folder = tok.save_pretrained(str(tmp_path / "my_tokenizer"))
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    again = RVQTokenizer.from_pretrained(folder)
    chunks = torch.as_tensor(demos.chunk_actions(synthetic_episodes(2, seed=3), 10))
    codes = tok.encode(chunks)
    assert torch.equal(again.encode(chunks), codes)
    for layers in range(1, 5):
        assert torch.equal(again.decode(codes[..., :layers]), tok.decode(codes[..., :layers]))
    assert again.config == tok.config
    for key, value in tok.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_from_pretrained_refuses_what_is_not_a_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        RVQTokenizer.from_pretrained(str(tmp_path))
    tok = RVQTokenizer(RVQConfig(num_layers=2, codebook_size=8))
    folder = tok.save_pretrained(str(tmp_path / "t"))
    (tmp_path / "t" / "config.json").write_text('{"format": "something else", "version": 1}')
    with pytest.raises(ValueError, match="not a tokenizer config"):
        RVQTokenizer.from_pretrained(folder)


def test_fit_refuses_bad_actions():
    with pytest.raises(ValueError, match="episode 1 holds NaN"):
        RVQTokenizer.fit([np.zeros((30, 7)), np.full((30, 7), np.nan)])
    with pytest.raises(ValueError, match="one action dimension"):
        RVQTokenizer.fit([np.zeros((30, 7)), np.zeros((30, 6))])


def test_files_are_written_with_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        tok = RVQTokenizer(RVQConfig(num_layers=2, codebook_size=8))
        from rvq_tokenizer import save_tokenizer

        save_tokenizer(tok, str(tmp_path / "tok.pt"), {})
        tok.save_pretrained(str(tmp_path / "pre"))
        for path in (tmp_path / "tok.pt", tmp_path / "pre" / "model.safetensors", tmp_path / "pre" / "config.json"):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
    finally:
        os.umask(old)
    assert load_tokenizer(str(tmp_path / "tok.pt"))[0].config == tok.config


SCRIPTS_WITH_A_MODEL = {  # every script that runs a model, with the flags it needs to parse
    train_rvq_tokenizer: [],
    analyze_rvq_compression: [],
    bench_tokenizer: ["--synthetic", "4"],
    train_policy: ["--data", "d.hdf5", "--tokenizer", "t.pt"],
    train_draft: ["--policy", "p.pt"],
    train_stop: ["--policy", "p.pt", "--rollouts", "r.hdf5"],
    bench_decoding: ["--policy", "p.pt", "--data", "d.hdf5"],
    eval_libero: [],
    ca: [],
}


@pytest.mark.parametrize("module", list(SCRIPTS_WITH_A_MODEL), ids=lambda m: m.__name__)
def test_every_script_with_a_model_takes_a_device(module):
    flags = SCRIPTS_WITH_A_MODEL[module]
    assert module.build_parser().parse_args(flags + ["--device", "cpu"]).device == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert module.build_parser().parse_args(flags + ["--device", "auto"]).device == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
            module.build_parser().parse_args(flags + ["--device", "cuda"])


def test_ray_address_needs_the_ray_backend():
    with pytest.raises(ValueError, match="--ray_address needs --backend ray"):
        eval_libero.build_parser().parse_args(["--ray_address", "ray://x:1"])
    shards = eval_libero.work_items(eval_libero.build_parser().parse_args(["--backend", "ray", "--num_trials", "12"]),
                                    [0, 3])
    assert shards == [(0, 0, 5), (0, 5, 10), (0, 10, 12), (3, 0, 5), (3, 5, 10), (3, 10, 12)]


@pytest.mark.integration
def test_ray_backend_gives_the_same_trials_and_episodes_as_local_workers(tmp_path):
    """eval_libero.py on 2 tasks x 3 trials and collect_actions.py on 2 tasks x 2 episodes: the
    same per-trial outcomes and the same actions on a local Ray instance as with --workers 2."""
    pytest.importorskip("ray")
    common = ["--task_id", "0,1", "--num_trials", "3", "--mode", "expert", "--max_steps", "60", "--workers", "2"]
    local = eval_libero.evaluate(eval_libero.build_parser().parse_args(common))
    on_ray = eval_libero.evaluate(eval_libero.build_parser().parse_args(common + ["--backend", "ray"]))
    for t in ("0", "1"):
        assert on_ray["per_task"][t]["expert"]["outcomes"] == local["per_task"][t]["expert"]["outcomes"]
    assert on_ray["modes"]["expert"]["trials"] == 6
    files = {}
    for backend in ("processes", "ray"):
        out = str(tmp_path / f"{backend}.hdf5")
        ca.collect(ca.CollectArgs(task_id=[0, 1], num_episodes=2, max_steps=40, workers=2, backend=backend,
                                  output=out, no_progress=True))
        files[backend] = demos.load_episodes(out, only_success=False)
    assert len(files["ray"]) == len(files["processes"]) == 4
    for a, b in zip(files["processes"], files["ray"]):
        np.testing.assert_array_equal(a.actions, b.actions)


@pytest.mark.integration
def test_an_openpi_policy_is_one_more_row_of_the_evaluation():
    from openpi_fake_server import FakeOpenPIServer

    with FakeOpenPIServer(horizon=10) as server:
        args = eval_libero.build_parser().parse_args(
            ["--policy", "openpi", "--host", "127.0.0.1", "--port", str(server.port), "--task_id", "0",
             "--num_trials", "2", "--max_steps", "8", "--mode", "openpi,expert"])
        result = eval_libero.evaluate(args)
    assert list(result["modes"]) == ["openpi", "expert"]
    row = result["modes"]["openpi"]
    assert row["trials"] == 2 and row["errors"] == 0 and row["latency_ms_median"] > 0
    assert len(server.requests) == 2 * 2  # 8 steps a trial, a new request every 5 (openpi's default)
    assert "observation/image" in server.requests[0]
