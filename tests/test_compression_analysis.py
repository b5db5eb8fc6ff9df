"""Unit tests of analyze_rvq_compression.py's decisions (bar 1, hypothesis, test-data
disjointness) and of the benchmark's peer wrapper, on small synthetic data (no LIBERO)."""
import argparse
import math

import h5py
import numpy as np
import pytest
import torch

import analyze_rvq_compression as an
import collect_actions as ca
import demos


def point(method, bits, mse, **extra):
    return {"method": method, "bits_per_chunk": float(bits), "mse": mse, **extra}


def rvq_points(mses, bits_per_layer=16):
    return [{"layers": i + 1, "bits_per_chunk": float(bits_per_layer * (i + 1)), "mse": m}
            for i, m in enumerate(mses)]


def test_bar1_passes_when_rvq_dominates_up_to_dct_threshold():
    rvq = rvq_points([0.02, 0.008, 0.004, 0.0005])  # 16..64 bits
    baselines = {"dct": [point("dct_k1", 56, 0.03), point("dct_k2", 112, 0.0009)],
                 "fast": [point("fast_s1", 40, 0.05), point("fast_s5", 100, 0.005)],
                 "binning": [point("binning_2", 70, 0.1)]}
    b = an.bar1_check(rvq, baselines)
    assert b["budget_range_bits"] == [16.0, 112.0]
    assert b["passed"] and b["num_failures"] == 0
    # RVQ's 4 layers (64 bits) are compared with the cheapest baseline point of >= 64 bits
    pairs = {(c["rvq_layers"], c["baseline"]) for c in b["comparisons"]}
    assert (4, "dct_k2") in pairs and (4, "fast_s5") in pairs and (4, "binning_2") in pairs
    # a baseline point between RVQ's budgets is checked against RVQ's best point below it
    assert (2, "fast_s1") in pairs


def test_bar1_fails_when_a_baseline_is_better_at_a_larger_budget():
    rvq = rvq_points([0.02, 0.008, 0.004, 0.002])
    baselines = {"dct": [point("dct_k1", 56, 0.03), point("dct_k2", 112, 0.0009)],
                 "fast": [point("fast_s2", 50, 0.003)],  # beats RVQ's 48-bit point at 50 bits
                 "binning": [point("binning_2", 70, 0.1)]}
    b = an.bar1_check(rvq, baselines)
    assert not b["passed"]
    assert any(c["rvq_layers"] == 3 and c["baseline"] == "fast_s2" for c in b["failures"])


def test_bar1_marks_budgets_beyond_rvq_range():
    rvq = rvq_points([0.02, 0.01])  # at most 32 bits
    baselines = {"dct": [point("dct_k1", 56, 0.0005)], "fast": [], "binning": []}
    b = an.bar1_check(rvq, baselines)
    assert not b["passed"] and not b["passed_within_rvq_range"]
    beyond = [c for c in b["comparisons"] if c["beyond_rvq_range"]]
    assert [(c["rvq_layers"], c["budget_bits"]) for c in beyond] == [(2, 56.0)]


def test_hypothesis_is_computed_from_numbers():
    h = an.hypothesis(rvq_points([0.05, 0.008, 0.004, 0.0009]))
    assert h["fewest_layers_mse_below_0_01"] == 2
    assert h["layers_1_2_below_0_01"] is True
    assert h["all_layers_below_0_001"] is True
    assert h["coarse_improvement"] == pytest.approx(0.042)
    assert h["fine_improvement"] == pytest.approx(0.0071)
    assert h["coarse_to_fine_structure"] and h["error_falls_with_every_layer"]
    h = an.hypothesis(rvq_points([0.05, 0.03, 0.031]))
    assert h["fewest_layers_mse_below_0_01"] is None and not h["layers_1_2_below_0_01"]
    assert not h["error_falls_with_every_layer"]


def seen(n, seed0=0, init0=20):
    return [{"source": "/x/train.hdf5", "key": f"demo_{i}", "task_suite": "libero_spatial", "task_id": 0,
             "seed": ca.episode_seed(seed0, 0, i), "init_state_id": init0 + i % 30} for i in range(n)]


def test_fresh_seed_is_disjoint_from_checkpoint_seeds():
    train = seen(50)
    seed, seeds = an.choose_fresh_seed(None, train, task_id=0, num_episodes=20, provenance_seed=0)
    assert seed != 0 and not set(seeds) & {e["seed"] for e in train}
    assert seeds == [ca.episode_seed(seed, 0, i) for i in range(20)]
    with pytest.raises(ValueError, match="--seed 0"):
        an.choose_fresh_seed(0, train, task_id=0, num_episodes=20, provenance_seed=0)


def write_demos(path, seeds, init_states):
    with h5py.File(path, "w") as f:
        g = f.create_group("data")
        for i, (s, st) in enumerate(zip(seeds, init_states)):
            d = g.create_group(f"demo_{i}")
            d.create_dataset("actions", data=np.random.default_rng(i).normal(size=(30, 7)).astype(np.float32))
            d.attrs.update(success=True, seed=s, init_state_id=st, task_id=0, task_suite="libero_spatial")


def test_file_test_data_drops_seen_episodes(tmp_path):
    train = seen(3)
    path = str(tmp_path / "mixed.hdf5")
    # demo_0..2 are the training episodes (same key, seed, init state), demo_3..4 are new
    write_demos(path, [e["seed"] for e in train] + [7, 8], [e["init_state_id"] for e in train] + [0, 1])
    args = argparse.Namespace(data=[path])
    kept, info = an.file_test_episodes(args, train)
    assert [e.key for e in kept] == ["demo_3", "demo_4"]
    assert info["excluded_seen_episodes"] == 3 and info["source"] == "files"
    with pytest.raises(ValueError, match="seen by the tokenizer"):
        an.file_test_episodes(argparse.Namespace(data=[path]), seen(3) + [
            {"key": f"demo_{i}", "task_suite": "libero_spatial", "task_id": 0, "seed": s, "init_state_id": st}
            for i, s, st in ((3, 7, 0), (4, 8, 1))])


def test_peer_tokenizer_round_trip_and_prefix_shapes():
    pytest.importorskip("vector_quantize_pytorch")
    from bench_tokenizer import PeerTokenizer
    from rvq_tokenizer import RVQConfig

    torch.manual_seed(0)
    cfg = RVQConfig(num_layers=3, codebook_size=16, hidden_dim=32, fsq_levels=(4, 4, 4, 4))  # 256 codes
    x = torch.randn(64, cfg.chunk_size, cfg.action_dim)
    for kind in ("rvq", "rfsq"):
        peer = PeerTokenizer(RVQConfig(**{**cfg.__dict__, "quantizer": kind}), kind, dead_code_threshold=0.1)
        peer.normalizer.fit(x)
        peer.train()
        loss = peer.loss(x)
        loss.backward()
        assert math.isfinite(loss.item())
        assert all(p.grad is not None for p in peer.encoder.parameters())
        peer.eval()
        codes = peer.encode(x)
        assert codes.shape == (64, cfg.latent_steps, 3) and codes.min() >= 0
        # decode(encode(x)) equals the eval forward of the same modules
        with torch.no_grad():
            xn = peer.normalizer.normalize(x)
            expected = peer.normalizer.denormalize(peer._decode_latent(peer.quantizer(peer._latent(xn))[0]))
        torch.testing.assert_close(peer.decode(codes), expected, atol=1e-5, rtol=1e-5)


def write_episode_file(path, episodes, seed0):
    with h5py.File(path, "w") as f:
        g = f.create_group("data")
        for i, a in enumerate(episodes):
            d = g.create_group(f"demo_{i}")
            d.create_dataset("actions", data=a)
            d.attrs.update(success=True, seed=seed0 + i, init_state_id=20 + i, task_id=0,
                           task_suite="libero_spatial")


@pytest.mark.parametrize("encoder", ["mlp", "none", "pca"])
def test_analysis_main_writes_every_field(tmp_path, encoder):
    """End to end on synthetic demo files: a briefly trained tokenizer (or one fit by residual
    k-means, without an encoder), --data test files, JSON with every field the issue lists,
    and the plot."""
    import json

    from rvq_tokenizer import RVQConfig, RVQTokenizer, save_tokenizer
    from synthetic_data import synthetic_episodes

    torch.manual_seed(0)
    train_path, test_path = str(tmp_path / "train.hdf5"), str(tmp_path / "test.hdf5")
    write_episode_file(train_path, synthetic_episodes(12, seed=0), seed0=1000)
    write_episode_file(test_path, synthetic_episodes(4, seed=1), seed0=5000)
    train_eps = demos.load_episodes([train_path])
    chunks = torch.as_tensor(demos.chunk_actions(train_eps, 10))
    model = RVQTokenizer(RVQConfig(num_layers=4, codebook_size=32, hidden_dim=32, encoder=encoder))
    model.normalizer.fit(chunks)
    model.init_codebooks(chunks)
    opt = torch.optim.Adam(model.parameters(), 1e-3) if encoder == "mlp" else None
    for _ in range(30 if opt else 0):
        loss = model(chunks[torch.randint(len(chunks), (64,))]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ckpt = str(tmp_path / "tok.pt")
    save_tokenizer(model, ckpt, {"args": {"seed": 0}, "seed": 0, "metrics": {}, "data": {
        "files": [train_path], "train_episodes": [demos.episode_identity(e) for e in train_eps], "val_episodes": []}})
    args = an.build_parser().parse_args(["--model", ckpt, "--data", test_path, "--device", "cpu",
                                         "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png"),
                                         "--fast_scales", "2", "10", "--bin_counts", "16", "256"])
    result = an.main(args)
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["data"]["source"] == "files" and saved["data"]["excluded_seen_episodes"] == 0
    fields = {"layers", "tokens_per_chunk", "bits_per_chunk", "mse", "mse_std", "mse_raw", "max_abs_err"}
    assert [p["layers"] for p in saved["rvq"]] == [1, 2, 3, 4]
    assert all(fields <= set(p) for p in saved["rvq"])
    assert saved["rvq"][0]["bits_per_chunk"] == model.bits_per_chunk(1)
    for family in ("dct", "fast", "binning"):
        assert saved["baselines"][family] and all(fields - {"layers"} <= set(p) for p in saved["baselines"][family])
    assert {"fewest_layers_mse_below_0_01", "layers_1_2_below_0_01", "coarse_improvement"} <= set(saved["hypothesis"])
    assert isinstance(saved["bar1"]["passed"], bool)
    assert (tmp_path / "a.png").stat().st_size > 10_000
    assert result["rvq"][-1]["mse"] < result["rvq"][0]["mse"]
    if encoder != "mlp":  # nothing but the codes stands between a chunk and its reconstruction
        assert saved["autoencoder_floor"]["mse"] < 1e-10


def test_analysis_follows_the_checkpoints_targets(tmp_path):
    """A tokenizer trained on --targets expert_actions is tested and its baselines fit on the
    expert's commands: recorded ones where a perturbed episode has them, the executed actions
    of an unperturbed episode (which are the expert's)."""
    path = str(tmp_path / "perturbed.hdf5")
    write_demos(path, [11, 12], [20, 21])
    with h5py.File(path, "a") as f:  # demo_0 perturbed (expert commands recorded), demo_1 not
        f["data/demo_0"].create_dataset("expert_actions", data=np.full((30, 7), 0.5, np.float32))
    episodes = demos.load_episodes([path])
    prov = {"args": {"targets": "expert_actions"}, "data": {"files": [path]}}
    assert an.checkpoint_targets(prov) == "expert_actions"
    assert an.checkpoint_targets({"args": {}}) == "actions"  # checkpoints from before the flag
    with pytest.raises(ValueError, match="'bogus'"):
        an.checkpoint_targets({"args": {"targets": "bogus"}})

    tested, recorded = an.episodes_of_targets(episodes, "expert_actions")
    assert recorded == 1
    np.testing.assert_array_equal(tested[0].actions, episodes[0].expert_actions)
    np.testing.assert_array_equal(tested[1].actions, episodes[1].actions)
    assert an.episodes_of_targets(episodes, "actions") == (episodes, 0)

    train_seen = [demos.episode_identity(episodes[0])]
    chunks = an.training_chunks(prov, train_seen, 10, "tok.pt")
    assert chunks.shape == (21, 10, 7) and np.all(chunks == 0.5)
    chunks = an.training_chunks({"args": {}, "data": {"files": [path]}}, train_seen, 10, "tok.pt")
    np.testing.assert_array_equal(chunks[0], episodes[0].actions[:10])


def test_bench_fits_and_measures_the_encoder_free_rvq():
    import bench_tokenizer as bt

    args = bt.build_parser().parse_args(["--synthetic", "12", "--methods", "rvq_direct", "fast", "--batch", "64",
                                         "--repeats", "2", "--latency_repeats", "5", "--num_layers", "3",
                                         "--codebook_size", "32"])
    r = bt.main(args)
    m = r["methods"]["rvq_direct"]
    assert 0 < m["mse"] < 0.05 and m["chunks_per_s"] > 0 and m["batch1_latency_us"] > 0
    assert 0 < m["batch1_decode_us"] and "batch1_decode_us" in r["methods"]["fast"]
    assert "rvq_direct_batch1_latency_ok" in r["bars"]


def test_bench_trains_the_same_tokenizers_in_every_run():
    """Two runs of the benchmark (even with other random draws between them) train the same
    models: initial weights, codebooks and batches all come from --seed."""
    import bench_tokenizer as bt

    argv = ["--synthetic", "12", "--methods", "rvq", "rfsq", "--steps", "30", "--batch", "64",
            "--repeats", "1", "--latency_repeats", "2", "--num_layers", "2", "--codebook_size", "16"]
    first = bt.main(bt.build_parser().parse_args(argv))
    torch.rand(1000)  # the global generator moves on
    second = bt.main(bt.build_parser().parse_args(argv))
    for name in ("rvq", "rfsq"):
        assert first["methods"][name]["mse"] == second["methods"][name]["mse"]


def test_bench_refuses_too_few_steps_for_its_schedule():
    import bench_tokenizer as bt

    with pytest.raises(ValueError, match="--steps must be more than 20.*got 20"):
        bt.main(bt.build_parser().parse_args(["--synthetic", "12", "--steps", "20"]))
