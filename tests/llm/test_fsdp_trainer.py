"""`drdpo align --strategy fsdp` (FSDP2) under torchrun: 2 gloo processes on CPU vs 1 process.

The global batch is equal (2 ranks x 2 pairs vs 1 x 4). Checked: the metrics.csv losses of
WDPO finite-diff follow the 1-process run (the issue's bound, 1e-3; measured ~1.5e-4, the
finite-difference rounding of c = 2 rho0 / h); resuming a sharded run reproduces the
uninterrupted one; OUTPUT/final holds the gathered full weights (full fine-tuning) or a PEFT
adapter plus the merged model (LoRA) and loads with transformers / peft.
Marked ``distributed`` (``make test-dist``).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from drdpo_theory.llm.trainer import latest_checkpoint  # noqa: E402

pytestmark = [pytest.mark.llm, pytest.mark.distributed, pytest.mark.filterwarnings("ignore::FutureWarning")]

FSDP_ATOL = 1e-3  # issue 11's bound for the finite-difference estimator in fp32 (measured 1.5e-4)
RESUME_ATOL = 1e-6  # the same sharded run, interrupted and resumed

COMMON = ["--model", "tiny-random", "--data", "toy", "--lr", "1e-2", "--beta", "0.5", "--max-length", "128",
          "--no-progress", "--eval-fraction", "0.25", "--schedule", "constant"]  # constant: a 2-step run is the 4-step run cut
WDPO = ["--method", "wdpo", "--wdpo-impl", "finite-diff", "--rho0", "0.05"]


def _align(args, cwd, nproc=1, port=29631):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "drdpo_theory.llm.cli", "align", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               "-m", "drdpo_theory.llm.cli", "align", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(out, col="loss"):
    with open(out / "metrics.csv", newline="") as fh:
        return [float(r[col]) for r in csv.DictReader(fh) if r[col]]


def test_fsdp_two_processes_match_one_process_resume_and_export(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _align([*COMMON, *WDPO, "--batch-size", "4", "--max-steps", "4", "--output", "single"], tmp_path)
    proc = _align([*COMMON, *WDPO, "--strategy", "fsdp", "--batch-size", "2", "--max-steps", "4", "--output", "fsdp"],
                  tmp_path, nproc=2, port=29631)
    assert proc.stdout.count("drdpo align: wdpo") == 1  # rank 0 reports
    np.testing.assert_allclose(_losses(tmp_path / "fsdp"), _losses(tmp_path / "single"), rtol=0, atol=FSDP_ATOL)
    np.testing.assert_allclose(_losses(tmp_path / "fsdp", "eval/loss"), _losses(tmp_path / "single", "eval/loss"),
                               rtol=0, atol=FSDP_ATOL)
    # the export holds the gathered full weights of the last checkpoint
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final", local_files_only=True, dtype=torch.float32)
    saved = load_file(str(latest_checkpoint(tmp_path / "fsdp") / "trainable.safetensors"))
    params = dict(final.named_parameters())
    assert set(saved) == set(params)
    for k, v in saved.items():
        torch.testing.assert_close(params[k].detach(), v, rtol=0, atol=0)
    # interrupted after 2 steps (a checkpoint), resumed to 4: the uninterrupted sharded run
    _align([*COMMON, *WDPO, "--strategy", "fsdp", "--batch-size", "2", "--max-steps", "2", "--output", "resumed"],
           tmp_path, nproc=2, port=29632)
    _align([*COMMON, *WDPO, "--strategy", "fsdp", "--batch-size", "2", "--max-steps", "4", "--output", "resumed",
            "--resume"], tmp_path, nproc=2, port=29633)
    np.testing.assert_allclose(_losses(tmp_path / "resumed"), _losses(tmp_path / "fsdp"), rtol=0, atol=RESUME_ATOL)


def test_fsdp_lora_exports_adapter_and_merged_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from drdpo_theory.llm.models import load_model

    _align([*COMMON, "--method", "kldpo", "--strategy", "fsdp", "--batch-size", "2", "--max-steps", "2",
            "--lora", "--merge-lora", "--output", "lora"], tmp_path, nproc=2, port=29634)
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_config.json").is_file()
    peft_model = PeftModel.from_pretrained(load_model("tiny-random")[0], final)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "final-merged", local_files_only=True,
                                                  dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        a = peft_model.eval()(input_ids=ids).logits
        b = merged.eval()(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
