"""Training-step cost of DPO, KLDPO and the two WDPO gradient estimators, side by side.

One run, one model, one batch. For each method: median wall time of ``--steps`` timed
steps (forward + backward of :func:`drdpo_theory.llm.objectives.preference_loss`, no
optimizer step) after ``--warmup`` untimed ones, answer+prompt tokens per second, and peak
memory during the timed steps; ratios are to DPO. Then the cosine between the
finite-difference and double-backward WDPO gradients (whole gradient, and its penalty
part, i.e. minus the DPO gradient). "CPU ms" is the median process CPU time of a step
(all threads; useful on a shared CPU, meaningless on GPU where the work is on the device).

Memory:
* GPU: ``torch.cuda.max_memory_allocated`` over the timed steps (peak) and the same minus
  the allocation before them (the step's own working memory: activations, gradients).
* CPU: peak resident set size from ``/proc/self/status`` (VmHWM, reset before each method
  by writing 5 to ``/proc/self/clear_refs``, after ``gc`` and ``malloc_trim``) minus the
  RSS before the method. Coarse (allocator caching shows), but per method. Without
  ``/proc`` it falls back to ``resource.getrusage`` ru_maxrss deltas, which only grow.

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

from drdpo_theory.llm.attention import attention_implementation  # noqa: E402
from drdpo_theory.llm.logprobs import concatenated_logps  # noqa: E402
from drdpo_theory.llm.objectives import LossConfig, preference_loss  # noqa: E402

CPU_PRESET = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, pairs=4,
                  seq_len=128, dtype="float32", device="cpu", steps=10, warmup=2)
GPU_PRESET = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, pairs=8,
                  seq_len=512, dtype="bfloat16", device="cuda", steps=10, warmup=3)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="Llama-3.2-1B-shaped config on CUDA in bf16, 8 pairs x 512 tokens")
    p.add_argument("--json", action="store_true", help="print one JSON line with all numbers at the end")
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


def run_step(model, batch, refs, cfg):
    model.zero_grad(set_to_none=True)
    loss, _ = preference_loss(model, batch, refs[0], refs[1], cfg)
    loss.backward()
    return loss


def measure(model, batch, refs, cfg, a, meter):
    for _ in range(a.warmup):
        run_step(model, batch, refs, cfg)
    model.zero_grad(set_to_none=True)
    sync(a.device)
    meter.start()
    times, cpu_times = [], []
    for _ in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        run_step(model, batch, refs, cfg)
        sync(a.device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak, delta = meter.stop()
    return statistics.median(times), statistics.median(cpu_times), peak, delta


def cosine(u, v):
    u, v = u.double(), v.double()
    return float(u @ v / (u.norm() * v.norm()))


def main(argv=None):
    a = parse_args(argv)
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
    methods = [
        ("DPO", LossConfig(method="dpo", **base)),
        ("KLDPO (clamped)", LossConfig(method="kldpo", kldpo_variant="clamped", tau=a.tau, clamp=10.0, **base)),
        ("WDPO finite-diff", LossConfig(method="wdpo", wdpo_impl="finite-diff", rho0=a.rho0, fd_step=a.fd_step, **base)),
        ("WDPO double-backward", LossConfig(method="wdpo", wdpo_impl="double-backward", rho0=a.rho0, **base)),
        ("DPO (eager)", LossConfig(method="dpo", **base)),
    ]
    meter = MemoryMeter(a.device)
    rows, grads = [], {}
    for name, cfg in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the expected switch-to-eager warning of double backward
            med, cpu_med, peak, delta = measure(model, batch, refs, cfg, a, meter)
            run_step(model, batch, refs, cfg)
        if name in ("DPO", "WDPO finite-diff", "WDPO double-backward"):
            grads[name] = flat_grad(model)
        rows.append(dict(method=name, attn=attention_implementation(model), step_s=med, cpu_s=cpu_med,
                         tokens_per_s=n_tokens / med, peak_bytes=peak, step_bytes=delta))
        model.zero_grad(set_to_none=True)
    ref = rows[0]
    for r in rows:
        r["time_ratio"] = r["step_s"] / ref["step_s"]
        r["cpu_ratio"] = r["cpu_s"] / ref["cpu_s"]
        r["peak_ratio"] = r["peak_bytes"] / ref["peak_bytes"]
        r["step_mem_ratio"] = r["step_bytes"] / ref["step_bytes"] if ref["step_bytes"] > 0 else float("nan")
    g_dpo, g_fd, g_db = grads["DPO"], grads["WDPO finite-diff"], grads["WDPO double-backward"]
    cos_full, cos_pen = cosine(g_fd, g_db), cosine(g_fd - g_dpo, g_db - g_dpo)

    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {dev}; torch {torch.__version__}; {a.dtype}; Llama hidden={a.hidden} layers={a.layers} "
          f"heads={a.heads}/{a.kv_heads} inter={a.intermediate} vocab={a.vocab} ({n_params / 1e6:.2f}M params); "
          f"{a.pairs} pairs x {a.seq_len} tokens; median of {a.steps} steps after {a.warmup} warmup")
    print(f"memory: {meter.kind}")
    mib = 2.0**20
    header = f"| {'method':<22} | {'attn':<5} | {'step ms':>9} | {'x DPO':>6} | {'CPU ms':>9} | {'x DPO':>6} | {'tokens/s':>9} | {'peak MiB':>9} | {'x DPO':>6} | {'step MiB':>9} | {'x DPO':>6} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['method']:<22} | {r['attn']:<5} | {1e3 * r['step_s']:>9.1f} | {r['time_ratio']:>6.2f} | "
              f"{1e3 * r['cpu_s']:>9.1f} | {r['cpu_ratio']:>6.2f} | {r['tokens_per_s']:>9.0f} | {r['peak_bytes'] / mib:>9.1f} | {r['peak_ratio']:>6.2f} | "
              f"{r['step_bytes'] / mib:>9.1f} | {r['step_mem_ratio']:>6.2f} |")
    print(f"gradient cosine finite-diff vs double-backward: {cos_full:.6f} (whole), {cos_pen:.6f} (penalty part)")
    if a.json:
        print(json.dumps(dict(device=dev, torch=torch.__version__, config=vars(a), n_params=n_params,
                              memory_kind=meter.kind, rows=rows, cos_fd_db=cos_full, cos_fd_db_penalty=cos_pen)))


if __name__ == "__main__":
    main()
