"""bench_decoding.py --pass_costs (pass_costs.py): what one main pass costs against its tokens and rows."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench_decoding
import pass_costs
import policy_models as pm
from test_rsd_engine import make_policy, make_tokenizer


def bench_args(*argv) -> bench_decoding.BenchArgs:
    return bench_decoding.build_parser().parse_args([str(a) for a in argv])


def test_pass_costs_of_a_random_default_policy_table_and_json(tmp_path, capsys):
    out = tmp_path / "passes.json"
    result = bench_decoding.main(bench_args("--pass_costs", "--pass_repeats", "3", "--warmup", "1", "--json", out))
    printed = capsys.readouterr().out
    assert "randomly initialised policy of the default architecture" in printed
    assert "d_model 128" in printed and "latent_steps 3" in printed
    assert result["policy"] is None and result["architecture"]["n_blocks"] == pm.PolicyConfig.n_blocks
    rows = result["rows"]
    shapes = {(r["batch"], r["new_tokens"]) for r in rows}
    T = pass_costs.RANDOM_POLICY_SHAPE["latent_steps"]
    assert shapes == {(1, n) for n in pass_costs.TOKENS} | {(b, T) for b in pass_costs.BATCH_ROWS}
    assert len(rows) == len(shapes)
    one_block = [r for r in rows if r["new_tokens"] == T]
    by_tokens = [r for r in rows if r["batch"] == 1]
    for series in (by_tokens, one_block):  # more tokens, more rows: more FLOPs, a longer FLOP-bound time
        flops = [r["flops"] for r in series]
        assert flops == sorted(flops) and len(set(flops)) == len(flops)
    rate = result["matmul_gflops"] * 1e9
    for r in rows:
        assert r["ms_median"] > 0 and r["cached_tokens"] == pm.PolicyConfig.obs_tokens + 1 + T
        assert r["flop_bound_ms"] == pytest.approx(1e3 * r["flops"] / rate)
        assert r["ms_per_row_token"] == pytest.approx(r["ms_median"] / (r["batch"] * r["new_tokens"]))
    assert next(r for r in rows if (r["batch"], r["new_tokens"]) == (1, 1))["vs_one_token"] == 1.0
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    for r in rows:  # every row is printed
        assert f"{r['batch']:5d} | {r['new_tokens']:10d} |" in printed


def test_pass_flops_count_the_matmuls_of_the_timed_pass():
    """The projections and heads as torch's FLOP counter counts the pass's addmm and mm, plus the
    attention's scores and weighted values (2 d S per token and block, each a multiply-add)."""
    policy = pass_costs.random_policy(latent_steps=2, num_layers=3, codebook_size=8, obs_dim=5)
    c = policy.config
    for tokens, batch in ((1, 1), (5, 1), (2, 3)):
        timed = pass_costs.CachedPass(policy, tokens, batch)
        with FlopCounterMode(display=False) as counter:
            logits = timed()
        assert logits.shape == (batch, tokens, c.vocab)
        counted = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        attention = 2 * batch * tokens * c.n_blocks * 2 * c.d_model * (timed.cached + tokens)
        matmuls = counted.get("aten.addmm", 0) + counted.get("aten.mm", 0)
        assert pass_costs.pass_flops(c, tokens, timed.cached, batch) == matmuls + attention
        # the pass leaves the cache as it found it: the same logits again
        assert torch.equal(timed(), logits)


def test_pass_costs_of_a_policy_checkpoint_and_bad_flags(tmp_path):
    tok = make_tokenizer(K=8, L=3, Tp=2)
    path = tmp_path / "policy.pt"
    pm.save_policy(make_policy(tok), str(path), "0" * 64, {})
    result = bench_decoding.main(bench_args("--pass_costs", "--policy", path, "--pass_repeats", "2", "--warmup", "0"))
    assert result["model"].startswith(f"the policy {path}") and result["architecture"]["d_model"] == 32
    assert {r["new_tokens"] for r in result["rows"] if r["batch"] > 1} == {2}
    with pytest.raises(ValueError, match="--policy is required"):
        bench_args("--data", "x.hdf5")
    with pytest.raises(ValueError, match="--data is required"):
        bench_args("--policy", path)
    with pytest.raises(ValueError, match="give one of --pass_costs, --stop_study and --coverage"):
        bench_args("--pass_costs", "--stop_study")
    with pytest.raises(ValueError, match="--pass_repeats must be >= 1"):
        bench_args("--pass_costs", "--pass_repeats", "0")
