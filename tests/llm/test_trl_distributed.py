"""TRL adapter under DDP, DeepSpeed ZeRO-2 and ZeRO-3: 2 gloo processes on CPU vs 1 process, same global batch.

A TRL user's script (tests/llm/trl_dist_worker.py: DPOConfig with ``deepspeed={"zero_optimization":
{"stage": S}}``, the tiny model, float32, SGD, 8 pairs per step) runs under
``torchrun --nproc_per_node 2`` for DPO (the adapter's base class), KLDPO and WDPO finite-diff
(two-pass ``training_step``), and once in a single process without DeepSpeed. The logged
``loss`` (averaged over ranks by the Trainer), ``grad_norm`` (DeepSpeed's global norm vs
the single process's) and the adapter's metrics (averaged over ranks) must agree at every
step, and so must ``evaluate()`` of the trained policy (``eval_loss``: for WDPO the
penalised objective, whose embedding gradient is taken inside TRL's no_grad evaluation).

Tolerance: 1e-4 relative (issue 11), except WDPO finite-diff after its first step. Its
gradient is (1 - c) P1 + c P2 with c = 2 rho0 / h, and the default float32 step makes
c ~ 2.5e3 at step 1 here, so the float32 rounding of P1 and P2 (~6e-8, in another
reduction order on 2 ranks) reaches ~1.5e-4 of the gradient; it enters the parameters and
shows in the later steps' values (measured up to 1.9e-4 under ZeRO-3). The first step,
whose gradient norm compares the estimators before any update, is held to 1e-4.

Marked ``distributed`` (``make test-dist``); needs ``deepspeed`` (extra ``distributed``).
About 3 minutes on 2 CPU cores (measured errors: DPO, KLDPO <= 2.1e-6; WDPO step 1 <= 7.6e-6). The reference model is passed explicitly: with
``precompute_ref_log_probs=True`` TRL 1.16's own DPOTrainer fails under ZeRO-3 on CPU
("pop from an empty deque" in DeepSpeed's parameter trace, same with plain ``trl.DPOTrainer``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.llm, pytest.mark.distributed]

WORKER = Path(__file__).with_name("trl_dist_worker.py")
RTOL = 1e-4
RTOL_FD_LATER = 1e-3  # WDPO finite-diff after step 1 (module docstring)
METRICS = ("loss", "grad_norm", "dpo_loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
           "wdpo/penalty", "wdpo/grad_emb_norm")


def _torchrun(nproc, out, *extra):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(29500 + (os.getpid() % 1000)),
           str(WORKER), str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(Path(out).read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _torchrun(1, tmp_path_factory.mktemp("one") / "out.json")


def _compare(two, one):
    names = ("dpo", "kldpo", "wdpo-finite-diff")
    assert two.keys() == one.keys() == set(names) | {n + "/eval" for n in names}
    for name in names:
        e2, e1 = two[name + "/eval"], one[name + "/eval"]  # evaluation of the trained policy, every method
        rtol = RTOL_FD_LATER if name.startswith("wdpo") else RTOL
        for m in ("eval_loss", "eval_dpo_loss", "eval_rewards/margins", "eval_wdpo/penalty"):
            if m in e1:
                assert abs(e2[m] - e1[m]) <= rtol * abs(e1[m]), (name, m, e2[m], e1[m])
    for name in names:
        assert len(two[name]) == len(one[name]) == 3, name
        for h2, h1 in zip(two[name], one[name]):
            assert h2["step"] == h1["step"]
            rtol = RTOL_FD_LATER if name.startswith("wdpo") and h1["step"] > 1 else RTOL
            for m in METRICS:
                if m in h1:
                    err = abs(h2[m] - h1[m]) / max(abs(h1[m]), 1e-8)
                    assert err <= rtol, (name, h1["step"], m, h2[m], h1[m], err)
    # the runs move (step 3 differs from step 1) and WDPO's penalty matters at step 1
    assert one["dpo"][2]["loss"] < one["dpo"][0]["loss"]
    assert one["wdpo-finite-diff"][0]["wdpo/penalty"] > one["wdpo-finite-diff"][0]["dpo_loss"]


@pytest.mark.parametrize("stage", [None, 2, 3], ids=["ddp", "zero2", "zero3"])
def test_trl_two_processes_match_one_process(tmp_path, one_process, stage):
    """DDP (accelerate without DeepSpeed: the two-pass WDPO's first pass in no_sync), ZeRO-2, ZeRO-3."""
    extra = () if stage is None else ("--zero", str(stage))
    two = _torchrun(2, tmp_path / "out.json", *extra)
    _compare(two, one_process)


def test_trl_zero3_with_gradient_accumulation(tmp_path, one_process):
    """ZeRO-3, 2 processes x 2 micro-batches of 2 pairs: the two-pass step inside DeepSpeed's accumulation.

    DPO follows the 1-process, 1-micro-batch run at every step (1e-4). KLDPO and WDPO
    define their weights / finite-difference step per micro-batch, so only their first
    logged loss (the objective at the initial parameters, a mean over micro-batches) is
    compared; the later steps stay close (measured <= 2e-4 relative for WDPO against the
    1-process run with 4 micro-batches of 2 pairs).
    """
    two = _torchrun(2, tmp_path / "out.json", "--zero", "3", "--gas", "2")
    for h2, h1 in zip(two["dpo"], one_process["dpo"]):
        for m in ("loss", "grad_norm", "dpo_loss", "rewards/margins"):
            assert abs(h2[m] - h1[m]) <= RTOL * abs(h1[m]), ("dpo", h1["step"], m, h2[m], h1[m])
    for name in ("kldpo", "wdpo-finite-diff"):
        h2, h1 = two[name][0], one_process[name][0]
        assert abs(h2["loss"] - h1["loss"]) <= RTOL * abs(h1["loss"]), (name, h2["loss"], h1["loss"])
        assert all(abs(h["loss"]) < 10 for h in two[name]), name
