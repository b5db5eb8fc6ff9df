"""train_rvq_tokenizer.py end to end on small synthetic demo files (no simulator): the
checkpoint, its provenance and recorded action dimension, the plot, the JSON, bad input."""

import json
import os

import h5py
import numpy as np
import pytest
import torch

import rvq_tokenizer as rt
from demos import chunk_actions
from synthetic_data import synthetic_episodes
import train_rvq_tokenizer as trainer


def write_demo_file(path, episodes, attrs=True):
    """The robomimic / LIBERO layout: data/demo_i/actions [N, D] (+ the attrs we write)."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i, actions in enumerate(episodes):
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=actions)
            if attrs:
                g.attrs.update(task_suite="libero_spatial", task_id=0, success=True,
                               init_state_id=20 + i, seed=1000 + i)
    return str(path)


def run(tmp_path, data, *extra, encoder="mlp"):
    """The script on ``data`` with 3 layers (an MLP tokenizer trained 2 epochs unless ``encoder``)."""
    out = str(tmp_path / "tok.pt")
    args = trainer.parse_args(["--data", *data, "--output", out, "--encoder", encoder, "--epochs", "2",
                               "--batch_size", "64", "--num_layers", "3", "--no_progress",
                               "--json", str(tmp_path / "r.json"), *extra])
    return trainer.main(args), out


@pytest.mark.parametrize("quantizer", ["rvq", "rfsq"])
def test_training_writes_a_self_describing_checkpoint(tmp_path, quantizer):
    demo = write_demo_file(tmp_path / "demos.hdf5", synthetic_episodes(10, seed=1))
    result, out = run(tmp_path, [demo], "--quantizer", quantizer)
    model, ckpt = rt.load_tokenizer(out)
    prov = ckpt["provenance"]
    assert ckpt["config"]["action_dim"] == 7 and ckpt["config"]["quantizer"] == quantizer
    assert prov["seed"] == 0 and prov["args"]["quantizer"] == quantizer
    assert prov["data"]["files"] == [os.path.abspath(demo)]
    train_ids = {e["key"] for e in prov["data"]["train_episodes"]}
    val_ids = {e["key"] for e in prov["data"]["val_episodes"]}
    assert len(val_ids) == 1 and len(train_ids) == 9 and not train_ids & val_ids  # split by episode
    assert {"source", "key", "task_suite", "task_id", "init_state_id", "seed"} <= set(prov["data"]["val_episodes"][0])
    metrics = prov["metrics"]
    assert len(metrics["val_prefix_mse"]) == 3 and 1 <= metrics["best_epoch"] <= 2
    # the stored metrics are what the saved model measures on the held-out episode
    val_key = prov["data"]["val_episodes"][0]["key"]
    val_actions = chunk_actions([synthetic_episodes(10, seed=1)[int(val_key.split("_")[1])]], 10)
    np.testing.assert_allclose(model.prefix_mse(torch.as_tensor(val_actions)).numpy(),
                               metrics["val_prefix_mse"], rtol=1e-5)
    assert os.path.isfile(result["plot"]) and result["plot"].endswith("tok_training_history.png")
    with open(tmp_path / "r.json") as f:
        assert json.load(f)["metrics"]["val_prefix_mse"] == metrics["val_prefix_mse"]


def test_the_default_is_the_pca_tokenizer_fit_by_residual_kmeans(tmp_path):
    """Without flags: encoder pca, 2 positions, 24 layers of 256 codes, a beam of 8 (issue 27);
    another encoder takes its own sizes unless given."""
    args = trainer.parse_args([])
    assert (args.encoder, args.latent_steps, args.num_layers, args.codebook_size) == ("pca", 2, 24, 256)
    config = args.config(action_dim=7)
    assert config.beam_width == 8 and config.cell_scale and config.quantizer_dim == 35
    mlp = trainer.parse_args(["--encoder", "mlp"])
    assert (mlp.latent_steps, mlp.num_layers) == (rt.RVQConfig.latent_steps, rt.RVQConfig.num_layers)
    assert mlp.config(action_dim=7).beam_width == 1 and not mlp.config(action_dim=7).cell_scale
    small = trainer.parse_args(["--encoder", "mlp", "--latent_steps", "3", "--codebook_size", "16", "--num_layers", "8"])
    assert (small.latent_steps, small.codebook_size, small.num_layers) == (3, 16, 8)
    with pytest.raises(ValueError, match="encoder 'pca' needs quantizer 'rvq'"):
        trainer.parse_args(["--quantizer", "rfsq"])
    demo = write_demo_file(tmp_path / "demos.hdf5", synthetic_episodes(10, seed=1))
    result, out = run(tmp_path, [demo], "--codebook_size", "16", encoder="pca")
    model, ckpt = rt.load_tokenizer(out)
    assert ckpt["config"]["encoder"] == "pca" and ckpt["config"]["beam_width"] == 8
    metrics = ckpt["provenance"]["metrics"]
    assert metrics["best_epoch"] == 0 and len(metrics["val_prefix_mse"]) == 3
    assert all(b < a for a, b in zip(metrics["val_prefix_mse"], metrics["val_prefix_mse"][1:]))
    assert metrics["bits_per_chunk"] == [8.0, 16.0, 24.0]  # 2 positions x 4 bits per layer
    val_key = ckpt["provenance"]["data"]["val_episodes"][0]["key"]
    val_actions = chunk_actions([synthetic_episodes(10, seed=1)[int(val_key.split("_")[1])]], 10)
    np.testing.assert_allclose(model.prefix_mse(torch.as_tensor(val_actions)).numpy(),
                               metrics["val_prefix_mse"], rtol=1e-5)
    assert os.path.isfile(result["plot"])


def test_any_action_dimension_is_recorded(tmp_path):
    episodes = [e[:, [0, 1, 2, 6]] for e in synthetic_episodes(6, seed=2)]  # 4-D: xyz + gripper
    demo = write_demo_file(tmp_path / "four_d.hdf5", episodes, attrs=False)
    _, out = run(tmp_path, [demo], "--val_fraction", "0.2")
    model, ckpt = rt.load_tokenizer(out)
    assert ckpt["config"]["action_dim"] == 4
    assert model.decode(model.encode(torch.zeros(2, 10, 4))).shape == (2, 10, 4)


def test_too_few_episodes_for_a_validation_split_is_a_clear_error(tmp_path):
    demo = write_demo_file(tmp_path / "one.hdf5", synthetic_episodes(1, seed=3))
    with pytest.raises(ValueError, match="1 episode.*validation"):
        run(tmp_path, [demo])


@pytest.mark.parametrize("flag, value, named", [
    ("--num_layers", "0", "num_layers"), ("--codebook_size", "1", "codebook_size"),
    ("--epochs", "0", "--epochs"), ("--val_fraction", "1.5", "--val_fraction"),
])
def test_bad_flags_name_the_value(tmp_path, flag, value, named):
    demo = write_demo_file(tmp_path / "demos.hdf5", synthetic_episodes(4, seed=4))
    with pytest.raises(ValueError, match=named):
        run(tmp_path, [demo], flag, value)


def test_missing_data_file_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="nope.hdf5"):
        run(tmp_path, [str(tmp_path / "nope.hdf5")])


def test_targets_expert_actions_trains_on_the_experts_commands(tmp_path):
    """A perturbed collection stores expert_actions; --targets expert_actions trains on them."""
    executed = synthetic_episodes(10, seed=5)
    demo = write_demo_file(tmp_path / "demos.hdf5", executed)
    with h5py.File(demo, "r+") as f:
        for i, actions in enumerate(executed):
            f[f"data/demo_{i}"].create_dataset("expert_actions", data=0.5 * actions)
    _, out = run(tmp_path, [demo], "--targets", "expert_actions")
    half = rt.load_tokenizer(out)[0].normalizer
    _, out = run(tmp_path, [demo])
    full = rt.load_tokenizer(out)[0].normalizer
    # the normalizer was fitted on the halved actions
    torch.testing.assert_close(half.high - half.low, 0.5 * (full.high - full.low))
    plain = write_demo_file(tmp_path / "plain.hdf5", executed)
    with pytest.raises(ValueError, match="demo_0 has no expert_actions"):
        run(tmp_path, [plain], "--targets", "expert_actions")


def test_hidden_dim_defaults_per_quantizer_and_an_explicit_flag_wins():
    assert trainer.parse_args([]).hidden_dim == trainer.DEFAULT_HIDDEN_DIM["rvq"] == 64
    rfsq = ["--encoder", "mlp", "--quantizer", "rfsq"]
    assert trainer.parse_args(rfsq).hidden_dim == trainer.DEFAULT_HIDDEN_DIM["rfsq"] == 32
    assert trainer.parse_args(rfsq + ["--hidden_dim", "48"]).hidden_dim == 48
