r"""Preference-shift experiment on a real causal LM: DPO vs KLDPO vs WDPO (``drdpo llm-shift``).

The offline, small-scale counterpart of the paper's Emotion Alignment experiment (Xu et al.
2025, arXiv 2502.01930): preference data are labelled with one mixture
:math:`r_{\alpha_0}` of two reward objectives; the trained policies are evaluated with
:math:`r_\alpha` for :math:`\alpha` across [0, 1], i.e. as the test-time preference moves away
from the training mixture (rewards: :mod:`drdpo_theory.llm.shift.rewards`).

Stages (each caches its output under ``out/`` and is skipped when already complete; the
sampling stages also resume inside the stage, one generation batch at a time)

1. ``samples.jsonl``     K completions per train prompt from the initial policy
                         (temperature sampling), one JSON row per completion;
2. ``scores.json``       raw objective values of every sample and the normaliser
                         (mean/std per objective over this pool);
3. ``pairs.jsonl``       one pair per train prompt in TRL's conversational format: chosen =
                         the sample with the largest :math:`r_{\alpha_0}`, rejected = the one
                         with the smallest (deterministic top-vs-bottom; prompts whose K
                         samples tie are dropped);
4. ``train/<run>/``      one training run per method (and seed) from the same initial
                         policy with :func:`drdpo_theory.llm.trainer.train` (metrics.csv,
                         checkpoints; resumes from the newest checkpoint);
5. ``eval/<run>.jsonl``  M completions per test prompt from each trained policy and from the
                         initial policy (``reference``), with their objective values;
6. ``results.json``, ``results.csv``, ``results.md`` and the figure: the mean of
   :math:`r_\alpha` over test completions for each :math:`\alpha`, with percentile-bootstrap
   95% intervals over test prompts (per-prompt means, averaged over seeds), and the paired
   difference to DPO with its interval.

``config.json`` records the settings; rerunning into the same ``out`` with settings that
change what a stage computes is refused (use a new directory); adding runs (more ``taus``,
``rho0s``, ``seeds``, ``methods``) reuses every cached stage.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from drdpo_theory.io import read_json, save_figure, write_json, write_text
from drdpo_theory.llm.shift.prompts import Prompt, load_prompts
from drdpo_theory.llm.shift.rewards import (
    OBJECTIVES,
    VADER_OBJECTIVES,
    Normalizer,
    mixture_reward,
    objective_correlation,
    score_texts,
)

__all__ = [
    "PRESETS",
    "ShiftConfig",
    "ShiftResult",
    "bootstrap_mean_ci",
    "bootstrap_seeds_prompts_ci",
    "calibrate_radii",
    "build_pairs",
    "paired_significance",
    "generate_completions",
    "markdown_table",
    "objective_conflict",
    "plot_shift",
    "run_shift",
    "summarize",
]

RESULT_FIELDS = ("figure", "table", "json_out", "n_boot", "progress", "threads", "workers")
"""Settings that do not change any cached stage (free to differ on a rerun)."""

RUN_SET_FIELDS = ("methods", "taus", "rho0s", "wdpo_penalties", "seeds", "kl_radii", "penalty_fractions")
"""Settings that only select which training runs to do and report: a rerun may add runs
(another tau, rho0, WDPO penalty or seed) to a directory and reuses every cached stage; the
summary lists the runs of the current call."""

WDPO_PENALTIES = ("rows", "tuple")


def _h(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ShiftConfig:
    """Settings of one preference-shift experiment; every field documents itself in ``metadata['help']``."""

    out: str = _h("Output directory (all stages cache here).", default="runs/llm_shift")
    model: str = _h("Policy: 'tiny-random', 'smollm2' or a local model path (models.load_model).", default="smollm2")
    objectives: tuple[str, str] = _h("The two reward objectives (r_1, r_2) of r_alpha = alpha z_1 + (1-alpha) z_2.", default=("positivity", "calm"))
    alpha0: float = _h("Training mixture weight alpha0 in [0, 1] used to label the pairs.", default=0.5)
    alphas: tuple[float, ...] = _h("Test mixture weights alpha (>= 2 values in [0, 1]).", default=tuple(round(0.1 * i, 1) for i in range(11)))
    n_train: int = _h("Number of train prompts (from the shipped set, first n of the split).", default=96)
    n_test: int = _h("Number of test prompts.", default=100)
    k: int = _h("Completions sampled per train prompt (K >= 2).", default=4)
    eval_samples: int = _h("Completions sampled per test prompt and policy (M >= 1).", default=1)
    max_new_tokens: int = _h("Maximum new tokens per completion.", default=24)
    system_prompt: str | None = _h(
        "System message put before every prompt (None: the chat template's default; SmolLM2's is ~20 tokens).",
        default="You are a helpful assistant.",
    )
    temperature: float = _h("Sampling temperature (> 0); top-p = 1, top-k off.", default=1.0)
    gen_batch: int = _h("Sequences per generation batch.", default=32)
    pairs_per_prompt: int = _h(
        "Preference pairs per train prompt m (2m <= k): the j-th best vs the j-th worst sample by r_alpha0, "
        "j < m (1: top vs bottom). The shipped set has 200 train prompts, so >= 300 pairs need m >= 2.",
        default=1,
    )
    keep_ties: bool = _h(
        "Keep prompts whose K samples tie in r_alpha0 (pair: first vs last sample). Only for smoke runs "
        "(the tiny random model emits random bytes, which contain no lexicon word, so every prompt ties).",
        default=False,
    )
    methods: tuple[str, ...] = _h("Training methods among dpo, ipo, kldpo, wdpo.", default=("dpo", "kldpo", "wdpo"))
    beta: float = _h("DPO temperature beta.", default=0.1)
    taus: tuple[float, ...] = _h("KLDPO temperatures tau (one run each).", default=(0.1,))
    kldpo_variant: str = _h("KLDPO weight variant (trainer.TrainConfig.kldpo_variant).", default="clamped")
    rho0s: tuple[float, ...] = _h(
        "WDPO penalty coefficients rho0 (one run each). On SmolLM2 ||grad_emb l_i|| is ~5 at the start, so "
        "rho0 = 0.005 makes the penalty ~0.17 (a quarter of the DPO loss log 2) and its gradient comparable to DPO's.",
        default=(0.005,),
    )
    kl_radii: tuple[float, ...] = _h(
        "KL radii rho > 0: if given, the KLDPO temperatures are calibrated at the DPO solution instead of "
        "``taus``: tau(rho) is the KL dual temperature lambda*(rho) of the seed-one DPO policy's per-pair training "
        "losses (so its KLDPO weights there are the worst case of the KL ball of radius rho), to 3 significant "
        "digits. Needs 'dpo' in methods (docs/llm_shift.md).",
        default=(),
    )
    penalty_fractions: tuple[float, ...] = _h(
        "Fractions f > 0: if given, the WDPO coefficients are calibrated at the DPO solution instead of "
        "``rho0s``: rho0(f) makes the rows penalty rho0 mean_i ||grad_z l_i||^2 equal f times the mean DPO loss "
        "of the seed-one DPO policy on the training pairs, to 3 significant digits; both WDPO norms use it. "
        "Needs 'dpo' in methods.",
        default=(),
    )
    wdpo_impl: str = _h("WDPO gradient: 'finite-diff' or 'double-backward'.", default="finite-diff")
    wdpo_penalties: tuple[str, ...] = _h(
        "WDPO gradient norms (one run per rho0 each): 'rows' (runs wdpo-rho<r>) and/or 'tuple' (the prompt one "
        "shared input; runs wdpo-tuple-rho<r>); docs/llm_losses.md.",
        default=("rows",),
    )
    steps: int = _h("Optimizer steps per training run.", default=24)
    batch_size: int = _h("Preference pairs per optimizer step.", default=8)
    lr: float = _h("Peak AdamW learning rate.", default=1e-3)
    warmup_steps: int = _h("Linear warm-up steps.", default=2)
    lora: bool = _h("Train LoRA adapters (True) or all weights (False).", default=True)
    lora_r: int = _h("LoRA rank.", default=16)
    lora_alpha: float = _h("LoRA alpha.", default=32.0)
    lora_target_modules: tuple[str, ...] = _h("LoRA target modules.", default=("q_proj", "k_proj", "v_proj", "o_proj"))
    checkpoint_every: int = _h("Checkpoint every N optimizer steps (0: at the end only).", default=6)
    seeds: tuple[int, ...] = _h("Training seeds (data order, LoRA init) and eval sampling seeds.", default=(0,))
    sample_seed: int = _h("Seed of the train-pool sampling.", default=1234)
    n_boot: int = _h("Bootstrap resamples for the 95% intervals.", default=2000)
    figure: str | None = _h("Figure path (PNG; a PDF is written next to it); default out/llm_shift.png.", default=None)
    table: str | None = _h("Extra copy of the markdown results table (e.g. results/llm_shift.md).", default=None)
    json_out: str | None = _h("Extra copy of results.json.", default=None)
    progress: bool = _h("Show progress bars.", default=True)
    threads: int | None = _h(
        "torch CPU threads (None: torch's default). The real preset uses 1: on a shared 2-core machine two "
        "OpenMP threads per process made generation ~3x slower than one.",
        default=None,
    )
    workers: int = _h(
        "Training runs trained and evaluated at once, each in its own process with ``threads`` threads "
        "(a run's result does not depend on it: every run is seeded by its own seed).",
        default=1,
    )

    def __post_init__(self) -> None:
        self.kl_radii = tuple(float(r) for r in self.kl_radii)
        self.penalty_fractions = tuple(float(f) for f in self.penalty_fractions)
        self.objectives = tuple(self.objectives)
        self.alphas = tuple(float(a) for a in self.alphas)
        self.methods = tuple(self.methods)
        self.taus = tuple(float(t) for t in self.taus)
        self.rho0s = tuple(float(r) for r in self.rho0s)
        self.wdpo_penalties = tuple(self.wdpo_penalties)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.lora_target_modules = tuple(self.lora_target_modules)
        if len(self.objectives) != 2 or any(o not in OBJECTIVES for o in self.objectives) or len(set(self.objectives)) != 2:
            raise ValueError(f"objectives must be two different names from {sorted(OBJECTIVES)}; got {self.objectives}")
        if not 0.0 <= self.alpha0 <= 1.0:
            raise ValueError(f"alpha0 must lie in [0, 1]; got {self.alpha0}")
        if len(self.alphas) < 2 or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"alphas must be >= 2 values in [0, 1]; got {self.alphas}")
        bad = [m for m in self.methods if m not in ("dpo", "ipo", "kldpo", "wdpo")]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of dpo, ipo, kldpo, wdpo; got {self.methods}")
        for name in ("n_train", "n_test", "eval_samples", "max_new_tokens", "gen_batch", "steps", "batch_size", "lora_r", "n_boot"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError(f"k must be >= 2 (a pair needs two completions); got {self.k}")
        if not (isinstance(self.pairs_per_prompt, int) and 1 <= self.pairs_per_prompt and 2 * self.pairs_per_prompt <= self.k):
            raise ValueError(f"pairs_per_prompt must be an integer m >= 1 with 2m <= k={self.k}; got {self.pairs_per_prompt}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        if "kldpo" in self.methods and not self.taus:
            raise ValueError("kldpo needs at least one tau")
        if "wdpo" in self.methods and not self.rho0s:
            raise ValueError("wdpo needs at least one rho0")
        if (not self.wdpo_penalties or any(p not in WDPO_PENALTIES for p in self.wdpo_penalties)
                or len(set(self.wdpo_penalties)) != len(self.wdpo_penalties)):
            raise ValueError(f"wdpo_penalties must be distinct values among {WDPO_PENALTIES}; got {self.wdpo_penalties}")
        if any(not r > 0 for r in self.kl_radii) or any(not f > 0 for f in self.penalty_fractions):
            raise ValueError(f"kl_radii and penalty_fractions must be > 0; got {self.kl_radii}, {self.penalty_fractions}")
        if (self.kl_radii or self.penalty_fractions) and "dpo" not in self.methods:
            raise ValueError("calibrating radii at the DPO solution (kl_radii, penalty_fractions) needs 'dpo' in methods")
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise ValueError(f"workers must be an integer >= 1; got {self.workers}")
        if self.threads is not None and int(self.threads) < 1:
            raise ValueError(f"threads must be an integer >= 1; got {self.threads}")

    @property
    def smoke_test(self) -> bool:
        """True for a pipeline smoke test: the tiny random model (or tied pairs kept), whose
        policies are all alike, so the numbers check the plumbing, not robustness."""
        return self.model == "tiny-random" or bool(self.keep_ties)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ShiftConfig":
        """``"quick"`` (tiny random model, seconds) or ``"real"`` (SmolLM2-135M-Instruct), then overrides."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
        return cls(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def runs(self) -> list[tuple[str, str, dict[str, Any]]]:
        """``(run name, method, TrainConfig overrides)`` for every training run (seeds excluded)."""
        out = []
        for m in self.methods:
            if m == "kldpo":
                out += [(f"kldpo-tau{t:g}", m, {"tau": t}) for t in self.taus]
            elif m == "wdpo":
                for pen in self.wdpo_penalties:  # "rows" keeps the original run names
                    tag = "" if pen == "rows" else f"{pen}-"
                    out += [(f"wdpo-{tag}rho{r:g}", m, {"rho0": r, "wdpo_penalty": pen}) for r in self.rho0s]
            else:
                out.append((m, m, {}))
        return out


PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        model="tiny-random", n_train=6, n_test=4, k=3, eval_samples=1, max_new_tokens=6, gen_batch=16,
        steps=2, batch_size=2, warmup_steps=0, lr=1e-3, lora_r=4, lora_alpha=8.0, checkpoint_every=1,
        alphas=(0.0, 0.25, 0.5, 0.75, 1.0), n_boot=200, keep_ties=True,
    ),
    "real": dict(model="smollm2", threads=1),
}
"""Named settings; ``real`` is the dataclass defaults (sized for < 60 min on 2 CPU cores)."""


@dataclass
class ShiftResult:
    """What :func:`run_shift` returns.

    Attributes
    ----------
    summary : dict
        The content of ``results.json`` (per policy: mean r_alpha, 95% interval, difference to DPO).
    out : pathlib.Path
    stages_run : list of str
        Stages computed in this call (the others were loaded from the cache).
    seconds : float
        Wall time of this call.
    """

    summary: dict[str, Any]
    out: Path
    stages_run: list[str]
    seconds: float


# ----------------------------------------------------------------------------- io helpers
def _read_jsonl_checked(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """``(rows, clean)``: the rows before the first unreadable line; ``clean`` is False when a line
    was unreadable (cut by a crash, or not ours), so the caller rewrites the file without it."""
    if not path.is_file():
        return [], True
    rows = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash: the batch is redone
                return rows, False
            if not isinstance(row, dict):
                return rows, False
            rows.append(row)
    return rows, True


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return _read_jsonl_checked(path)[0]


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, obj)  # atomic: temporary file in the same folder + os.replace


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))  # atomic


def _check_config(out: Path, cfg: ShiftConfig) -> None:
    path = out / "config.json"
    free = set(RESULT_FIELDS) | set(RUN_SET_FIELDS) | {"out"}
    cur = {k: v for k, v in cfg.to_json().items() if k not in free}
    if path.is_file():
        old = read_json(path)
        if not isinstance(old, dict):
            raise ValueError(f"{path} is not a config.json written by llm-shift (not a JSON object); "
                             "use another --out or remove it")
        # a setting the directory's config.json predates counts as its default (older runs stay resumable)
        defaults = {f.name: f.default for f in dataclasses.fields(ShiftConfig) if f.default is not dataclasses.MISSING}
        old = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items() if k not in old}, **old}
        old = {k: v for k, v in old.items() if k not in free}
        diff = sorted(k for k in set(old) | set(cur) if old.get(k) != cur.get(k))
        if diff:
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(diff)}); use another --out or the same settings"
            )
    _write_json(path, cfg.to_json())


# ----------------------------------------------------------------------------- generation
def _messages(prompt: Prompt, system: str | None = None) -> list[dict[str, str]]:
    sys_msg = [{"role": "system", "content": system}] if system else []
    return sys_msg + [{"role": "user", "content": prompt.text}]


def _stop_ids(tok: Any) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    im_end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return sorted(ids)


def generate_completions(
    model: Any,
    tok: Any,
    prompts: Sequence[Prompt],
    n_samples: int,
    path: Path,
    *,
    max_new_tokens: int,
    temperature: float,
    gen_batch: int,
    seed: int,
    desc: str,
    progress: bool = True,
    system: str | None = None,
) -> list[dict[str, Any]]:
    """Sample ``n_samples`` completions per prompt and append them to ``path`` (JSONL).

    Work is split in chunks of ``max(1, gen_batch // n_samples)`` prompts; chunk ``c`` is
    sampled under ``torch.manual_seed(seed * 100003 + c)``, so a resumed run reproduces the
    chunks it redoes. Prompts already complete in ``path`` are skipped.

    Returns
    -------
    list of dict
        One row per completion: ``prompt_id``, ``sample``, ``prompt``, ``completion``,
        ``n_tokens`` (new tokens, up to the stop token), ``finished`` (a stop token was produced).
        The chat is ``[system (if given), user prompt]`` rendered with the tokenizer's chat
        template and its generation prompt.
    """
    import torch
    from tqdm.auto import tqdm

    rows, clean = _read_jsonl_checked(path)
    ids = {p.id for p in prompts}
    rows = [r for r in rows if r.get("prompt_id") in ids and isinstance(r.get("completion"), str)]
    done: dict[int, int] = {}
    for r in rows:
        done[r["prompt_id"]] = done.get(r["prompt_id"], 0) + 1
    kept = [r for r in rows if done[r["prompt_id"]] == n_samples]  # drop a partial chunk
    if not clean or len(kept) != len(rows):  # rewrite without the torn line / partial chunk,
        _write_jsonl(path, kept)  # so new rows are never appended after a cut line
    rows = kept
    complete = {r["prompt_id"] for r in rows}
    per_chunk = max(1, gen_batch // n_samples)
    chunks = [list(prompts[i : i + per_chunk]) for i in range(0, len(prompts), per_chunk)]
    todo = [(c, ch) for c, ch in enumerate(chunks) if not all(p.id in complete for p in ch)]
    if not todo:
        return rows
    stops = _stop_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    old_side = tok.padding_side
    tok.padding_side = "left"
    model.eval()
    bar = tqdm(total=len(prompts), initial=len(prompts) - sum(len(ch) for _, ch in todo), desc=desc,
               disable=not progress, dynamic_ncols=True)
    try:
        with path.open("a", encoding="utf-8") as fh:
            for c, chunk in todo:
                texts = [tok.apply_chat_template(_messages(p, system), tokenize=False, add_generation_prompt=True) for p in chunk]
                texts = [t for t in texts for _ in range(n_samples)]  # (len(chunk) * n_samples,)
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    torch.manual_seed(seed * 100003 + c)
                    out = model.generate(
                        **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                        top_p=1.0, top_k=0, pad_token_id=pad, eos_token_id=stops,
                    )
                new = out[:, enc["input_ids"].shape[1] :]  # (rows, <= max_new_tokens)
                for j, ids in enumerate(new.tolist()):
                    cut = next((t for t, i in enumerate(ids) if i in stops), None)
                    kept = ids if cut is None else ids[:cut]
                    p = chunk[j // n_samples]
                    row = {
                        "prompt_id": p.id, "sample": j % n_samples, "prompt": p.text,
                        "completion": tok.decode(kept, skip_special_tokens=True).strip(),
                        "n_tokens": len(kept), "finished": cut is not None,
                    }
                    rows.append(row)
                    fh.write(json.dumps(row) + "\n")
                fh.flush()
                bar.update(len(chunk))
    finally:
        tok.padding_side = old_side
        bar.close()
    return rows


# ----------------------------------------------------------------------------- pairs
def build_pairs(
    samples: Sequence[dict[str, Any]], z: np.ndarray, alpha0: float, keep_ties: bool = False,
    system: str | None = None, per_prompt: int = 1,
) -> tuple[list[dict[str, Any]], int]:
    """Top-vs-bottom pairs by :math:`r_{\\alpha_0}`, ``per_prompt`` per prompt.

    Parameters
    ----------
    samples : sequence of dict, length n
        Rows of ``samples.jsonl`` (keys ``prompt_id``, ``prompt``, ``completion``).
    z : numpy.ndarray, shape (n, 2)
        Normalised objective values of the samples.
    alpha0 : float
    keep_ties : bool
        Keep tied prompts with chosen = first, rejected = last sample (smoke runs only).
    system : str, optional
        System message put before the user prompt (as at sampling time).
    per_prompt : int
        Pairs per prompt m: pair j (j < m) is the j-th best vs the j-th worst sample (ranked by
        :math:`r_{\\alpha_0}`, ties broken by sample order), disjoint when 2m <= K; pair 0 is
        the top-vs-bottom pair of m = 1.

    Returns
    -------
    pairs : list of dict
        TRL conversational records ``prompt``/``chosen``/``rejected`` plus ``prompt_id``,
        ``chosen_reward``, ``rejected_reward``; chosen = argmax, rejected = argmin of
        :math:`r_{\\alpha_0}` over the prompt's samples (first index on ties).
    n_dropped : int
        Pairs skipped because their two samples tie in reward or in text (prompts, for m = 1).
    """
    r = mixture_reward(z, alpha0)  # (n,)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(int(s["prompt_id"]), []).append(i)
    pairs, dropped = [], 0
    for pid in sorted(groups):
        idx = groups[pid]
        rs = r[idx]
        hi, lo = idx[int(np.argmax(rs))], idx[int(np.argmin(rs))]
        if keep_ties and r[hi] - r[lo] <= 1e-12:
            hi, lo = idx[0], idx[-1]
        cand = [(hi, lo)]
        if per_prompt > 1:  # j-th best vs j-th worst; j = 0 is (hi, lo) above
            desc = sorted(idx, key=lambda t: (-r[t], t))
            asc = sorted(idx, key=lambda t: (r[t], t))
            cand += [(desc[j], asc[j]) if not (keep_ties and r[desc[j]] - r[asc[j]] <= 1e-12)
                     else (idx[j], idx[-(j + 1)]) for j in range(1, per_prompt)]
        for hi, lo in cand:
            a, b = samples[hi]["completion"], samples[lo]["completion"]
            if (r[hi] - r[lo] <= 1e-12 and not keep_ties) or a == b or not a.strip() or not b.strip():
                dropped += 1
                continue
            pairs.append({
                "prompt": ([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": samples[hi]["prompt"]}],
                "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": b}],
                "prompt_id": pid, "chosen_reward": float(r[hi]), "rejected_reward": float(r[lo]),
            })
    return pairs, dropped


# ----------------------------------------------------------------------------- statistics
def bootstrap_mean_ci(
    values: np.ndarray, n_boot: int, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and percentile-bootstrap interval over rows.

    Parameters
    ----------
    values : numpy.ndarray, shape (n, A)
        One row per test prompt (already averaged over samples and seeds).
    n_boot : int
    seed : int
    level : float

    Returns
    -------
    mean, lo, hi : numpy.ndarray, each of shape (A,)
        ``mean`` is the plain mean over rows; ``lo``/``hi`` the ``(1-level)/2`` and
        ``(1+level)/2`` quantiles of the means of ``n_boot`` resamples of the rows
        (the same resampled rows for every column).
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # (n_boot, n)
    boots = values[idx].mean(axis=1)  # (n_boot, A)
    q = (1.0 - level) / 2.0
    return values.mean(axis=0), np.quantile(boots, q, axis=0), np.quantile(boots, 1.0 - q, axis=0)


def bootstrap_seeds_prompts_ci(values: np.ndarray, n_boot: int, seed: int = 0, level: float = 0.95
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Two-level percentile-bootstrap interval of the mean of ``values`` (S seeds, n prompts, A).

    Each resample draws S seeds with replacement and, independently, n prompts with replacement,
    and takes the mean over the drawn (seed, prompt) cells; so the interval covers the variation
    between training seeds as well as between test prompts (with few seeds it is coarse).

    Returns
    -------
    lo, hi : numpy.ndarray, each of shape (A,)
    """
    values = np.asarray(values, dtype=np.float64)
    s, n = values.shape[:2]
    rng = np.random.default_rng(seed)
    boots = np.empty((n_boot,) + values.shape[2:])
    for b in range(n_boot):
        si = rng.integers(0, s, size=s)
        pi = rng.integers(0, n, size=n)
        boots[b] = values[si][:, pi].mean(axis=(0, 1))
    q = (1.0 - level) / 2.0
    return np.quantile(boots, q, axis=0), np.quantile(boots, 1.0 - q, axis=0)


def _per_prompt(rows: Sequence[dict[str, Any]], objectives: Sequence[str], norm: Normalizer,
                alphas: np.ndarray, prompt_ids: Sequence[int]) -> np.ndarray:
    """Mean r_alpha per test prompt, shape (n_prompts, A)."""
    z = norm(np.array([[r["scores"][o] for o in objectives] for r in rows]))  # (n_rows, 2)
    ra = mixture_reward(z, alphas)  # (n_rows, A)
    pos = {pid: i for i, pid in enumerate(prompt_ids)}
    acc = np.zeros((len(prompt_ids), len(alphas)))
    cnt = np.zeros(len(prompt_ids))
    for r, v in zip(rows, ra):
        i = pos[r["prompt_id"]]
        acc[i] += v
        cnt[i] += 1
    if np.any(cnt == 0):
        raise ValueError("some test prompts have no evaluated completion")
    return acc / cnt[:, None]


def summarize(
    evals: dict[str, list[list[dict[str, Any]]]],
    objectives: Sequence[str],
    norm: Normalizer,
    alphas: Sequence[float],
    prompt_ids: Sequence[int],
    n_boot: int,
    baseline: str = "dpo",
) -> dict[str, Any]:
    """Per policy: mean r_alpha over test prompts with bootstrap intervals, and the paired difference to ``baseline``.

    Parameters
    ----------
    evals : dict
        Policy name -> list over seeds of eval rows (each with ``prompt_id`` and ``scores``).

    Returns
    -------
    dict
        ``{policy: {"mean": [A], "lo": [A], "hi": [A], "raw_mean": {objective: float},
        "diff": {...} or None}}``; a policy's per-prompt values are averaged over its seeds and samples.
        ``diff`` (policy minus baseline, paired by prompt) has ``mean``/``lo``/``hi`` (bootstrap over
        prompts) and, with >= 2 seeds, ``per_seed`` (S x A: seed s minus the baseline's seed s, whose
        evaluation used the same sampling seed) and ``seed_prompt_lo``/``seed_prompt_hi``
        (:func:`bootstrap_seeds_prompts_ci`).
    """
    a = np.asarray(alphas, dtype=np.float64)
    per = {}
    per_seed = {}
    raw = {}
    for name, seed_rows in evals.items():
        per_seed[name] = np.stack([_per_prompt(rows, objectives, norm, a, prompt_ids) for rows in seed_rows])  # (S, n, A)
        per[name] = per_seed[name].mean(axis=0)
        allrows = [r for rows in seed_rows for r in rows]
        raw[name] = {o: float(np.mean([r["scores"][o] for r in allrows])) for o in OBJECTIVES
                     if all(o in r["scores"] for r in allrows)}  # the objectives scored in this run
        raw[name]["n_tokens"] = float(np.mean([r["n_tokens"] for r in allrows]))
    out: dict[str, Any] = {}
    for name, v in per.items():
        m, lo, hi = bootstrap_mean_ci(v, n_boot, seed=0)
        entry = {"mean": m.tolist(), "lo": lo.tolist(), "hi": hi.tolist(), "raw_mean": raw[name], "diff": None}
        if baseline in per and name != baseline:
            dm, dlo, dhi = bootstrap_mean_ci(v - per[baseline], n_boot, seed=0)
            entry["diff"] = {"vs": baseline, "mean": dm.tolist(), "lo": dlo.tolist(), "hi": dhi.tolist()}
            if per_seed[name].shape[0] == per_seed[baseline].shape[0] > 1:  # seed s paired with the baseline's seed s
                d = per_seed[name] - per_seed[baseline]  # (S, n, A)
                slo, shi = bootstrap_seeds_prompts_ci(d, n_boot, seed=0)
                entry["diff"].update(per_seed=d.mean(axis=1).tolist(), seed_prompt_lo=slo.tolist(),
                                     seed_prompt_hi=shi.tolist())
        out[name] = entry
    return out


# ----------------------------------------------------------------------------- report
def _label(name: str) -> str:
    if name.startswith("wdpo-tuple-rho"):
        return f"WDPO tuple (rho0={name[len('wdpo-tuple-rho'):]})"
    if name.startswith("kldpo-tau"):
        return f"KLDPO (tau={name[len('kldpo-tau'):]})"
    if name.startswith("wdpo-rho"):
        return f"WDPO (rho0={name[len('wdpo-rho'):]})"
    return {"reference": "initial policy", "dpo": "DPO", "ipo": "IPO"}.get(name, name)


SMOKE_NOTE = ("PIPELINE SMOKE TEST (tiny random model): every policy is alike by construction; "
              "these numbers check the plumbing, not robustness")
"""Title of the figure and first line of the table of a smoke run (:attr:`ShiftConfig.smoke_test`)."""

TABLE_ALPHAS = (0.0, 0.2, 0.5, 0.8, 1.0)
"""Columns of the markdown table when more than 6 alphas are evaluated (plus alpha0; all alphas
are in results.json / results.csv)."""


def markdown_table(summary: dict[str, Any], table_alphas: Sequence[float] | None = None) -> str:
    """Markdown table: one row per policy, one column per alpha: ``mean [lo, hi]`` (and the difference to DPO)."""
    alphas = summary["alphas"]
    cols = [i for i, a in enumerate(alphas) if table_alphas is None or any(abs(a - t) < 1e-9 for t in table_alphas)]
    head = "| policy | " + " | ".join(f"alpha={alphas[i]:g}" + (" (train)" if abs(alphas[i] - summary["alpha0"]) < 1e-9 else "") for i in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, e in summary["policies"].items():
        cells = [f"{e['mean'][i]:+.3f} [{e['lo'][i]:+.3f}, {e['hi'][i]:+.3f}]" for i in cols]
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    diffs = [(n, e) for n, e in summary["policies"].items() if e["diff"] is not None and n != "reference"]
    if diffs:
        lines += ["", "Paired difference to DPO (same test prompts), mean [95% interval]:", "", head, lines[1]]
        for name, e in diffs:
            d = e["diff"]
            cells = [f"{d['mean'][i]:+.3f} [{d['lo'][i]:+.3f}, {d['hi'][i]:+.3f}]" for i in cols]
            lines.append(f"| {_label(name)} - DPO | " + " | ".join(cells) + " |")
    o1, o2 = summary["objectives"]
    if summary.get("objective_conflict"):
        lines += ["", conflict_line((o1, o2), summary["objective_conflict"])]
    if summary.get("smoke_test"):
        lines = [f"**{SMOKE_NOTE}**", ""] + lines
    lines += ["", "Raw objective means over the test completions (before standardisation):", "",
              f"| policy | {o1} | {o2} | new tokens |", "|---|---|---|---|"]
    for name, e in summary["policies"].items():
        r = e["raw_mean"]
        lines.append(f"| {_label(name)} | {r[o1]:.4f} | {r[o2]:.4f} | {r['n_tokens']:.1f} |")
    return "\n".join(lines) + "\n"


_FAMILY_STYLES = {
    "kldpo": (["#d95f02", "#8c2d04", "#fd8d3c"], ["-", "--", "-."]),
    "wdpo": (["#1b9e77", "#00441b", "#66c2a4"], ["-", "--", "-."]),
    "ipo": (["#7570b3"], ["-"]),
}


def _policy_style(name: str, index_in_family: int) -> tuple[str, Any]:
    """Colour and line style of a policy: one hue family per method (KLDPO orange, WDPO green), so
    no two methods share a colour whatever the number of radii; the initial policy is grey dotted."""
    if name == "reference":
        return "0.45", ":"
    if name == "dpo":
        return "#1f4e99", "-"
    fam = "kldpo" if name.startswith("kldpo") else "wdpo" if name.startswith("wdpo") else name
    colors, styles = _FAMILY_STYLES.get(fam, (["#e7298a"], ["-"]))
    return colors[index_in_family % len(colors)], styles[(index_in_family // len(colors) + index_in_family) % len(styles)]


def _run_title(summary: dict[str, Any]) -> str:
    """Model, seeds and test set: what tells one run's figure from another's (seed 0 vs seeds 0, 1, a sweep)."""
    model = {"smollm2": "SmolLM2-135M-Instruct", "tiny-random": "tiny random Llama"}.get(summary["model"], summary["model"])
    seeds = summary.get("seeds") or []
    seed_txt = (f"seed {seeds[0]}" if len(seeds) == 1 else
                f"seeds {', '.join(map(str, seeds))} (per-prompt mean over seeds)" if seeds else "")
    n_test = summary.get("n_test_prompts")
    robust = [n for n in summary["policies"] if n not in ("reference", "dpo")]
    sweep = "radius sweep, " if len(robust) > 2 else ""
    parts = [model, sweep + seed_txt if seed_txt else sweep.rstrip(", "),
             f"{n_test} test prompts" if n_test else ""]
    return ", ".join(p for p in parts if p)


def paired_significance(summary: dict[str, Any], two_level: bool = False
                        ) -> list[tuple[str, list[float], list[float]]]:
    """Per policy with a paired difference to DPO: ``(name, alphas where it is significantly above,
    alphas where it is significantly below)``, by the 95% interval over prompts, or with ``two_level``
    the seed-and-prompt interval (``seed_prompt_lo``/``_hi``; the prompt interval where a run has none)."""
    out = []
    for name, e in summary["policies"].items():
        d = e.get("diff")
        if name == "reference" or not d:
            continue
        lo, hi = (d.get("seed_prompt_lo", d["lo"]), d.get("seed_prompt_hi", d["hi"])) if two_level else (d["lo"], d["hi"])
        out.append((name, [x for x, v in zip(summary["alphas"], lo) if v > 0],
                    [x for x, v in zip(summary["alphas"], hi) if v < 0]))
    return out


def _takeaway(summary: dict[str, Any]) -> str:
    """One line from the paired differences to DPO: is any robust policy significantly above DPO?"""
    above, below = [], []
    for name, up, down in paired_significance(summary):
        if up:
            above.append(f"{_label(name)} at alpha {min(up):g}-{max(up):g}")
        if down:
            below.append(_label(name))
    fixed = " over prompts, training seeds fixed" if len(summary.get("seeds", [])) > 1 else ""
    if above:
        return f"Significantly above DPO (95% paired interval{fixed}): " + "; ".join(above)
    text = f"No robust policy is significantly above DPO at any alpha (95% paired intervals{fixed})"
    if below:
        text += "; below it at some alpha: " + ", ".join(below)
    two_level = {name for name, e in summary["policies"].items() if (e.get("diff") or {}).get("seed_prompt_lo")}
    if fixed and two_level:
        sig = [name for name, up, down in paired_significance(summary, two_level=True)
               if name in two_level and (up or down)]
        text += ("\nresampling seeds as well: " + (", ".join(_label(n) for n in sig) + " differ from DPO at some alpha"
                                                   if sig else "no robust policy differs significantly from DPO"))
    return text


def plot_shift(summary: dict[str, Any], path: Path) -> list[Path]:
    """Mean r_alpha vs alpha per policy (95% bands) and the paired difference to DPO; PNG + PDF.

    The title names the model, the seeds and the test set (so the seed-0, two-seed and sweep figures
    differ), the suptitle states the takeaway (or the smoke-test warning), every policy has its own
    colour (one hue family per method) and the legend sits below the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.asarray(summary["alphas"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    counts: dict[str, int] = {}
    for name, e in summary["policies"].items():
        fam = "kldpo" if name.startswith("kldpo") else "wdpo" if name.startswith("wdpo") else name
        color, ls = _policy_style(name, counts.get(fam, 0))
        counts[fam] = counts.get(fam, 0) + 1
        axes[0].plot(a, e["mean"], ls=ls, color=color, marker="o", ms=3, lw=1.8, label=_label(name))
        axes[0].fill_between(a, e["lo"], e["hi"], color=color, alpha=0.08, lw=0)
        if e["diff"] is not None and name != "reference":
            d = e["diff"]
            axes[1].plot(a, d["mean"], ls=ls, color=color, marker="o", ms=3, lw=1.8)
            axes[1].fill_between(a, d["lo"], d["hi"], color=color, alpha=0.12, lw=0)
    o1, o2 = summary["objectives"]
    for ax in axes:
        ax.axvline(summary["alpha0"], color="k", ls="--", lw=0.8, label=f"training alpha0 = {summary['alpha0']:g}")
        ax.set_xlabel(f"test mixture weight alpha (1 = all {o1}, 0 = all {o2})")
        ax.grid(alpha=0.3)
    axes[1].axhline(0.0, color="gray", lw=0.8)
    axes[0].set_ylabel("mean r_alpha on test prompts\n(std units of the train pool)")
    axes[1].set_ylabel("policy − DPO, paired over test prompts\n(std units)")
    axes[0].set_title(f"reward r_alpha = alpha z_{o1} + (1 − alpha) z_{o2}; bands: 95% bootstrap", fontsize=9)
    axes[1].set_title("difference to DPO; bands: 95% paired bootstrap", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 4),
               fontsize=8, frameon=False)
    if summary.get("smoke_test"):
        fig.suptitle(SMOKE_NOTE, color="firebrick", fontsize=10, fontweight="bold")
    else:
        note = f"\n({summary['provenance']})" if summary.get("provenance") else ""
        fig.suptitle(f"{_run_title(summary)}\n{_takeaway(summary)}{note}", fontsize=10)
    fig.tight_layout()
    png, pdf = path.with_suffix(".png"), path.with_suffix(".pdf")
    save_figure(fig, png, dpi=150, bbox_inches="tight")  # atomic: temporary file + os.replace
    save_figure(fig, pdf, bbox_inches="tight")
    plt.close(fig)
    return [png, pdf]


# ----------------------------------------------------------------------------- pipeline
def _scored_names(objectives: Sequence[str]) -> list[str]:
    """The VADER objectives (always, as before the emotion preset) plus the run's own objectives."""
    return [o for o in OBJECTIVES if o in VADER_OBJECTIVES or o in objectives]


def _score_rows(rows: list[dict[str, Any]], objectives: Sequence[str]) -> list[dict[str, Any]]:
    names = _scored_names(objectives)
    raw = score_texts([r["completion"] for r in rows], names)
    return [{**r, "scores": dict(zip(names, map(float, v)))} for r, v in zip(rows, raw)]


def objective_conflict(samples: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]],
                       objectives: Sequence[str], norm: Normalizer) -> dict[str, Any]:
    r"""How much the two objectives conflict on the initial policy's train pool.

    Returns
    -------
    dict
        ``pearson``: correlation of the raw objectives over all samples (None when one is
        constant); ``n_samples``; ``pairs_opposite``: fraction of the training pairs on which
        the objectives rank the two answers strictly oppositely
        (:math:`\Delta z_1 \Delta z_2 < 0`, chosen minus rejected); ``pairs_one_tied``: fraction
        on which at least one objective ties (:math:`\Delta z_1 \Delta z_2 = 0`); ``n_pairs``.
    """
    raw = np.array([[s["scores"][o] for o in objectives] for s in samples], dtype=np.float64).reshape(-1, 2)
    by_text = {(s["prompt_id"], s["completion"]): i for i, s in enumerate(samples)}
    z = norm(raw)
    prods = []
    for p in pairs:
        c = by_text.get((p["prompt_id"], p["chosen"][0]["content"]))
        r = by_text.get((p["prompt_id"], p["rejected"][0]["content"]))
        if c is not None and r is not None:
            d = z[c] - z[r]
            prods.append(float(d[0] * d[1]))
    prods_a = np.asarray(prods)
    return {
        "pearson": objective_correlation(raw), "n_samples": int(raw.shape[0]),
        "pairs_opposite": float(np.mean(prods_a < 0)) if prods else None,
        "pairs_one_tied": float(np.mean(prods_a == 0)) if prods else None,
        "n_pairs": len(prods),
        "pool": "train-prompt completions of the initial policy",
    }


def conflict_line(objectives: Sequence[str], conflict: dict[str, Any] | None) -> str:
    """One report line: the train-pool correlation of the two objectives and the pair-level conflict."""
    if not conflict:
        return ""
    o1, o2 = objectives
    r = conflict.get("pearson")
    rtxt = f"{r:+.3f}" if r is not None else "undefined (an objective is constant on the pool)"
    line = f"Objectives on the initial policy's train pool: Pearson r({o1}, {o2}) = {rtxt} over {conflict['n_samples']} samples"
    if conflict.get("pairs_opposite") is not None:
        line += (f"; on the {conflict['n_pairs']} training pairs they rank the answers oppositely in "
                 f"{100 * conflict['pairs_opposite']:.0f}% and at least one of them ties in "
                 f"{100 * conflict['pairs_one_tied']:.0f}%")
    return line + "."


def _train_done(run_dir: Path, steps: int) -> bool:
    from drdpo_theory.llm.trainer import latest_checkpoint

    ck = latest_checkpoint(run_dir)
    state = None if ck is None else read_json(ck / "trainer_state.json")
    return isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= steps


# ----------------------------------------------------------------------------- training runs
MAX_LENGTH, MAX_PROMPT_LENGTH = 256, 192
"""Token limits of every training run (prompt + answer, prompt): the tokenisation and the TrainConfig agree."""


def _train_config(cfg: ShiftConfig, run_dir: Path, method: str, seed: int, extra: dict[str, Any], progress: bool) -> Any:
    from drdpo_theory.llm.trainer import TrainConfig

    return TrainConfig(
        output_dir=str(run_dir), method=method, beta=cfg.beta, kldpo_variant=cfg.kldpo_variant,
        wdpo_impl=cfg.wdpo_impl, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.steps,
        batch_size=cfg.batch_size, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, precision="fp32",
        lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_target_modules=cfg.lora_target_modules, reference="precompute",
        checkpoint_every=cfg.checkpoint_every, keep_checkpoints=2, seed=seed,
        progress=progress, model_spec=cfg.model, export=False, **extra,
    )


def _tokenize(tok: Any, pairs: Sequence[dict[str, Any]]) -> Any:
    from drdpo_theory.llm.data import tokenize_preferences

    return tokenize_preferences(tok, pairs, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)


def _eval_policy(cfg: ShiftConfig, model: Any, tok: Any, test_prompts: Sequence[Prompt], path: Path, seed: int,
                 desc: str, progress: bool) -> list[dict[str, Any]]:
    """Sample ``eval_samples`` completions per test prompt (seed 10000 + seed), score them, write ``*.scored.jsonl``."""
    rows = generate_completions(
        model, tok, test_prompts, cfg.eval_samples, path, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, gen_batch=cfg.gen_batch, seed=10_000 + seed, desc=desc,
        progress=progress, system=cfg.system_prompt,
    )
    order = {p.id: i for i, p in enumerate(test_prompts)}
    rows = _score_rows(sorted(rows, key=lambda r: (order[r["prompt_id"]], r["sample"])), cfg.objectives)
    _write_jsonl(path.with_suffix(".scored.jsonl"), rows)
    return rows


def _train_and_eval(cfg: ShiftConfig, run: str, method: str, extra: dict[str, Any], seed: int, model0: Any, tok: Any,
                    tokenized: Any, test_prompts: Sequence[Prompt], progress: bool) -> dict[str, Any]:
    """Train (or resume) run ``run`` from a copy of ``model0`` and evaluate it; returns timings and a log line."""
    import torch

    from drdpo_theory.llm.trainer import Trainer

    out = Path(cfg.out)
    run_dir = out / "train" / run
    tcfg = _train_config(cfg, run_dir, method, seed, extra, progress)
    t0 = time.perf_counter()
    was_done = _train_done(run_dir, cfg.steps)
    trainer = Trainer(tcfg, copy.deepcopy(model0), tok, tokenized, device=torch.device("cpu"))
    res = trainer.fit(resume_from="auto")
    if res.interrupted:
        raise KeyboardInterrupt
    report: dict[str, Any] = {"run": run, "timings": {}, "log": None}
    if not was_done:
        report["timings"][f"train:{run}"] = time.perf_counter() - t0
        report["log"] = (f"trained {run}: steps {res.start_step}->{res.final_step}, last loss "
                         f"{res.losses[-1] if res.losses else float('nan'):.4f}")
    t0 = time.perf_counter()
    policy = trainer.base.eval()
    _eval_policy(cfg, policy, tok, test_prompts, out / "eval" / f"{run}.jsonl", seed, f"eval {run}", progress)
    report["timings"][f"eval:{run}"] = time.perf_counter() - t0
    return report


_WORKER: dict[str, Any] = {}


def _worker_init(cfg_json: dict[str, Any]) -> None:
    """Process-pool initializer: load the model, tokenizer, tokenized pairs and test prompts once per worker."""
    import torch

    from drdpo_theory.llm.models import load_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = ShiftConfig(**cfg_json)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    import signal

    # between jobs a SIGTERM is remembered (a trainer replaces this handler during its fit and restores it)
    signal.signal(signal.SIGTERM, _worker_on_term)
    model, tok = load_model(cfg.model, "fp32")
    pairs = _read_jsonl(Path(cfg.out) / "pairs.jsonl")
    _WORKER.update(cfg=cfg, model=model, tok=tok, tokenized=_tokenize(tok, pairs),
                   test_prompts=load_prompts("test", cfg.n_test))


def _worker_on_term(signum: int, frame: Any) -> None:
    _WORKER["stop"] = True


def _worker_job(run: str, method: str, extra: dict[str, Any], seed: int) -> dict[str, Any]:
    """One run in a worker; once the worker was asked to stop (SIGTERM), no job starts: the executor may
    already have queued some to this process."""
    w = _WORKER
    if w.get("stop"):
        raise KeyboardInterrupt
    try:
        return _train_and_eval(w["cfg"], run, method, extra, seed, w["model"], w["tok"], w["tokenized"],
                               w["test_prompts"], progress=False)
    except KeyboardInterrupt:  # the trainer stopped on SIGTERM (and checkpointed)
        w["stop"] = True
        raise


def _run_pool(cfg: ShiftConfig, first: list[tuple[str, str, dict[str, Any], int]],
              second: Callable[[], list[tuple[str, str, dict[str, Any], int]]] | None, cal_run: str,
              done: Callable[[dict[str, Any]], None]) -> None:
    """Run the jobs in ``cfg.workers`` spawned processes; ``second()`` (the calibrated runs) is called
    in this process once ``cal_run`` is finished (or at once when it is not among ``first``).

    On an interrupt (SIGINT, or SIGTERM to this process) every worker gets SIGTERM, so that each
    trainer writes its checkpoint and stops; a rerun resumes them.
    """
    import multiprocessing as mp
    import signal
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    ex = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(cfg.to_json(),))
    pending: dict[Any, str] = {}
    try:
        for job in first:
            pending[ex.submit(_worker_job, *job)] = job[0]
        waiting = second is not None
        if waiting and cal_run not in pending.values():
            waiting = False
            for job in second():
                pending[ex.submit(_worker_job, *job)] = job[0]
        while pending:
            # a timeout, not an unbounded wait: a process-directed SIGTERM may be delivered to one of the
            # executor's threads, and the main thread runs the Python handler only once it wakes up
            finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                run = pending.pop(fut)
                done(fut.result())  # re-raises a worker's error here
                if waiting and run == cal_run:
                    waiting = False
                    for job in second():
                        pending[ex.submit(_worker_job, *job)] = job[0]
    except BaseException:
        for proc in list(getattr(ex, "_processes", {}).values()):
            if proc.is_alive():
                proc.terminate()
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
    ex.shutdown(wait=True)


def calibrate_radii(cfg: ShiftConfig, model0: Any, tok: Any, tokenized: Any, seed: int) -> dict[str, Any]:
    r"""Per-pair losses and WDPO squared gradient norms of the trained ``dpo-seed<seed>`` policy on the
    training pairs, and the radii they calibrate (``cfg.kl_radii`` -> taus, ``cfg.penalty_fractions`` -> rho0s).

    * KLDPO: :math:`\tau(\rho) = \lambda^*(\rho)`, the KL dual temperature of the N training losses
      (:func:`drdpo_theory.llm.losses.kl_dual_temperature`): the KLDPO weights
      :math:`\propto e^{\ell_i/\tau}` at the DPO solution are then the worst case of the KL ball of radius
      :math:`\rho` around the training pairs.
    * WDPO: :math:`\rho_0(f) = f\,\bar\ell / \overline{\|\nabla_z\ell\|^2}` (rows norm): the penalty at the
      DPO solution is f times its mean DPO loss.

    Both are rounded to 3 significant digits (they name the runs).
    """
    import torch

    from drdpo_theory.llm.losses import effective_sample_size, kl_dual_temperature
    from drdpo_theory.llm.objectives import pair_losses_and_penalties
    from drdpo_theory.llm.trainer import Trainer

    run = f"dpo-seed{seed}"
    run_dir = Path(cfg.out) / "train" / run
    if not _train_done(run_dir, cfg.steps):
        raise RuntimeError(f"calibration needs the finished run {run_dir}")
    trainer = Trainer(_train_config(cfg, run_dir, "dpo", seed, {}, False), copy.deepcopy(model0), tok, tokenized,
                      device=torch.device("cpu"))
    res = trainer.fit(resume_from="auto")  # finished: loads the final checkpoint, trains nothing
    if res.interrupted:
        raise KeyboardInterrupt
    if trainer.ref_cache is None:
        trainer.precompute_reference()
    model = trainer.model.eval()
    ls, sq = [], {k: [] for k in WDPO_PENALTIES}
    n = len(trainer.pairs)
    for i in range(0, n, cfg.batch_size):
        idx = list(range(i, min(n, i + cfg.batch_size)))
        batch = trainer.collate([trainer.pairs[j] for j in idx])
        batch = {k: v for k, v in batch.items() if k not in ("index", "weight")}
        l, s = pair_losses_and_penalties(model, batch, trainer.ref_cache[0][idx], trainer.ref_cache[1][idx], cfg.beta,
                                         WDPO_PENALTIES)
        ls.append(l.double())
        for k in sq:
            sq[k].append(s[k].double())
    losses = torch.cat(ls)
    sqs = {k: torch.cat(v) for k, v in sq.items()}
    mean_l = float(losses.mean())
    kl = []
    for rho in cfg.kl_radii:
        lam = kl_dual_temperature(losses, rho)
        if not 0 < lam < float("inf"):
            raise ValueError(f"KL radius {rho} gives dual temperature {lam} on the {n} DPO losses "
                             f"(needs 0 < rho < log N = {np.log(n):.3f} and losses that differ)")
        tau = float(f"{lam:.3g}")
        w = torch.softmax(losses / tau, 0) * n
        kl.append({"rho": rho, "lambda": lam, "tau": tau, "ess": effective_sample_size(w),
                   "weight_min": float(w.min()), "weight_max": float(w.max())})
    wd = []
    mean_rows = float(sqs["rows"].mean())
    for f in cfg.penalty_fractions:
        rho0 = float(f"{f * mean_l / mean_rows:.3g}")
        wd.append({"fraction": f, "rho0": rho0, "penalty_rows": rho0 * mean_rows,
                   "penalty_tuple": rho0 * float(sqs["tuple"].mean())})
    return {
        "policy": run, "n_pairs": n, "mean_loss": mean_l, "loss_min": float(losses.min()), "loss_max": float(losses.max()),
        "mean_sq_norm": {k: float(v.mean()) for k, v in sqs.items()},
        "kl_radii": list(cfg.kl_radii), "penalty_fractions": list(cfg.penalty_fractions), "kl": kl, "wdpo": wd,
    }


def run_shift(cfg: ShiftConfig, log: Callable[[str], None] = print) -> ShiftResult:
    """Run (or resume) every stage of the experiment; see the module docstring.

    Returns
    -------
    ShiftResult
    """
    import torch

    from drdpo_theory.llm.models import load_model

    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train").mkdir(exist_ok=True)
    (out / "eval").mkdir(exist_ok=True)
    _check_config(out, cfg)
    timings_path = out / "timings.json"
    timings = read_json(timings_path)
    timings = timings if isinstance(timings, dict) else {}
    stages_run: list[str] = []

    def add_time(stage: str, seconds: float) -> None:
        timings[stage] = round(timings.get(stage, 0.0) + seconds, 2)
        _write_json(timings_path, timings)
        stages_run.append(stage)

    def record(stage: str, t0: float) -> None:
        add_time(stage, time.perf_counter() - t0)

    train_prompts = load_prompts("train", cfg.n_train)
    test_prompts = load_prompts("test", cfg.n_test)
    cache: dict[str, Any] = {}

    def base() -> tuple[Any, Any]:
        if "model" not in cache:
            t0 = time.perf_counter()
            model, cache["tok"] = load_model(cfg.model, "fp32")
            cache["model"] = model
            log(f"loaded {cfg.model} in {time.perf_counter() - t0:.1f} s")
        return cache["model"], cache["tok"]

    # 1. train pool
    samples_path = out / "samples.jsonl"
    scores_path = out / "scores.json"
    scored = read_json(scores_path)  # None when missing or unreadable: the stage is redone
    if not (isinstance(scored, dict) and {"samples", "normalizer"} <= set(scored)
            and len(scored["samples"]) == len(train_prompts) * cfg.k):
        t0 = time.perf_counter()
        model, tok = base()
        samples = generate_completions(
            model, tok, train_prompts, cfg.k, samples_path, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, gen_batch=cfg.gen_batch, seed=cfg.sample_seed,
            desc="sample train pool", progress=cfg.progress, system=cfg.system_prompt,
        )
        record("sample", t0)
        # 2. scores and normaliser
        t0 = time.perf_counter()
        order = {p.id: i for i, p in enumerate(train_prompts)}
        samples = sorted(samples, key=lambda r: (order[r["prompt_id"]], r["sample"]))
        samples = _score_rows(samples, cfg.objectives)
        raw = np.array([[s["scores"][o] for o in cfg.objectives] for s in samples])
        norm = Normalizer.fit(raw)
        _write_json(scores_path, {"objectives": list(cfg.objectives), "normalizer": norm.to_json(), "samples": samples})
        record("score", t0)
        scored = read_json(scores_path)
    samples = scored["samples"]
    norm = Normalizer(tuple(scored["normalizer"]["mean"]), tuple(scored["normalizer"]["std"]))
    log(f"train pool: {len(samples)} completions; normaliser mean={norm.mean} std={norm.std}")

    # 3. pairs
    pairs_path = out / "pairs.jsonl"
    meta_path = out / "pairs_meta.json"
    meta = read_json(meta_path)
    pairs = _read_jsonl(pairs_path)
    if not (isinstance(meta, dict) and meta.get("n_pairs") == len(pairs) and "n_dropped" in meta):
        t0 = time.perf_counter()
        z = norm(np.array([[s["scores"][o] for o in cfg.objectives] for s in samples]))
        pairs, dropped = build_pairs(samples, z, cfg.alpha0, cfg.keep_ties, cfg.system_prompt, cfg.pairs_per_prompt)
        if len(pairs) < cfg.batch_size:
            raise ValueError(f"only {len(pairs)} preference pairs (dropped {dropped} tied prompts); need >= batch_size={cfg.batch_size}")
        _write_jsonl(pairs_path, pairs)
        _write_json(meta_path, {"n_pairs": len(pairs), "n_dropped": dropped, "alpha0": cfg.alpha0,
                                "rule": "top-vs-bottom r_alpha0 among K samples" if cfg.pairs_per_prompt == 1 else
                                f"j-th best vs j-th worst r_alpha0 among K samples, j < {cfg.pairs_per_prompt}"})
        record("pairs", t0)
        meta = read_json(meta_path)
    log(f"pairs: {len(pairs)} ({meta['n_dropped']} prompts dropped on ties)")
    conflict = objective_conflict(samples, pairs, cfg.objectives, norm)
    log(conflict_line(cfg.objectives, conflict))

    # 4.-5. train each run and evaluate it; the initial policy is evaluated as "reference"
    eval_seed0 = 0  # the initial policy is sampled like the seed-0 runs (common random numbers)
    evals: dict[str, list[list[dict[str, Any]]]] = {}
    ref_path = out / "eval" / "reference.jsonl"
    n_eval_rows = len(test_prompts) * cfg.eval_samples

    def scored_eval(path: Path) -> list[dict[str, Any]] | None:
        rows = _read_jsonl(path.with_suffix(".scored.jsonl"))
        return rows if len(rows) == n_eval_rows else None

    rows = scored_eval(ref_path)
    if rows is None:
        t0 = time.perf_counter()
        model, tok = base()
        rows = _eval_policy(cfg, model, tok, test_prompts, ref_path, eval_seed0, "eval reference", cfg.progress)
        record("eval:reference", t0)
    evals["reference"] = [rows]

    # the runs: fixed radii first; calibrated ones after the seed-one DPO run they are calibrated at
    calibrated = {m for m, on in (("kldpo", cfg.kl_radii), ("wdpo", cfg.penalty_fractions)) if on}
    tokenized_cache: list[Any] = []

    def tokenized() -> Any:
        if not tokenized_cache:
            tokenized_cache.append(_tokenize(base()[1], pairs))
        return tokenized_cache[0]

    def jobs_of(runs: Sequence[tuple[str, str, dict[str, Any]]]) -> list[tuple[str, str, dict[str, Any], int]]:
        return [(f"{name}-seed{seed}", method, extra, seed) for name, method, extra in runs for seed in cfg.seeds
                if scored_eval(out / "eval" / f"{name}-seed{seed}.jsonl") is None]

    calibration: dict[str, Any] | None = None
    cal_path = out / "calibration.json"
    cal_seed = cfg.seeds[0]

    def calibrate() -> dict[str, Any]:
        key = {"policy": f"dpo-seed{cal_seed}", "kl_radii": list(cfg.kl_radii),
               "penalty_fractions": list(cfg.penalty_fractions)}
        cal = read_json(cal_path)
        if isinstance(cal, dict) and all(cal.get(k) == v for k, v in key.items()):
            return cal
        t0 = time.perf_counter()
        model0, tok = base()
        cal = calibrate_radii(cfg, model0, tok, tokenized(), cal_seed)
        _write_json(cal_path, cal)
        record("calibrate", t0)
        return cal

    def apply(cal: dict[str, Any]) -> None:
        if cfg.kl_radii:
            cfg.taus = tuple(e["tau"] for e in cal["kl"])
        if cfg.penalty_fractions:
            cfg.rho0s = tuple(e["rho0"] for e in cal["wdpo"])
        log("calibrated at the DPO solution (" + f"dpo-seed{cal_seed}): "
            + ", ".join([f"KL rho={e['rho']:g} -> tau={e['tau']:g}" for e in cal["kl"]]
                        + [f"penalty {e['fraction']:g} x DPO loss -> rho0={e['rho0']:g}" for e in cal["wdpo"]]))

    fixed_runs = [r for r in cfg.runs() if r[1] not in calibrated]
    first = jobs_of(fixed_runs)
    need_cal = bool(calibrated)
    if need_cal:  # the calibration run goes first
        first.sort(key=lambda j: j[0] != f"dpo-seed{cal_seed}")
    bar = None
    if cfg.progress and (first or need_cal):  # the calibrated runs are added to the total once known
        from tqdm.auto import tqdm

        bar = tqdm(total=len(first) or None, desc="train + eval runs", unit="run")

    def done(report: dict[str, Any]) -> None:
        for k, v in report["timings"].items():
            add_time(k, v)
        if report["log"]:
            log(report["log"])
        if bar is not None:
            bar.update(1)

    def second_jobs() -> list[tuple[str, str, dict[str, Any], int]]:
        nonlocal calibration
        calibration = calibrate()
        apply(calibration)
        jobs = jobs_of([r for r in cfg.runs() if r[1] in calibrated])
        if bar is not None:
            bar.total = (bar.total or 0) + len(jobs)
            bar.refresh()
        return jobs

    def run_here(jobs: list[tuple[str, str, dict[str, Any], int]]) -> None:
        for job in jobs:
            model0, tok = base()
            done(_train_and_eval(cfg, *job, model0, tok, tokenized(), test_prompts, cfg.progress))

    if cfg.workers == 1:
        run_here(first)
        if need_cal:
            run_here(second_jobs())
    elif first or need_cal:  # second_jobs (the calibration included) runs in this process
        _run_pool(cfg, first, second_jobs if need_cal else None, f"dpo-seed{cal_seed}", done)
    if bar is not None:
        bar.close()
    for name, method, extra in cfg.runs():
        evals[name] = []
        for seed in cfg.seeds:
            rows = scored_eval(out / "eval" / f"{name}-seed{seed}.jsonl")
            if rows is None:
                raise RuntimeError(f"run {name}-seed{seed} has no complete evaluation after training")
            evals[name].append(rows)

    # 6. summary, table, figure
    policies = summarize(evals, cfg.objectives, norm, cfg.alphas, [p.id for p in test_prompts], cfg.n_boot)
    summary = {
        "model": cfg.model, "objectives": list(cfg.objectives), "alpha0": cfg.alpha0, "alphas": list(cfg.alphas),
        "normalizer": norm.to_json(), "n_train_prompts": len(train_prompts), "n_pairs": len(pairs),
        "n_test_prompts": len(test_prompts), "eval_samples": cfg.eval_samples, "seeds": list(cfg.seeds),
        "objective_conflict": conflict, "calibration": calibration,
        "policies": policies, "timings_s": timings, "smoke_test": cfg.smoke_test,
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "config": cfg.to_json(),
    }
    _write_json(out / "results.json", summary)
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["policy", "alpha", "mean", "lo", "hi", "diff_vs_dpo", "diff_lo", "diff_hi"])
    for name, e in policies.items():
        for i, a in enumerate(cfg.alphas):
            d = e["diff"]
            w.writerow([name, a, e["mean"][i], e["lo"][i], e["hi"][i]] +
                       ([d["mean"][i], d["lo"][i], d["hi"][i]] if d else ["", "", ""]))
    write_text(out / "results.csv", buf.getvalue())
    a0 = summary["alpha0"]
    shown = [a for a in cfg.alphas if any(abs(a - t) < 1e-9 for t in TABLE_ALPHAS + (a0,))]
    table = markdown_table(summary, shown if len(cfg.alphas) > 6 and len(shown) >= 5 else None)
    write_text(out / "results.md", table)
    fig_path = Path(cfg.figure) if cfg.figure else out / "llm_shift.png"
    plot_shift(summary, fig_path)
    if cfg.table:
        write_text(Path(cfg.table), table)
    if cfg.json_out:
        _write_json(Path(cfg.json_out), summary)
    return ShiftResult(summary, out, stages_run, time.perf_counter() - t_start)
