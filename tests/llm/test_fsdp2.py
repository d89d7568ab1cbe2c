"""DPO, KLDPO and WDPO finite-diff under raw FSDP2: 2 gloo processes on CPU vs 1 process, same global batch.

Each rank shards the tiny float32 Llama with ``fully_shard`` per decoder layer and on the
root (the embedding table and LM head live in the root's group; a second variant gives the
embedding table its own group), holds half of the pairs,
and calls :func:`~drdpo_theory.llm.objectives.preference_backward`. The loss (averaged
over ranks) and the full gradient (``DTensor.full_tensor()`` of FSDP2's reduce-scattered
shards) must equal those of one process on the whole batch. WDPO double backward must
refuse FSDP2 with a message naming finite-diff.

Marked ``distributed`` (run by ``make test-dist``): one spawn of two processes, about 30 s.
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

from drdpo_theory.llm.objectives import LossConfig, preference_backward  # noqa: E402

pytestmark = [pytest.mark.llm, pytest.mark.distributed]

WORLD = 2
N_PAIRS = 4  # global batch; 2 pairs per rank
RTOL = 1e-4  # float32, other reduction order (issue 11); measured 9e-8 (DPO, KLDPO), 1e-5 (WDPO fd, default step: rounding x c = 2 rho0 / h)
CONFIGS = {
    "dpo": dict(method="dpo", beta=0.5),
    "kldpo": dict(method="kldpo", beta=0.5, kldpo_variant="calibrated", rho=0.3),
    "wdpo-finite-diff": dict(method="wdpo", beta=0.5, rho0=0.05, wdpo_impl="finite-diff", fd_step=None),  # default step sqrt(eps32)
}


def _conftest():
    spec = importlib.util.spec_from_file_location("_llm_conftest", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _problem():
    c = _conftest()
    batch = c.make_batch(n_pairs=N_PAIRS, seed=7)
    g = torch.Generator().manual_seed(3)
    refs = (torch.randn(N_PAIRS, generator=g), torch.randn(N_PAIRS, generator=g))
    return c, batch, refs


def _rows(batch, refs, pairs):
    idx = torch.tensor(pairs)
    rows = torch.cat([idx, N_PAIRS + idx])
    return {k: v[rows] for k, v in batch.items()}, (refs[0][idx], refs[1][idx])


def _model(c):
    return c.make_tiny_llama("sdpa", dtype=torch.float32, seed=0, init_std=0.2)


def _full_grad(model):
    out = []
    for p in model.parameters():
        g = p.grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        out.append(g.flatten())
    return torch.cat(out)


def _run(model_fn, batch, refs):
    out = {}
    for name, kw in CONFIGS.items():
        model = model_fn()
        loss, m = preference_backward(model, batch, refs[0], refs[1], LossConfig(**kw), loss_scale=0.5)
        out[name + "/loss"] = loss.reshape(1)
        out[name + "/grad"] = _full_grad(model) / 0.5
        if "wdpo/penalty" in m:
            out[name + "/penalty"] = torch.tensor([m["wdpo/penalty"]])
    return out


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        torch.set_num_threads(1)
        from torch.distributed.fsdp import fully_shard

        c, batch, refs = _problem()
        pairs = list(range(rank * N_PAIRS // world, (rank + 1) * N_PAIRS // world))
        local, local_refs = _rows(batch, refs, pairs)

        def sharded(embedding_apart=False):
            model = _model(c)
            if embedding_apart:  # the embedding table in its own FSDP group (issue 11: silently wrong before)
                fully_shard(model.get_input_embeddings())
            for layer in model.model.layers:  # one FSDP group per decoder layer, then the root
                fully_shard(layer)
            fully_shard(model)
            return model

        res = _run(sharded, local, local_refs)
        res.update({f"apart/{k}": v for k, v in _run(lambda: sharded(True), local, local_refs).items()})
        for k in list(res):
            if k.endswith("/loss") or k.endswith("/penalty"):  # per-rank means -> global mean
                dist.all_reduce(res[k])
                res[k] /= world
        try:
            preference_backward(sharded(), local, *local_refs, LossConfig(method="wdpo", beta=0.5, rho0=0.05))
        except ValueError as err:
            res["double_backward_error"] = str(err)
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_ranks_match_one_process(tmp_path):
    c, batch, refs = _problem()
    one = _run(lambda: _model(c), batch, refs)
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    two = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in CONFIGS:
        for r in two:
            for prefix in ("", "apart/"):
                got = r[prefix + name + "/loss"]
                assert_close(got, one[name + "/loss"], rtol=RTOL, atol=0, msg=lambda m: f"{prefix}{name} loss: {m}")
                g1, g2 = one[name + "/grad"], r[prefix + name + "/grad"]
                err = float((g2 - g1).norm() / g1.norm())
                assert err < RTOL, (prefix + name, err)
    assert_close(two[0]["wdpo-finite-diff/penalty"], one["wdpo-finite-diff/penalty"], rtol=RTOL, atol=0)
    # the penalty is a sizeable part of the objective, so the WDPO comparison is not DPO's again
    assert float(one["wdpo-finite-diff/penalty"]) > 0.05 * float(one["wdpo-finite-diff/loss"])
    for r in two:
        assert "not supported under fsdp2" in r["double_backward_error"]
        assert "finite-diff" in r["double_backward_error"]
