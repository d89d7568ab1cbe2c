"""KLDPO and WDPO under data parallelism: 2 gloo processes vs 1 process on the whole batch (one spawn, in one test).

Each rank holds half the pairs; the KLDPO weights are computed on the all-gathered losses
(drdpo_theory.llm.losses.kldpo_weights, gather=True) and gradients are averaged by
torch.nn.parallel.DistributedDataParallel. With equal per-rank batches, DDP's average of
the per-rank mean losses is the global mean, so one SGD step must give the same
parameters as a single process on the concatenated batch.
"""

from __future__ import annotations

import datetime
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

pytest.importorskip("transformers")

from drdpo_theory.llm import distributed as D  # noqa: E402
from drdpo_theory.llm.logprobs import concatenated_logps  # noqa: E402
from drdpo_theory.llm.losses import dpo_loss, kldpo_weights  # noqa: E402
from drdpo_theory.llm.objectives import LossConfig, preference_backward, preference_loss  # noqa: E402

pytestmark = pytest.mark.llm

WORLD = 2
N_PAIRS = 4  # global batch; 2 pairs per rank
LR = 0.5
RTOL = 1e-9
ATOL = 1e-12
CONFIGS = {
    "kldpo-clamped": dict(method="kldpo", beta=0.5, kldpo_variant="clamped", tau=0.2, clamp=3.0),
    "kldpo-normalized": dict(method="kldpo", beta=0.5, kldpo_variant="normalized", tau=0.2),
    "kldpo-calibrated": dict(method="kldpo", beta=0.5, kldpo_variant="calibrated", rho=0.3),
    "wdpo-finite-diff": dict(method="wdpo", beta=0.5, rho0=0.05, wdpo_impl="finite-diff", fd_step=1e-4),
    "wdpo-double-backward": dict(method="wdpo", beta=0.5, rho0=0.05, wdpo_impl="double-backward"),
    "wdpo-finite-diff-two-pass": dict(method="wdpo", beta=0.5, rho0=0.05, wdpo_impl="finite-diff", fd_step=1e-4),
}
TWO_PASS = {"wdpo-finite-diff-two-pass"}  # stepped with preference_backward (the others: preference_loss + backward)


def _conftest():
    spec = importlib.util.spec_from_file_location("_llm_conftest", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _problem():
    c = _conftest()
    batch = c.make_batch(n_pairs=N_PAIRS, seed=7)
    g = torch.Generator().manual_seed(3)
    refs = (torch.randn(N_PAIRS, dtype=torch.float64, generator=g), torch.randn(N_PAIRS, dtype=torch.float64, generator=g))
    return c, batch, refs


def _rows(batch, refs, pairs):
    """Sub-batch of the given pairs: their chosen rows, then their rejected rows."""
    idx = torch.tensor(pairs)
    rows = torch.cat([idx, N_PAIRS + idx])
    return {k: v[rows] for k, v in batch.items()}, (refs[0][idx], refs[1][idx])


def _counting_allreduce(calls):
    """DDP comm hook: the default all-reduce, appending to ``calls`` once per bucket reduced."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    return hook


def _run(model_fn, batch, refs, train_model=None):
    """Weights (KLDPO, on the pre-step model) and parameters after one SGD step, per config."""
    out = {}
    for name, kw in CONFIGS.items():
        cfg = LossConfig(**kw)
        model = model_fn()
        net = train_model(model) if train_model else model
        if cfg.method == "kldpo":
            with torch.no_grad():
                pc, pr = concatenated_logps(model, batch)
            out[name + "/weights"] = kldpo_weights(
                dpo_loss(pc, pr, refs[0], refs[1], cfg.beta), tau=cfg.tau, variant=cfg.kldpo_variant,
                rho=cfg.rho, clamp=cfg.clamp,
            )
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        calls = []
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net.register_comm_hook(None, _counting_allreduce(calls))
        if name in TWO_PASS:
            preference_backward(net, batch, refs[0], refs[1], cfg)
        else:
            loss, _ = preference_loss(net, batch, refs[0], refs[1], cfg)
            loss.backward()
        opt.step()
        out[name + "/allreduces"] = len(calls)
        out[name + "/params"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    return out


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        c, batch, refs = _problem()
        pairs = list(range(rank * N_PAIRS // world, (rank + 1) * N_PAIRS // world))
        local, local_refs = _rows(batch, refs, pairs)
        ddp = lambda m: torch.nn.parallel.DistributedDataParallel(m)  # noqa: E731
        res = _run(lambda: c.make_tiny_llama("eager", seed=0), local, local_refs, train_model=ddp)
        # variable-size gather: rank r sends r + 2 values r, r, ...
        res["gather"] = D.all_gather_detached(torch.full((rank + 2,), float(rank)))
        res["world_size"], res["rank"] = D.world_size(), D.rank()
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn_two_ranks(tmp):
    mp.spawn(_worker, args=(WORLD, str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process_results():
    c, batch, refs = _problem()
    assert not D.is_distributed()
    return _run(lambda: c.make_tiny_llama("eager", seed=0), batch, refs)


def test_two_ranks_match_one_process(tmp_path, one_process_results):
    """One spawn (kept in a single test so pytest-xdist cannot split it) checks every config.

    * KLDPO weights (3 variants) gathered over ranks = the single-process weights;
    * parameters after one DDP SGD step are identical on both ranks and equal the
      single-process step, for KLDPO (3 variants) and WDPO (both estimators; finite-diff
      also through preference_backward's two passes, which all-reduce gradients once);
    * ``all_gather_detached`` with different sizes per rank.
    """
    two = _spawn_two_ranks(tmp_path)
    one = one_process_results
    for name in CONFIGS:
        if name.startswith("kldpo"):
            got = torch.cat([r[name + "/weights"] for r in two])  # rank 0 rows, then rank 1 rows
            assert_close(got, one[name + "/weights"], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name} weights: {m}")
            # non-trivial weights (not all 1), so the comparison has something to check
            assert (got - 1.0).abs().max() > 1e-3, name
        p0, p1 = (r[name + "/params"] for r in two)
        assert_close(p0, p1, rtol=0, atol=0, msg=lambda m: f"{name}: replicas differ: {m}")
        assert_close(p0, one[name + "/params"], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name} params: {m}")
    for r in two:
        # the two-pass WDPO backward all-reduces gradients once (its first pass runs in no_sync),
        # like the single-backward methods
        assert r["wdpo-finite-diff-two-pass/allreduces"] == r["kldpo-clamped/allreduces"] >= 1
        assert r["world_size"] == WORLD
        assert [t.tolist() for t in r["gather"]] == [[0.0, 0.0], [1.0, 1.0, 1.0]]
    assert [r["rank"] for r in two] == [0, 1]


def test_local_weights_without_gather_differ(one_process_results):
    """Control: weights computed on one rank's half alone are not the global ones."""
    c, batch, refs = _problem()
    cfg = LossConfig(**CONFIGS["kldpo-calibrated"])
    local, local_refs = _rows(batch, refs, [0, 1])
    with torch.no_grad():
        pc, pr = concatenated_logps(c.make_tiny_llama("eager", seed=0), local)
    w_local = kldpo_weights(dpo_loss(pc, pr, *local_refs, cfg.beta), variant="calibrated", rho=cfg.rho)
    w_global = one_process_results["kldpo-calibrated/weights"][:2]
    assert (w_local - w_global).abs().max() > 1e-3


def test_helpers_without_process_group():
    x = torch.arange(3.0, requires_grad=True)
    (y,) = D.all_gather_detached(x)
    assert not D.is_distributed() and D.world_size() == 1 and D.rank() == 0
    assert not y.requires_grad
    assert_close(y, x.detach(), rtol=0, atol=0)
