"""Bad inputs and faults a careful user hits: each ends in one line naming the file, flag or value
(exit 2, no traceback), before any work where it can be checked up front, and loses nothing that
existed before. Grouped as the faults are: silent wrong results, security, data lost, tracebacks."""

from __future__ import annotations

import http.server
import os
import pickle
import re
import threading

import h5py
import numpy as np
import pytest
import torch

import analyze_rvq_compression
import bench_decoding
import bench_tokenizer
import cli
import collect_actions as ca
import demos
import eval_libero
import train_draft
import train_policy
import train_rvq_tokenizer
import train_stop
from policy_fixtures import draft, synthetic_demo_file, trained, workdir  # noqa: F401
from synthetic_data import synthetic_episodes


LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


def fails(module, argv, capsys) -> str:
    """Run a script's entry point as the command line does; it must exit 2 with one line on stderr
    (argparse's usage errors: a usage line and one error line), never a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(module.main, module.build_parser(), [str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    # log lines (the run's settings, progress) may come before; the error is one line
    lines = [line for line in err.strip().splitlines() if line.strip() and not LOG_LINE.match(line)]
    usage = [i for i, line in enumerate(lines) if line.startswith("usage:")]
    message = lines[usage[0] + 1:] if usage else lines  # argparse: usage (wrapped), then the error
    message = [line for line in message if not line.startswith(" ")]
    assert len(message) == 1 and "error: " in message[0], err
    return message[0]


def demo_file(path, episodes=None, attrs=True, **kw):
    """A demo file of synthetic episodes; ``attrs=False``: the robomimic layout of another source
    (no LIBERO attributes, demos numbered from demo_0)."""
    episodes = synthetic_episodes(6, seed=kw.pop("seed", 0)) if episodes is None else episodes
    with h5py.File(path, "w") as f:
        for i, a in enumerate(episodes):
            g = f.create_group(f"data/demo_{i}")
            g.create_dataset("actions", data=a)
            g.create_dataset("obs/state", data=np.zeros((len(a), 3), np.float32))
            if attrs:
                g.attrs.update(success=True, task_suite="libero_spatial", task_id=0, seed=i, init_state_id=20 + i,
                               instruction="pick")
    return str(path)


def tokenizer_args(data, out, *extra):
    return ["--data", data, "--output", out, "--epochs", "1", "--batch_size", "64", "--num_layers", "3",
            "--codebook_size", "16", "--latent_steps", "2", "--no_progress", *extra]


# ------------------------------------------------------------------ silent wrong results


def test_a_nan_observation_is_refused_at_load_naming_file_demo_and_key(trained, tmp_path, capsys):
    d, path, _ = trained
    bad = tmp_path / "nan_obs.hdf5"
    synthetic_demo_file(bad)
    with h5py.File(bad, "a") as f:
        f["data/demo_3/obs/object-state"][5, 2] = np.nan
    err = fails(train_policy, ["--data", bad, "--tokenizer", d / "tok.pt", "--output", tmp_path / "p.pt"], capsys)
    assert "demo_3/obs/object-state holds NaN or inf (first at step 5)" in err and "nan_obs.hdf5" in err
    err = fails(bench_decoding, ["--policy", d / "policy.pt", "--data", bad, "--mode", "dense"], capsys)
    assert "demo_3/obs/object-state" in err
    err = fails(train_stop, ["--policy", d / "policy.pt", "--rollouts", bad, "--output", tmp_path / "s.pt"], capsys)
    assert "demo_3/obs/object-state" in err


def test_the_observation_normalizer_refuses_nan():
    from policy_models import ObsNormalizer

    obs = np.zeros((4, 3), np.float32)
    obs[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"row 2, feature 1"):
        ObsNormalizer(3).fit(obs)


def test_eval_refuses_trials_beyond_the_held_out_init_states_and_zero_steps(capsys):
    assert "--num_trials must be in 1..20" in fails(eval_libero, ["--num_trials", 21], capsys)
    assert "--max_steps must be >= 1, got 0" in fails(eval_libero, ["--max_steps", 0], capsys)


def test_a_mode_asking_the_draft_for_more_layers_than_it_has_is_refused(trained, draft, capsys):  # noqa: F811
    d, _, _ = trained
    err = fails(eval_libero, ["--policy", d / "policy.pt", "--draft", draft, "--mode", "dense,rsd:99",
                              "--task_id", "0"], capsys)
    assert "--mode rsd:99" in err and "at most 3 layers" in err


def test_stop_model_min_layers_out_of_range(trained, tmp_path, capsys):
    d, path, _ = trained
    assert "--min_layers must be >= 1" in fails(train_stop, ["--policy", d / "policy.pt", "--rollouts", path,
                                                             "--min_layers", 0], capsys)
    err = fails(train_stop, ["--policy", d / "policy.pt", "--rollouts", path, "--min_layers", 99,
                             "--output", tmp_path / "s.pt"], capsys)
    assert "--min_layers 99 exceeds the policy's 3 layers" in err


def test_an_extreme_action_is_refused_not_trained_on(trained, tmp_path, capsys):
    d, _, _ = trained
    bad = tmp_path / "huge.hdf5"
    synthetic_demo_file(bad)
    with h5py.File(bad, "a") as f:
        f["data/demo_7/actions"][4, 1] = 1e30
    err = fails(train_policy, ["--data", bad, "--tokenizer", d / "tok.pt", "--output", tmp_path / "p.pt"], capsys)
    assert "demo_7 step 4" in err and "far outside the tokenizer's range" in err
    data = demo_file(tmp_path / "huge_tok.hdf5")
    with h5py.File(data, "a") as f:
        f["data/demo_2/actions"][30, 0] = 1e30
    err = fails(bench_tokenizer, ["--data", data, "--methods", "rvq", "--steps", 30, "--batch", 8], capsys)
    assert "diverged" in err or "MSE" in err
    err = fails(train_rvq_tokenizer, tokenizer_args(data, tmp_path / "t.pt"), capsys)
    assert "diverged" in err or "not finite" in err


def test_a_learning_rate_that_would_diverge_is_refused(trained, tmp_path, capsys):
    d, path, _ = trained
    assert "--lr must be in (0, 1], got 1000000.0" in fails(
        train_policy, ["--data", path, "--tokenizer", d / "tok.pt", "--lr", "1e6"], capsys)
    assert "--lr must be in (0, 1]" in fails(train_rvq_tokenizer, ["--lr", "1e6"], capsys)


def test_empty_and_short_demos(tmp_path, capsys):
    empty = demo_file(tmp_path / "empty.hdf5", [np.zeros((0, 7), np.float32), synthetic_episodes(1)[0]])
    with pytest.raises(demos.DemoFileError, match="demo_0 has no steps"):
        demos.load_episodes(empty)
    episodes = synthetic_episodes(6, seed=1) + [synthetic_episodes(1, seed=2)[0][:3]]
    data = demo_file(tmp_path / "short.hdf5", episodes)
    result = train_rvq_tokenizer.main(train_rvq_tokenizer.parse_args(tokenizer_args(data, str(tmp_path / "t.pt"))))
    assert "1 episode(s) shorter than --chunk_size 10" in capsys.readouterr().err
    assert result["metrics"]["train_episodes"] + result["metrics"]["val_episodes"] == 6


def test_a_held_out_file_of_another_source_numbering_demos_alike_is_usable(tmp_path):
    """Two robomimic-layout files without LIBERO attributes, each from demo_0: episodes are told
    apart by their content, so the second file tests the tokenizer trained on the first."""
    train_file = demo_file(tmp_path / "a.hdf5", synthetic_episodes(8, seed=3), attrs=False)
    test_file = demo_file(tmp_path / "b.hdf5", synthetic_episodes(4, seed=4), attrs=False)
    tok = str(tmp_path / "tok.pt")
    train_rvq_tokenizer.main(train_rvq_tokenizer.parse_args(tokenizer_args(train_file, tok)))
    result = analyze_rvq_compression.main(analyze_rvq_compression.build_parser().parse_args(
        ["--model", tok, "--data", test_file, "--fast_scales", "10"]))
    assert result["data"]["episodes"] == 4 and result["data"]["excluded_seen_episodes"] == 0
    # the very same episodes, copied into another file, are still recognised as seen
    copied = demo_file(tmp_path / "c.hdf5", synthetic_episodes(8, seed=3)[:2] + synthetic_episodes(4, seed=4),
                       attrs=False)
    result = analyze_rvq_compression.main(analyze_rvq_compression.build_parser().parse_args(
        ["--model", tok, "--data", copied, "--fast_scales", "10"]))
    assert result["data"]["excluded_seen_episodes"] == 2


# ------------------------------------------------------------------ security


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_carrying_code_is_refused_not_run(trained, tmp_path, capsys):
    d, _, _ = trained
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "rsd_token_policy", "version": 1, "x": Payload(str(marker))}, f)
    err = fails(train_draft, ["--policy", evil, "--output", tmp_path / "d.pt"], capsys)
    assert "not a readable checkpoint" in err
    assert not marker.exists()
    # no file of the toolkit unpickles arbitrary objects
    root = os.path.dirname(os.path.dirname(__file__))
    unsafe = re.compile(r"weights_only\s*=\s*False")
    for folder in (root, os.path.join(root, "tests")):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    assert not unsafe.search(f.read()), f"{name} loads a checkpoint unsafely"


# ------------------------------------------------------------------ data lost


def test_an_output_equal_to_an_input_is_refused_and_the_input_kept(trained, draft, tmp_path, capsys):  # noqa: F811
    d, path, _ = trained
    before = {p: open(p, "rb").read() for p in (draft, d / "tok.pt", path)}
    assert "--output" in fails(train_draft, ["--policy", d / "policy.pt", "--output", draft, "--rollouts", draft],
                               capsys)
    err = fails(train_draft, ["--policy", draft, "--output", draft], capsys)
    assert "is also --policy" in err
    err = fails(train_policy, ["--data", path, "--tokenizer", d / "tok.pt", "--output", d / "tok.pt"], capsys)
    assert "is also --tokenizer" in err
    err = fails(train_policy, ["--data", path, "--tokenizer", d / "tok.pt", "--output", path], capsys)
    assert "is also --data" in err
    assert all(open(p, "rb").read() == content for p, content in before.items())


def test_an_unfinished_collection_is_never_truncated(tmp_path):
    out = str(tmp_path / "demos.hdf5")
    w = demos.DemoWriter(out, {"suite": "libero_spatial", "seed": 0})
    w.add(demos.Episode(np.zeros((12, 7), np.float32), {}, True, "libero_spatial", 0, "pick", 20, 5),
          {"episode_index": 0})
    w.abandon()
    with pytest.raises(ValueError, match=r"earlier, unfinished run: --resume continues it, --overwrite"):
        ca.collect(ca.CollectArgs(task_id=[0], num_episodes=2, output=out))
    with h5py.File(out + ".partial") as f:
        assert list(f["data"]) == ["demo_0"]
    resumed = demos.DemoWriter(out, {"suite": "libero_spatial", "seed": 0}, partial="resume")
    assert resumed.count == 1 and resumed.existing[0]["episode_index"] == 0
    resumed.abandon()
    with pytest.raises(ValueError, match="was collected with seed=0, this run asks for 1"):
        demos.DemoWriter(out, {"suite": "libero_spatial", "seed": 1}, partial="resume")
    fresh = demos.DemoWriter(out, {"suite": "libero_spatial", "seed": 1}, partial="overwrite")
    assert fresh.count == 0
    fresh.abandon()


def test_the_main_job_reuses_its_demo_file_instead_of_overwriting_it(tmp_path):
    out = tmp_path / "tok.pt"
    demos_path = demo_file(tmp_path / "tok_demos.hdf5", synthetic_episodes(5, seed=6))
    before = open(demos_path, "rb").read()
    args = train_rvq_tokenizer.parse_args(["--output", str(out), "--num_episodes", "5", "--epochs", "1",
                                           "--num_layers", "2", "--no_progress"])
    result = train_rvq_tokenizer.main(args)  # 5 episodes with --val_fraction 0.1: 4 train, 1 validation
    assert (result["metrics"]["train_episodes"], result["metrics"]["val_episodes"]) == (4, 1)
    assert open(demos_path, "rb").read() == before


# ------------------------------------------------------------------ tracebacks


def test_missing_required_flags_are_usage_errors(capsys):
    assert "--policy" in fails(bench_decoding, ["--data", "x.hdf5"], capsys)
    assert "--data" in fails(bench_decoding, ["--policy", "p.pt"], capsys)


def test_a_checkpoint_config_with_an_unknown_key_is_refused_naming_the_file(trained, draft, tmp_path, capsys):  # noqa: F811
    d, path, _ = trained
    for src, loader in ((d / "policy.pt", "policy"), (draft, "draft"), (d / "tok.pt", "tokenizer")):
        ckpt = torch.load(src, weights_only=True)
        ckpt["config"]["from_the_future"] = 1
        bad = tmp_path / f"extra_{loader}.pt"
        torch.save(ckpt, bad)
        if loader == "policy":
            err = fails(train_draft, ["--policy", bad, "--output", tmp_path / "x.pt"], capsys)
        elif loader == "draft":
            err = fails(eval_libero, ["--policy", d / "policy.pt", "--draft", bad, "--mode", "rsd",
                                      "--task_id", "0"], capsys)
        else:
            err = fails(train_policy, ["--data", path, "--tokenizer", bad, "--output", tmp_path / "x.pt"], capsys)
        assert str(bad) in err and "from_the_future" in err


@pytest.mark.parametrize("flag", ["--batch_size", "--threads", "--epochs"])
def test_zero_counts_are_refused(trained, flag, capsys):
    d, path, _ = trained
    assert f"{flag} must be >= 1, got 0" in fails(train_policy, ["--data", path, "--tokenizer", d / "tok.pt",
                                                                 flag, 0], capsys)
    assert f"{flag} must be >= 1, got 0" in fails(train_draft, ["--policy", d / "policy.pt", flag, 0], capsys)
    if flag != "--epochs":
        assert f"{flag} must be >= 1, got 0" in fails(bench_tokenizer, ["--synthetic", 4, flag, 0], capsys)
    if flag == "--threads":
        assert "--threads must be >= 1, got 0" in fails(bench_decoding, ["--policy", "p.pt", "--data", "d.hdf5",
                                                                         "--threads", 0], capsys)


def test_a_device_that_is_not_there_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "--device cuda: CUDA is not available" in fails(train_rvq_tokenizer, ["--device", "cuda",
                                                                                "--data", "x.hdf5"], capsys)
    assert "--device 'gpu9'" in fails(train_rvq_tokenizer, ["--device", "gpu9", "--data", "x.hdf5"], capsys)


@pytest.mark.parametrize("case", ["directory", "under_a_file"])
def test_an_unwritable_output_is_refused_before_any_work(trained, tmp_path, case, capsys):
    d, path, _ = trained
    blocker = tmp_path / "blocker"
    if case == "directory":
        blocker.mkdir()
        out, expect = blocker, "is a directory"
    else:
        blocker.write_text("a file")
        out, expect = blocker / "sub" / "out.pt", "is a file"
    assert expect in fails(train_policy, ["--data", path, "--tokenizer", d / "tok.pt", "--output", out], capsys)
    assert expect in fails(train_draft, ["--policy", d / "policy.pt", "--output", out], capsys)
    assert expect in fails(train_rvq_tokenizer, ["--data", path, "--output", out], capsys)
    assert expect in fails(ca, ["--output", out, "--task_id", "0", "--num_episodes", "1"], capsys)
    assert expect in fails(eval_libero, ["--policy", d / "policy.pt", "--mode", "dense", "--task_id", "0",
                                         "--json", out], capsys)


def test_a_port_answered_by_a_web_server_is_one_line(capsys):
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ca.PolicyServerError, match="is not an openpi websocket policy server"):
            ca.OpenPIPolicy("127.0.0.1", server.server_address[1])
    finally:
        server.shutdown()
