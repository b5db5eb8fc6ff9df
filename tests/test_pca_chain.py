"""The chain on the main job's kind of tokenizer (issue 27, bar 2), at toy sizes: synthetic demos
-> a pca tokenizer (encoder 'pca', cell scales, beam) -> train_policy --num_layers 4 (its first
4 of 6 layers) -> train_draft -> train_stop on the policy's rollouts from training init states
-> bench_decoding and eval_libero (a fake simulator) in dense, rsd and rsd+adaptive. The fixtures are policy_fixtures' with this
module's ``workdir`` (the pca tokenizer) and ``trained`` (--num_layers 4)."""

from __future__ import annotations

import pytest
import torch

import bench_decoding
import collect_actions as ca
import demos
import eval_libero
import policy_models as pm
import train_policy
import train_stop
from policy_fixtures import INSTRUCTIONS, FakeEnv, draft, policy_args, rollout_file, synthetic_demo_file  # noqa: F401
from rvq_tokenizer import RVQConfig, RVQTokenizer, load_tokenizer, save_tokenizer

LAYERS, POLICY_LAYERS = 6, 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """(folder, demo file): 12 synthetic demos of two instructions and a 6-layer pca tokenizer tok.pt."""
    d = tmp_path_factory.mktemp("pca_chain")
    path = synthetic_demo_file(d / "demos.hdf5")
    torch.manual_seed(0)
    tok = RVQTokenizer(RVQConfig(encoder="pca", chunk_size=10, latent_steps=2, num_layers=LAYERS, codebook_size=16))
    chunks = torch.from_numpy(demos.chunk_actions(demos.load_episodes(path), 10))
    tok.normalizer.fit(chunks.reshape(-1, 7))
    tok.init_codebooks(chunks)  # the principal axes, then residual k-means
    save_tokenizer(tok.eval(), str(d / "tok.pt"), {"test": True})
    return d, path


@pytest.fixture(scope="module")
def trained(workdir):
    """(folder, demo file, train_policy's result): policy.pt predicts the tokenizer's first 4 layers."""
    d, path = workdir
    return d, path, train_policy.main(policy_args(d, path, num_layers=POLICY_LAYERS))


def test_the_chain_runs_on_a_pca_tokenizer_with_a_policy_of_its_first_layers(trained, draft, tmp_path, monkeypatch):
    d, path, result = trained
    policy_path = str(d / "policy.pt")
    policy, ckpt = pm.load_policy(policy_path)
    tok, _ = load_tokenizer(str(d / "tok.pt"))
    assert tok.config.encoder == "pca" and tok.config.cell_scale and tok.config.beam_width == 8
    c = policy.config
    assert (c.num_layers, c.codebook_sizes, c.latent_steps) == (POLICY_LAYERS, (16,) * POLICY_LAYERS, 2)
    assert ckpt["provenance"]["args"]["num_layers"] == POLICY_LAYERS
    assert len(result["val_token_accuracy"]) == POLICY_LAYERS
    # the policy was trained on the first 4 layers of the tokenizer's codes of the chunks
    train_eps, _, data, _, _, _ = train_policy.load_data(policy_args(d, path), tok, num_layers=POLICY_LAYERS)
    assert data.codes.shape[1:] == (2, POLICY_LAYERS)
    assert torch.equal(data.codes[:50], tok.encode(data.actions[:50])[..., :POLICY_LAYERS])
    assert pm.load_draft(str(draft), policy_path)[0].config.num_layers == 3

    # the stop model, on the policy's own rollouts from training init states
    roll = rollout_file(tmp_path / "roll.hdf5", policy, tok, init_states=[20, 21, 22])
    stop_path = tmp_path / "stop.pt"
    stop = train_stop.main(train_stop.build_parser().parse_args([
        "--policy", policy_path, "--rollouts", str(roll), "--epochs", "30", "--hidden", "16", "--threads", "1",
        "--lr", "1e-2", "--output", str(stop_path)]))
    assert stop["states"] == {"train": 27, "val": 3}
    model, _ = pm.load_stop(str(stop_path), policy_path)
    assert model.config.in_dim == 2 * tok.config.quantizer_dim + POLICY_LAYERS  # T' * c + L

    # dense, exact speculation and speculation with the learned stop rule, on held-out states
    held_out = rollout_file(tmp_path / "held_out.hdf5", policy, tok, init_states=[0, 1, 2], n=6)
    bench = bench_decoding.main(bench_decoding.build_parser().parse_args([
        "--policy", policy_path, "--draft", str(draft), "--stop_model", str(stop_path), "--data", str(held_out),
        "--warmup", "1", "--mode", "dense,rsd,rsd+adaptive", "--adaptive_threshold", "0.1", "--threads", "1"]))
    modes = bench["modes"]
    assert list(modes) == ["dense", "rsd", "rsd+adaptive"]
    assert modes["dense"]["main_passes_per_chunk"] == POLICY_LAYERS and modes["dense"]["layers_per_chunk"] == 4
    assert modes["rsd"]["same_codes_as_dense"] == 1.0 and modes["rsd"]["action_gap_vs_dense_max"] == 0.0
    assert modes["rsd"]["main_passes_per_chunk"] == pytest.approx(
        POLICY_LAYERS - modes["rsd"]["accepted_layers_per_chunk"])
    assert 2 <= modes["rsd+adaptive"]["layers_per_chunk"] <= POLICY_LAYERS

    # the closed loop (eval_libero, a fake simulator): every mode runs its trials
    monkeypatch.setattr(ca, "LiberoEnv", lambda *a, **k: FakeEnv((8, 6)))
    monkeypatch.setattr(ca, "get_task", lambda suite, t: ca.TaskInfo(suite, t, "t", INSTRUCTIONS[t % 2], "", 40))
    args = eval_libero.build_parser().parse_args([
        "--policy", policy_path, "--draft", str(draft), "--stop_model", str(stop_path), "--mode", "dense,rsd,rsd+adaptive",
        "--adaptive_threshold", "0.1", "--task_id", "0,1", "--num_trials", "2"])
    out = eval_libero.evaluate(args)
    for s in out["modes"].values():
        assert (s["trials"], s["errors"]) == (4, 0), s
    assert out["modes"]["dense"]["main_passes_per_chunk"] == POLICY_LAYERS

    # a policy cannot predict more layers than the tokenizer has; a DAgger round keeps its start's
    with pytest.raises(ValueError, match="--num_layers 7: the tokenizer .* has 6 layers"):
        train_policy.main(policy_args(d, path, num_layers=7, output=str(tmp_path / "p7.pt")))
    with pytest.raises(ValueError, match="was trained with --num_layers 4, not 3"):
        train_policy.main(policy_args(d, path, init=policy_path, num_layers=3, output=str(tmp_path / "p3.pt")))
