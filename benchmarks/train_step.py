"""Training-step cost of DPO, KLDPO and the two WDPO gradient estimators, side by side.

One run, one model, one batch. For each method: median wall time of ``--steps`` timed
steps (forward + backward via :func:`drdpo_theory.llm.objectives.preference_backward`, as
the native trainer does, no optimizer step) after ``--warmup`` untimed ones, answer+prompt
tokens per second, and peak memory during the timed steps; ratios are to DPO. WDPO
finite-diff is timed twice: "two-pass" (``preference_backward``: forward-backward at e,
then at e + h g, one graph alive at a time) and "surrogate" (``preference_loss(...)
.backward()``, the single differentiable loss TRL's ``compute_loss`` needs: an extra
embedding-gradient backward, both graphs alive in the final backward). Then the cosine
between the finite-difference (both executions) and double-backward WDPO gradients (whole
gradient, and its penalty part, i.e. minus the DPO gradient). "CPU ms" is the median process CPU time of a step
(all threads; useful on a shared CPU, meaningless on GPU where the work is on the device).

Memory:
* GPU: ``torch.cuda.max_memory_allocated`` over the timed steps (peak) and the same minus
  the allocation before them (the step's own working memory: activations, gradients).
* CPU: peak resident set size from ``/proc/self/status`` (VmHWM, reset before each method
  by writing 5 to ``/proc/self/clear_refs``, after ``gc`` and ``malloc_trim``) minus the
  RSS before the method. Coarse (allocator caching shows), but per method. Without
  ``/proc``, it falls back to ``resource.getrusage`` ru_maxrss deltas, which only grow.
* Both: "alloc MiB", the peak of the bytes allocated by torch during one extra untimed
  step, above what was allocated before it (GPU: ``max_memory_allocated``; CPU: the
  ``[memory]`` events of ``torch.profiler`` with ``profile_memory=True``, summed in time
  order; the profiler prints a few ``USDT ... profiler_start/stop`` lines on stderr):
  exact, free of allocator caching and fragmentation. The memory goal of the
  WDPO estimator is stated on this number. "saved MiB", the peak bytes of the tensors autograd holds for backward (counted
  with ``torch.autograd.graph.saved_tensors_hooks`` in one extra untimed step; a tensor
  saved by several nodes counts each time, parameters included): the activation memory
  of the graphs alive at once, exact and independent of the allocator.

Attention: DPO, KLDPO and WDPO finite-diff run with SDPA; WDPO double-backward needs
eager attention and switches the same model to it (with a warning); "DPO (eager)" is then
timed too, to separate the cost of eager attention from that of the penalty.

Usage::

    python benchmarks/train_step.py                 # CPU, tiny random Llama, float32
    python benchmarks/train_step.py --gpu --json    # Llama-3.2-1B-shaped, bf16, 8 x 512
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import run_info  # noqa: E402  (benchmarks/_meta.py, next to this script)
from drdpo_theory.llm.attention import attention_implementation  # noqa: E402
from drdpo_theory.llm.logprobs import concatenated_logps  # noqa: E402
from drdpo_theory.llm.objectives import LossConfig, preference_backward, preference_loss  # noqa: E402

CPU_PRESET = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, pairs=4,
                  seq_len=128, dtype="float32", device="cpu", steps=10, warmup=2)
GPU_PRESET = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, pairs=8,
                  seq_len=512, dtype="bfloat16", device="cuda", steps=10, warmup=3)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="Llama-3.2-1B-shaped config on CUDA in bf16, 8 pairs x 512 tokens")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="all numbers as JSON: one line at the end of stdout, or written to PATH "
                        "(what `drdpo reproduce --collect --only bench-train-step` reads from results/bench/train_step.json)")
    for k in CPU_PRESET:
        p.add_argument("--" + k.replace("_", "-"), default=None, type=str if k in ("dtype", "device") else int,
                       help=f"override the preset (CPU default {CPU_PRESET[k]}, --gpu {GPU_PRESET[k]})")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--tau", type=float, default=1.0, help="KLDPO temperature (clamped variant, clamp 10)")
    p.add_argument("--rho0", type=float, default=0.01, help="WDPO penalty weight")
    p.add_argument("--fd-step", type=float, default=None, help="WDPO finite-diff relative step (default sqrt(eps))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    preset = GPU_PRESET if args.gpu else CPU_PRESET
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def build_model(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(a.seed)
    config = LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        max_position_embeddings=max(2 * a.seq_len, 128), tie_word_embeddings=a.gpu,  # Llama-3.2-1B ties
        attn_implementation="sdpa",
    )
    with torch.device(a.device):
        model = LlamaForCausalLM(config)
    return model.to(DTYPES[a.dtype]).train()


def build_batch(a):
    g = torch.Generator().manual_seed(a.seed + 1)
    b, t = a.pairs, a.seq_len
    prompt = torch.randint(0, a.vocab, (b, t // 2), generator=g)
    answers = torch.randint(0, a.vocab, (2 * b, t - t // 2), generator=g)
    ids = torch.cat([prompt.repeat(2, 1), answers], dim=1)  # (2B, T): chosen rows, then rejected
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, t // 2 :] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
    return {k: v.to(a.device) for k, v in batch.items()}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class MemoryMeter:
    """Peak memory of a code region (see the module docstring for what is measured)."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        self.proc = Path("/proc/self/clear_refs").exists()
        self.kind = ("torch.cuda.max_memory_allocated" if self.cuda
                     else "RSS peak (VmHWM after clear_refs) - RSS before" if self.proc
                     else "ru_maxrss delta (monotone)")

    @staticmethod
    def _status(key):
        return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.proc:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap so the next peak is its own
            except OSError:
                pass
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS")
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self):
        """(peak total bytes, peak minus the memory before start)."""
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
        elif self.proc:
            peak = self._status("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak - self.base


def flat_grad(model):
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def run_step(model, batch, refs, cfg, surrogate=False):
    """One forward + backward: preference_backward, or (surrogate) preference_loss(...).backward()."""
    model.zero_grad(set_to_none=True)
    if surrogate:
        loss, _ = preference_loss(model, batch, refs[0], refs[1], cfg)
        loss.backward()
        return loss.detach()
    loss, _ = preference_backward(model, batch, refs[0], refs[1], cfg)
    return loss


def measure(model, batch, refs, cfg, a, meter, surrogate=False):
    for _ in range(a.warmup):
        run_step(model, batch, refs, cfg, surrogate)
    model.zero_grad(set_to_none=True)
    sync(a.device)
    meter.start()
    times, cpu_times = [], []
    for _ in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        run_step(model, batch, refs, cfg, surrogate)
        sync(a.device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak, delta = meter.stop()
    return statistics.median(times), statistics.median(cpu_times), peak, delta


class _Saved:
    """A tensor saved for backward; counts its bytes while autograd holds it."""

    def __init__(self, t, meter):
        self.t, self.meter, self.n = t, meter, t.numel() * t.element_size()
        meter["live"] += self.n
        meter["peak"] = max(meter["peak"], meter["live"])

    def __del__(self):
        self.meter["live"] -= self.n


def saved_peak(model, batch, refs, cfg, surrogate):
    """Peak bytes of tensors saved for backward during one step."""
    meter = {"live": 0, "peak": 0}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(t, meter), lambda s: s.t):
        run_step(model, batch, refs, cfg, surrogate)
    return meter["peak"]


def alloc_peak(model, batch, refs, cfg, surrogate, device):
    """Peak bytes allocated by torch during one step, above the allocation before it (nan if unknown)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_step(model, batch, refs, cfg, surrogate)
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step(model, batch, refs, cfg, surrogate)
    try:  # allocation (+) and free (-) events of the CPU allocator, in time order
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return float("nan")
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def cosine(u, v):
    u, v = u.double(), v.double()
    return float(u @ v / (u.norm() * v.norm()))


def main(argv=None):
    a = parse_args(argv)
    load0 = os.getloadavg()[0]
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--gpu/--device cuda requested but CUDA is not available")
    torch.set_grad_enabled(True)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, batch = build_model(a), build_batch(a)
    with torch.no_grad():  # reference log-probs: the initial policy (as at the start of DPO)
        refs = concatenated_logps(model, batch)
    n_tokens = int(batch["attention_mask"].sum())
    base = dict(beta=a.beta)
    fd = LossConfig(method="wdpo", wdpo_impl="finite-diff", rho0=a.rho0, fd_step=a.fd_step, **base)
    methods = [  # (row, config, surrogate execution)
        ("DPO", LossConfig(method="dpo", **base), False),
        ("KLDPO (clamped)", LossConfig(method="kldpo", kldpo_variant="clamped", tau=a.tau, clamp=10.0, **base), False),
        ("WDPO fd two-pass", fd, False),
        ("WDPO fd surrogate", fd, True),
        ("WDPO double-backward", LossConfig(method="wdpo", wdpo_impl="double-backward", rho0=a.rho0, **base), False),
        ("DPO (eager)", LossConfig(method="dpo", **base), False),
    ]
    meter = MemoryMeter(a.device)
    rows, grads = [], {}
    for name, cfg, surrogate in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the expected switch-to-eager warning of double backward
            med, cpu_med, peak, delta = measure(model, batch, refs, cfg, a, meter, surrogate)
            saved = saved_peak(model, batch, refs, cfg, surrogate)
            alloc = alloc_peak(model, batch, refs, cfg, surrogate, a.device)
            run_step(model, batch, refs, cfg, surrogate)
        if name in ("DPO", "WDPO fd two-pass", "WDPO fd surrogate", "WDPO double-backward"):
            grads[name] = flat_grad(model)
        rows.append(dict(method=name, attn=attention_implementation(model), step_s=med, cpu_s=cpu_med,
                         tokens_per_s=n_tokens / med, peak_bytes=peak, step_bytes=delta, alloc_bytes=alloc, saved_bytes=saved))
        model.zero_grad(set_to_none=True)
    ref = rows[0]
    for r in rows:
        r["time_ratio"] = r["step_s"] / ref["step_s"]
        r["cpu_ratio"] = r["cpu_s"] / ref["cpu_s"]
        r["peak_ratio"] = r["peak_bytes"] / ref["peak_bytes"]
        r["step_mem_ratio"] = r["step_bytes"] / ref["step_bytes"] if ref["step_bytes"] > 0 else float("nan")
        r["alloc_ratio"] = r["alloc_bytes"] / ref["alloc_bytes"]
        r["saved_ratio"] = r["saved_bytes"] / ref["saved_bytes"]
    g_dpo, g_db = grads["DPO"], grads["WDPO double-backward"]
    cos = {k: (cosine(grads[k], g_db), cosine(grads[k] - g_dpo, g_db - g_dpo))
           for k in ("WDPO fd two-pass", "WDPO fd surrogate")}
    cos_full, cos_pen = cos["WDPO fd two-pass"]

    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {dev}; torch {torch.__version__}; {a.dtype}; Llama hidden={a.hidden} layers={a.layers} "
          f"heads={a.heads}/{a.kv_heads} inter={a.intermediate} vocab={a.vocab} ({n_params / 1e6:.2f}M params); "
          f"{a.pairs} pairs x {a.seq_len} tokens; median of {a.steps} steps after {a.warmup} warmup")
    print(f"memory: {meter.kind}")
    mib = 2.0**20
    header = f"| {'method':<22} | {'attn':<5} | {'step ms':>9} | {'x DPO':>6} | {'CPU ms':>9} | {'x DPO':>6} | {'tokens/s':>9} | {'peak MiB':>9} | {'x DPO':>6} | {'step MiB':>9} | {'x DPO':>6} | {'alloc MiB':>9} | {'x DPO':>6} | {'saved MiB':>9} | {'x DPO':>6} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['method']:<22} | {r['attn']:<5} | {1e3 * r['step_s']:>9.1f} | {r['time_ratio']:>6.2f} | "
              f"{1e3 * r['cpu_s']:>9.1f} | {r['cpu_ratio']:>6.2f} | {r['tokens_per_s']:>9.0f} | {r['peak_bytes'] / mib:>9.1f} | {r['peak_ratio']:>6.2f} | "
              f"{r['step_bytes'] / mib:>9.1f} | {r['step_mem_ratio']:>6.2f} | {r['alloc_bytes'] / mib:>9.1f} | {r['alloc_ratio']:>6.2f} | {r['saved_bytes'] / mib:>9.1f} | {r['saved_ratio']:>6.2f} |")
    for k, (cf, cp) in cos.items():
        print(f"gradient cosine {k} vs double-backward: {cf:.6f} (whole), {cp:.6f} (penalty part)")
    if a.json:
        doc = dict(device=dev, torch=torch.__version__, config=vars(a), n_params=n_params,
                   memory_kind=meter.kind, rows=rows, cos_fd_db=cos_full, cos_fd_db_penalty=cos_pen,
                   cos_fd_surrogate_db=cos["WDPO fd surrogate"][0],
                   cos_fd_surrogate_db_penalty=cos["WDPO fd surrogate"][1], **run_info("train_step.py", argv, load0))
        if a.json == "-":
            print(json.dumps(doc))
        else:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
            print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
