"""A lean trainer for DPO / IPO / KLDPO / WDPO on Hugging Face causal LMs.

One optimizer step (nanoGPT-style loop, docs/theory.md section 5 for the objectives):

1. for each of ``grad_accum`` micro-batches of ``batch_size`` pairs:
   :func:`drdpo_theory.llm.objectives.preference_backward` with ``loss_scale = 1/grad_accum``
   (forward over the ``2B`` chosen+rejected rows under the precision's autocast, then the
   backward; WDPO finite-diff runs two forward-backward passes there, one graph at a time).
   DDP syncs gradients on the last micro-batch only, once (the two-pass WDPO keeps its first
   pass local);
2. non-finite guard on every micro-batch's loss and on the global gradient norm (training
   stops before the optimizer step, nothing is written, the last good checkpoint stays as
   it was);
3. gradient clipping, AdamW step, linear-warmup + cosine learning-rate schedule;
4. one row of metrics appended to ``output_dir/metrics.csv`` (rank 0), optional TensorBoard;
5. every ``checkpoint_every`` steps a checkpoint under ``output_dir/checkpoints/step-XXXXXXXX``.

Reference log-probs ``log pi_ref(a|s)`` come either from a frozen copy of the initial policy
(``reference="model"``; with LoRA the base model with adapters disabled) or are computed once
before training and cached in ``output_dir/ref_logps.safetensors`` (``reference="precompute"``),
keyed by a fingerprint of the tokenised data and the model spec.

Resume is exact: data order is a function of ``(seed, epoch)`` only (a seeded
:class:`~torch.utils.data.DistributedSampler`, also with one process), and a checkpoint holds
the trainable weights, the optimizer and scheduler states, the RNG states of every rank and
the number of micro-batches consumed. Checkpoint layout (all tensors in safetensors)::

    step-XXXXXXXX/
        trainable.safetensors     parameters with requires_grad (LoRA: the adapters only)
        optimizer.safetensors     AdamW moments, keyed "<param index>.<name>"
        rng_rank<r>.safetensors   torch CPU (and CUDA) generator state of rank r
        trainer_state.json        step, consumed micro-batches, param groups, scheduler,
                                  python/numpy RNG states, TrainConfig (groupdpo eg: the
                                  group weights q, "group_weights")

A checkpoint directory is written under a temporary name and renamed when complete, so a crash
while saving never leaves a half-written ``step-*`` directory.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import hashlib
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from drdpo_theory.llm.distributed import all_reduce_sum_detached, rank, world_size
from drdpo_theory.llm.data import PreferenceCollator, TokenizedPair, fingerprint_pairs

try:  # llm/ may call the theory side's numpy solvers (never the reverse)
    from drdpo_theory.solvers.kl import kl_inner
except ImportError:  # pragma: no cover
    kl_inner = None

__all__ = [
    "CheckpointError",
    "NonFiniteError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_policy",
    "cosine_with_warmup",
    "disable_dropout",
    "init_distributed",
    "latest_checkpoint",
    "read_checkpoint_state",
    "train",
    "validate_run_dir",
    "weights_fingerprint",
]

METHODS = ("dpo", "ipo", "kldpo", "wdpo", "rdpo", "cdpo", "chi2dpo", "cvardpo", "groupdpo", "dr_dpo")
KLDPO_VARIANTS = ("clamped", "normalized", "calibrated")
WDPO_IMPLS = ("double-backward", "finite-diff")
PRECISIONS = ("fp32", "bf16", "bf16-mixed")
REFERENCES = ("precompute", "model")
STRATEGIES = ("ddp", "fsdp")
RESUME_MAY_CHANGE = frozenset(
    {"output_dir", "max_steps", "checkpoint_every", "keep_checkpoints", "tensorboard", "progress",
     "eval_every", "eval_kl_rhos", "merge_lora", "export"}
)
"""TrainConfig fields a resumed run may change; any other difference is refused."""
BASE_COLUMNS = ("step", "epoch", "loss", "learning_rate", "lr", "grad_norm", "seconds")
"""Columns metrics.csv starts with (``learning_rate`` is TRL's name, ``lr`` kept for older readers);
the loss metrics and the ``eval/...`` metrics follow in sorted order. Evaluation rows fill only
``step``, ``epoch`` and the ``eval/`` columns."""

DEFAULT_LR = {"tiny-random": 1e-3, "lora": 1e-4, "full": 5e-6}
"""Default peak learning rate: full fine-tuning 5e-6 and LoRA 1e-4 (pretrained models, TRL-like);
``tiny-random`` is a randomly initialised 2-layer toy whose logits barely move at those rates, so
it gets 1e-3 (with it, 30 default DPO steps on the toy data lower the loss visibly)."""

FINAL_DIR = "final"
"""Folder of the exported policy under ``output_dir`` (``final-merged`` for merged LoRA)."""

OWN_OUTPUTS = ("metrics.csv", "checkpoints", FINAL_DIR, FINAL_DIR + "-merged", "ref_logps.safetensors",
               "ref_logps_eval.safetensors", "tensorboard")
"""What a run writes under ``output_dir`` (``--overwrite`` removes exactly these)."""


class CheckpointError(ValueError):
    """A checkpoint or cache is missing, corrupt, or belongs to another run (the message names the file)."""


class NonFiniteError(RuntimeError):
    """Raised when a loss or gradient is NaN/inf; the message names the step and the last checkpoint."""


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run; every field documents itself in ``metadata['help']``.

    Validated in ``__post_init__``; ``ValueError`` messages name the field and the allowed values.
    """

    output_dir: str = _help("Directory for metrics.csv, checkpoints/, ref_logps.safetensors, tensorboard/.", default="runs/align")
    method: str = _help(
        "Objective: 'dpo', 'ipo', 'kldpo', 'wdpo', or a robust-family member 'rdpo', 'cdpo', 'chi2dpo', 'cvardpo', "
        "'groupdpo', 'dr_dpo' (docs/llm_losses.md, docs/theory_family.md).",
        default="dpo",
    )
    beta: float = _help("DPO temperature beta (> 0) multiplying the reward margin h.", default=0.1)
    kldpo_variant: str = _help("KLDPO pair weights: 'clamped' (authors' code), 'normalized' or 'calibrated'.", default="clamped")
    tau: float = _help("KLDPO temperature tau (> 0) in w_i = exp((l_i - mean_j l_j)/tau), a stand-in for lam*.", default=1.0)
    rho: float | None = _help("KL radius rho (>= 0) of the 'calibrated' KLDPO variant (required there, unused otherwise).", default=None)
    clamp: float = _help("Upper clamp of the KLDPO weights (authors' code: 10).", default=10.0)
    wdpo_impl: str = _help(
        "WDPO gradient: 'finite-diff' (two passes, fused attention kept) or 'double-backward' (needs eager attention).",
        default="finite-diff",
    )
    rho0: float = _help("WDPO penalty coefficient rho0 (>= 0) on ||grad_emb l_i||^2 (0 gives DPO).", default=0.01)
    fd_step: float | None = _help(
        "Relative finite-difference step (> 0) of the 'finite-diff' WDPO gradient; None: sqrt(eps) of the dtype.", default=None
    )
    wdpo_penalty: str = _help(
        "WDPO gradient norm: 'rows' (chosen and rejected rows as two inputs) or 'tuple' (z = (s, a_w, a_l), the prompt "
        "one shared input; docs/llm_losses.md).",
        default="rows",
    )
    fd_pass2_chunks: int = _help(
        "Pair chunks (>= 1) of the second pass of the 'finite-diff' WDPO gradient: exact; K chunks cut the activations "
        "held beside pass 1's gradient K-fold for K - 1 more passes; plain/DDP models without active dropout.", default=1
    )
    alpha: float | None = _help("CVaR level alpha in (0, 1] of 'cvardpo'.", default=None)
    eps: float | None = _help("Label-flip rate eps in [0, 0.5) of 'rdpo' and 'cdpo'.", default=None)
    beta_prime: float = _help("Dr.DPO temperature beta' > 0 of 'dr_dpo'.", default=1.0)
    group_weights: str = _help(
        "Group weights of 'groupdpo': 'eg' (online exponentiated gradient, Ramesh et al. 2024; q saved in checkpoints) "
        "or 'worst' (the exact worst group of each batch).", default="eg",
    )
    group_step: float = _help("EG step eta_q > 0 of 'groupdpo' with group_weights='eg'.", default=0.01)
    group_init: str = _help("Initial EG group weights: 'uniform' or 'proportional' to the groups' nominal mass.",
                            default="uniform")
    lr: float | None = _help(
        "Peak AdamW learning rate (> 0); None: DEFAULT_LR (5e-6 full, 1e-4 LoRA, 1e-3 for tiny-random).", default=None
    )
    weight_decay: float = _help("AdamW decoupled weight decay (>= 0).", default=0.0)
    warmup_steps: int = _help("Linear warm-up steps from 0 to lr (>= 0).", default=0)
    schedule: str = _help("Learning-rate schedule after warm-up: 'cosine' (to min_lr_ratio*lr) or 'constant'.", default="cosine")
    min_lr_ratio: float = _help("Final learning rate of the cosine schedule as a fraction of lr, in [0, 1].", default=0.0)
    max_steps: int = _help("Number of optimizer steps (>= 1).", default=100)
    batch_size: int = _help("Preference pairs per micro-batch and process (>= 1); the forward sees 2*batch_size rows.", default=4)
    grad_accum: int = _help("Micro-batches accumulated per optimizer step (>= 1).", default=1)
    max_grad_norm: float = _help("Global gradient-norm clip (> 0); 0 disables clipping (the norm is still checked).", default=1.0)
    max_length: int = _help("Maximum prompt+answer length in tokens.", default=512)
    max_prompt_length: int | None = _help(
        "Maximum prompt length in tokens (< max_length; prompts keep their end); None: max_length // 2.", default=None
    )
    precision: str = _help("'fp32'; 'bf16' (bf16 weights); 'bf16-mixed' (fp32 weights, bf16 autocast).", default="fp32")
    lora: bool = _help("Train LoRA adapters (peft) instead of all weights.", default=False)
    lora_r: int = _help("LoRA rank r (>= 1).", default=16)
    lora_alpha: float = _help("LoRA scaling alpha (> 0).", default=32.0)
    lora_dropout: float = _help("LoRA dropout probability in [0, 1).", default=0.0)
    lora_target_modules: tuple[str, ...] = _help(
        "Module names receiving adapters, or ('all-linear',).", default=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    reference: str = _help("Reference log-probs: 'precompute' (once, cached on disk) or 'model' (frozen copy).", default="precompute")
    checkpoint_every: int = _help("Save a checkpoint every K optimizer steps (0: only at the end).", default=0)
    keep_checkpoints: int = _help("Keep the newest N checkpoints (0: keep all).", default=0)
    seed: int = _help("Seed of data order, LoRA init and dropout.", default=0)
    tensorboard: bool = _help("Also log metrics to output_dir/tensorboard (needs the tensorboard package).", default=False)
    progress: bool = _help("Show a tqdm progress bar on rank 0.", default=True)
    model_spec: str = _help("Name of the model (recorded in checkpoints and the reference cache key).", default="")
    keep_dropout: bool = _help(
        "Keep the model's dropout in training (default: disabled in policy and reference, as TRL's disable_dropout).",
        default=False,
    )
    gradient_checkpointing: bool = _help("Recompute activations in the backward (less memory, ~30% more time).", default=False)
    strategy: str = _help(
        "Several processes (torchrun): 'ddp' (replicated weights, DistributedDataParallel) or 'fsdp' (FSDP2: "
        "fully_shard per decoder layer + root; checkpoints and export gather the full weights). One process: ignored.",
        default="ddp",
    )
    eval_every: int = _help("Evaluate on the eval pairs every K optimizer steps (0: at the end only).", default=0)
    eval_kl_rhos: tuple[float, ...] = _help(
        "KL radii rho of the eval/kl_worst_loss@rho metrics (exact worst case over the KL ball around the eval pairs).",
        default=(0.01, 0.1),
    )
    export: bool = _help("Write output_dir/final (model or adapter folder) when training finishes.", default=True)
    merge_lora: bool = _help("LoRA: also write output_dir/final-merged, the adapters merged into the base.", default=False)

    def __post_init__(self) -> None:
        def choice(name: str, allowed: Sequence[str]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {list(allowed)}; got {getattr(self, name)!r}")

        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {what}; got {getattr(self, name)!r}")

        if self.lr is None:
            self.lr = DEFAULT_LR["tiny-random" if self.model_spec == "tiny-random" else ("lora" if self.lora else "full")]
        if self.max_prompt_length is None and isinstance(self.max_length, int):
            self.max_prompt_length = max(1, self.max_length // 2)
        self.eval_kl_rhos = tuple(float(r) for r in self.eval_kl_rhos)
        choice("method", METHODS)
        choice("kldpo_variant", KLDPO_VARIANTS)
        choice("wdpo_impl", WDPO_IMPLS)
        choice("wdpo_penalty", ("rows", "tuple"))
        choice("schedule", ("cosine", "constant"))
        choice("precision", PRECISIONS)
        choice("reference", REFERENCES)
        choice("strategy", STRATEGIES)
        for name in ("rho", "fd_step"):
            v = getattr(self, name)
            check(name, v is None or (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0), "None or a finite number >= 0")
        check("fd_step", self.fd_step is None or self.fd_step > 0, "None or > 0")
        check("fd_pass2_chunks", isinstance(self.fd_pass2_chunks, int) and not isinstance(self.fd_pass2_chunks, bool)
              and self.fd_pass2_chunks >= 1, "an integer >= 1")
        if self.method == "kldpo" and self.kldpo_variant == "calibrated":
            check("rho", self.rho is not None, "set (the KL radius) for kldpo_variant='calibrated'")
        for name in ("beta", "tau", "clamp", "lr", "lora_alpha"):
            v = getattr(self, name)
            check(name, isinstance(v, (int, float)) and math.isfinite(v) and v > 0, "a finite number > 0")
        for name in ("rho0", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            check(name, isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, "a finite number >= 0")
        check("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "in [0, 1]")
        check("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "in [0, 1)")
        for name in ("max_steps", "batch_size", "grad_accum", "lora_r", "max_length", "max_prompt_length"):
            check(name, isinstance(getattr(self, name), int) and getattr(self, name) >= 1, "an integer >= 1")
        for r in self.eval_kl_rhos:
            if not (math.isfinite(r) and r > 0):
                raise ValueError(f"TrainConfig.eval_kl_rhos must hold finite numbers > 0; got {self.eval_kl_rhos!r}")
        if self.merge_lora and not self.lora:
            raise ValueError("TrainConfig.merge_lora needs lora=True (merging folds LoRA adapters into the base)")
        for name in ("warmup_steps", "checkpoint_every", "keep_checkpoints", "eval_every"):
            check(name, isinstance(getattr(self, name), int) and getattr(self, name) >= 0, "an integer >= 0")
        check("max_prompt_length", self.max_prompt_length < self.max_length, f"< max_length={self.max_length}")
        self.lora_target_modules = tuple(self.lora_target_modules)
        check("lora_target_modules", len(self.lora_target_modules) > 0, "non-empty")
        self.loss_config()  # the objective's own checks (e.g. chi2dpo needs rho, cvardpo alpha)

    def loss_config(self) -> Any:
        """The :class:`drdpo_theory.llm.objectives.LossConfig` of this run."""
        from drdpo_theory.llm.objectives import LossConfig

        return LossConfig(
            method=self.method,
            beta=self.beta,
            kldpo_variant=self.kldpo_variant,
            tau=self.tau,
            rho=self.rho,
            clamp=self.clamp,
            wdpo_impl=self.wdpo_impl,
            rho0=self.rho0,
            fd_step=self.fd_step,
            wdpo_penalty=self.wdpo_penalty,
            fd_pass2_chunks=self.fd_pass2_chunks,
            alpha=self.alpha,
            eps=self.eps,
            beta_prime=self.beta_prime,
            group_weights=self.group_weights,
            group_step=self.group_step,
            group_init=self.group_init,
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict of all fields."""
        d = dataclasses.asdict(self)
        d["lora_target_modules"] = list(self.lora_target_modules)
        d["eval_kl_rhos"] = list(self.eval_kl_rhos)
        return d


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    losses : list of float
        Loss of every optimizer step run in this call (step ``start_step + 1`` first).
    rows : list of dict
        The metrics rows written in this call.
    start_step, final_step : int
        Step count before and after this call.
    checkpoint : pathlib.Path or None
        Last checkpoint written (or resumed from).
    interrupted : bool
        True when SIGINT (KeyboardInterrupt) or SIGTERM stopped the run (a checkpoint was
        saved first).
    signal : str or None
        ``"SIGINT"`` or ``"SIGTERM"`` when interrupted.
    exported : list of pathlib.Path
        Folders written by the final export (``output_dir/final`` and, merged, ``final-merged``).
    eval_rows : list of dict
        The evaluation rows written in this call.
    """

    losses: list[float]
    rows: list[dict[str, Any]]
    start_step: int
    final_step: int
    checkpoint: Path | None
    interrupted: bool = False
    signal: str | None = None
    exported: list[Path] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)


def cosine_with_warmup(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0, cosine: bool = True) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based).

    .. math::

        m(t) = \\begin{cases} (t+1)/(W+1) & t < W \\\\
        r + (1 - r)\\,\\tfrac12\\bigl(1 + \\cos(\\pi\\,\\tfrac{t - W}{\\max(1, S - W)})\\bigr) & t \\ge W
        \\end{cases}

    with ``W`` warm-up steps, ``S`` max steps, ``r`` the final ratio (``m = 1`` after warm-up
    for a constant schedule).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest complete ``step-*`` checkpoint under ``output_dir/checkpoints`` (``None`` if none)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "trainer_state.json").is_file())
    return steps[-1] if steps else None


CHECKPOINT_KEYS = ("step", "consumed", "world_size", "param_names", "param_groups", "optimizer_scalars",
                   "scheduler", "python_rng", "numpy_rng", "config")


RESUME_ELSEWHERE = "resume from another checkpoint or start over with --overwrite"
RECOMPUTE_CACHE = "delete it to recompute it"


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``path/trainer_state.json``.

    Raises
    ------
    CheckpointError
        If ``path`` is not a checkpoint folder, or its state file is unreadable, not JSON, or
        lacks a field; the message names the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no trainer_state.json)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{state_file}: corrupt checkpoint state ({type(exc).__name__}); {RESUME_ELSEWHERE}"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{state_file}: corrupt checkpoint state (missing {missing})")
    return state


def _check_safetensors(path: Path, what: str, remedy: str) -> None:
    """Raise CheckpointError (naming ``what`` and the ``remedy``) unless ``path`` has a readable safetensors header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # safetensors raises its own error types on damaged files
        raise CheckpointError(f"{path}: corrupt {what} ({type(exc).__name__}); {remedy}") from None


def validate_run_dir(output_dir: str | os.PathLike, resume: str | os.PathLike | None) -> Path | None:
    """Check, before any work, the files a run in ``output_dir`` would read: the checkpoint to resume
    (``resume``: a folder or ``"auto"``) and the reference caches. Returns the checkpoint or None.

    Raises
    ------
    CheckpointError
        Naming the first damaged file (state JSON, a safetensors header, a cache).
    """
    out = Path(output_dir)
    for name in ("ref_logps.safetensors", "ref_logps_eval.safetensors"):
        if (out / name).is_file():
            _check_safetensors(out / name, "reference log-prob cache", RECOMPUTE_CACHE)
    if resume is None:
        return None
    ckpt = latest_checkpoint(out) if str(resume) == "auto" else Path(resume)
    if ckpt is None:
        return None
    read_checkpoint_state(ckpt)
    for f in sorted(ckpt.glob("*.safetensors")):
        _check_safetensors(f, "checkpoint file", RESUME_ELSEWHERE)
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt / name}: missing checkpoint file")
    return ckpt


def weights_fingerprint(model: torch.nn.Module) -> str:
    """BLAKE2b digest of every tensor of ``model.state_dict()`` (names, dtypes, shapes, bytes).

    Keys the reference log-prob caches and checkpoints: replacing the weights file of a model
    folder changes it even when the model's name does not change.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability of ``model`` to 0 (TRL's ``disable_dropout``), in place.

    Covers ``nn.Dropout`` modules (LoRA dropout included) and the float ``attention_dropout``
    / ``dropout`` attributes that transformers' attention modules pass to the attention kernel.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
            continue
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model


def sparse_tied_embedding_grad(model: torch.nn.Module) -> bool:
    r"""Let a tied, trained embedding table take its lookup gradient sparse (``nn.Embedding.sparse``), in place.

    With tied input and output embeddings the table W (V, D) gets two gradient terms: the
    LM head's (dense, computed first) and the lookup's. Autograd sums them before
    accumulating into ``W.grad``; the dense lookup backward builds a second (V, D) tensor
    for it at the end of the backward, when every other gradient is already allocated, so
    it sets the step's peak memory (108 MiB in fp32 for SmolLM2-135M's 49152 x 576 table,
    ~1 GiB for Llama-3.2-1B's 128256 x 2048). As a sparse tensor (one row per token) the
    lookup term is added into the head's dense term in place: same gradient (up to the
    order of the fp sums), dense ``.grad``, no second table.

    Only for tied tables that require grad (the sum is then dense: an untied sparse
    ``.grad`` would reach the optimizer) and a single process (DDP treats a sparse
    embedding as a sparse-gradient parameter). Returns whether it was switched on.
    """
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if not isinstance(emb, torch.nn.Embedding):  # (subclasses that ignore ``sparse`` just stay dense)
        return False
    if emb.max_norm is not None or head is None or getattr(head, "weight", None) is not emb.weight:
        return False
    if not emb.weight.requires_grad:
        return False
    emb.sparse = True
    return True


def build_policy(model: torch.nn.Module, cfg: "TrainConfig") -> torch.nn.Module:
    """The trained policy of ``cfg``: dtype cast, dropout off (unless ``keep_dropout``), LoRA, checkpointing.

    Returns ``model`` itself for full fine-tuning, a ``peft.PeftModel`` with LoRA (new adapter
    weights from the global torch RNG).
    """
    if cfg.precision == "bf16":
        model = model.to(torch.bfloat16)
    else:  # fp32, and bf16-mixed: fp32 master weights, bf16 compute under autocast
        model = model.float()
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets: Any = "all-linear" if cfg.lora_target_modules == ("all-linear",) else list(cfg.lora_target_modules)
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=targets, task_type="CAUSAL_LM",
            ),
        )
    if not cfg.keep_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        # non-reentrant checkpointing: works with frozen inputs (LoRA), inputs_embeds and double backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model


def _barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def fully_shard_policy(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer (the model's ``_no_split_modules`` classes), then the root.

    Works on a transformers model or a peft ``PeftModel`` around one, in place; the root's
    forward gathers the embeddings and head, each layer's forward its own parameters.
    """
    from torch.distributed.fsdp import fully_shard

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_names = set(getattr(hf, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_names]
    if not layers:
        raise ValueError(f"--strategy fsdp: {type(hf).__name__} names no decoder-layer class (_no_split_modules)")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _reshard(model: torch.nn.Module) -> None:
    """Free FSDP2's unsharded parameters after a no-grad forward.

    FSDP2 keeps the root's parameters gathered after a forward (``reshard_after_forward`` is off
    for the root); a training forward that starts from that state did not reduce-scatter the
    root's gradients at the end of the next backward (measured: WDPO's two-pass estimator then
    lost pass 1's embedding/head gradients on the step after a reference or eval pass).
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _full(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (a collective: every rank calls it in the same order); else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``ref``: this rank's shard when ``ref`` is a DTensor."""
    full = full.to(ref.device, ref.dtype)
    if hasattr(ref, "device_mesh") and hasattr(ref, "placements"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, ref.device_mesh, ref.placements)
    return full


def make_adamw(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float, fused: bool = True
               ) -> torch.optim.Optimizer:
    """``torch.optim.AdamW``, fused where the device and dtype support it, else the foreach kernel.

    The three implementations compute the same update up to floating-point rounding (tested);
    the fused one is ~3.5x faster on CPU at 135M parameters.
    """
    try:
        if not fused:
            raise ValueError("foreach requested")
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # device or dtype without a fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


class Trainer:
    """Training loop state; use :func:`train` unless you need the pieces.

    Parameters
    ----------
    cfg : TrainConfig
    model : transformers.PreTrainedModel
        The policy (already on ``device``; wrapped with LoRA/DDP here).
    tokenizer : transformers.PreTrainedTokenizerBase
        Provides the pad id; saved with the final export.
    pairs : sequence of TokenizedPair
        Tokenised training data (:func:`drdpo_theory.llm.data.tokenize_preferences`).
    device : torch.device, optional
        Defaults to ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        tokenizer: Any,
        pairs: Sequence[TokenizedPair],
        device: torch.device | None = None,
        eval_pairs: Sequence[TokenizedPair] | None = None,
    ) -> None:
        if not pairs:
            raise ValueError("no training pairs")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pairs = list(pairs)
        self.eval_pairs = list(eval_pairs or [])
        # nominal distribution p: pair weights normalised to mean 1 over the training set, so the
        # batch mean of w_i * l_i estimates sum_i p_i l_i without bias (uniform sampling)
        total = sum(p.weight for p in self.pairs)
        if not total > 0:
            raise ValueError("every training pair has weight 0")
        self.weight_scale = len(self.pairs) / total
        self.rank, self.world = rank(), world_size()
        if len(self.pairs) < cfg.batch_size * self.world:
            raise ValueError(
                f"{len(self.pairs)} pairs cannot fill one batch of batch_size={cfg.batch_size} "
                f"on {self.world} process(es)"
            )
        if device is None:
            if torch.cuda.is_available():
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            else:
                device = torch.device("cpu")
        self.device = device
        self.out = Path(cfg.output_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        _barrier()
        self.loss_cfg = cfg.loss_config()
        self.group_state = None  # groupdpo --group-weights eg: the online group weights (checkpointed)
        if cfg.method == "groupdpo" and cfg.group_weights == "eg":
            from drdpo_theory.llm.family import GroupEGState

            self.group_state = GroupEGState.from_data([p.group for p in self.pairs], [p.weight for p in self.pairs],
                                                      step=cfg.group_step, init=cfg.group_init)
        # q as of the end of the last completed step (an interrupted step may have updated it already)
        self._group_snapshot = None if self.group_state is None else self.group_state.state_dict()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collate = PreferenceCollator(pad if pad is not None else 0)

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        model = model.to(device)
        self.weights_fp = weights_fingerprint(model)  # the initial policy = the reference
        self.ref_model: torch.nn.Module | None = None
        if cfg.reference == "model" and not cfg.lora:
            ref = copy.deepcopy(model)
            ref = ref.to(torch.bfloat16) if cfg.precision == "bf16" else ref.float()
            self.ref_model = disable_dropout(ref).eval().requires_grad_(False)
        model = build_policy(model, cfg)
        model.train()
        self.base = model  # unwrapped policy (a PeftModel with LoRA)
        self.sharded = self.world > 1 and cfg.strategy == "fsdp"
        if self.sharded:
            model = fully_shard_policy(model)
            self.base = model
        elif self.world > 1:
            ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
            model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kw)
        self.model = model
        # one process: the tied table's lookup gradient stays sparse until it meets the head's (peak memory)
        self.sparse_embedding_grad = self.world == 1 and sparse_tied_embedding_grad(self.base)
        self.params = [p for p in self.base.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.base.named_parameters() if p.requires_grad]
        self.optimizer = make_adamw(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=not self.sharded)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: cosine_with_warmup(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.schedule == "cosine"),
        )
        from torch.utils.data import DistributedSampler

        self.sampler = DistributedSampler(
            range(len(self.pairs)), num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        self.batches_per_epoch = len(self.sampler) // cfg.batch_size
        self.step = 0
        self.consumed = 0  # micro-batches consumed by this rank
        self.ref_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eval_ref: tuple[torch.Tensor, torch.Tensor] | None = None
        self._eval_step: int | None = None
        self._stop_signal: str | None = None
        self._metrics_header: list[str] | None = None  # metrics.csv's columns once read or written
        self.last_checkpoint: Path | None = None
        self._rng_snapshot = self._rng_state()
        self._tb = None

    # ------------------------------------------------------------------ data
    def _batch_at(self, consumed: int) -> dict[str, torch.Tensor]:
        """Micro-batch number ``consumed`` of this rank: a pure function of (seed, epoch, position)."""
        epoch, pos = divmod(consumed, self.batches_per_epoch)
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        idx = order[pos * self.cfg.batch_size : (pos + 1) * self.cfg.batch_size]
        return self.collate([self.pairs[i] for i in idx])

    def _autocast(self) -> Any:
        if self.cfg.precision == "bf16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    # ------------------------------------------------------------- reference
    def _rank_batches(self, n: int) -> list[tuple[list[int], bool]]:
        """This rank's share of ``range(n)`` in batches, the same number of batches on every rank.

        Sharded engines run collectives in every forward, so a rank with fewer items runs dummy
        batches (``[0]``, flagged False: results discarded) until all ranks are done.
        """
        mine = list(range(self.rank, n, self.world))
        per_rank = -(-n // self.world)
        count = -(-per_rank // self.cfg.batch_size)
        out = []
        for j in range(count):
            idx = mine[j * self.cfg.batch_size : (j + 1) * self.cfg.batch_size]
            out.append((idx, True) if idx else ([0], False))
        return out

    def _policy_logps(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor], adapters: bool = True):
        """Sequence log-probs (chosen, rejected) in eval mode (no dropout), no grad."""
        from drdpo_theory.llm.logprobs import concatenated_logps

        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), self._autocast():
                ctx = self.base.disable_adapter() if (self.cfg.lora and not adapters) else contextlib.nullcontext()
                with ctx:
                    return concatenated_logps(module, inputs)
        finally:
            module.train(was_training)
            if self.sharded:
                _reshard(module)

    def _all_logps(self, pairs: Sequence[TokenizedPair], logps_of: Callable[[dict[str, torch.Tensor]], Any]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) sequence log-probs of every pair, each (N,) float64 on the CPU.

        Each rank runs ``logps_of(batch)`` on its share (:meth:`_rank_batches`, a collated batch on
        the device); one all-reduce assembles the vectors (each entry is non-zero on one rank only).
        """
        out = torch.zeros(2, len(pairs), dtype=torch.float64, device=self.device)
        for idx, real in self._rank_batches(len(pairs)):
            batch = {k: v.to(self.device) for k, v in self.collate([pairs[i] for i in idx]).items()}
            c, r = logps_of(batch)
            if real:
                out[0, idx], out[1, idx] = c.double(), r.double()
        if self.world > 1:
            dist.all_reduce(out)
        return out[0].cpu(), out[1].cpu()

    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_cache is not None:
            idx = batch["index"]
            return self.ref_cache[0][idx].to(self.device), self.ref_cache[1][idx].to(self.device)
        inputs = {k: v for k, v in batch.items() if k not in ("index", "weight")}
        if self.ref_model is not None:
            c, r = self._policy_logps(self.ref_model, inputs)
        else:  # LoRA: the base model (adapters disabled) is the reference
            c, r = self._policy_logps(self.base, inputs, adapters=False)
        return c.detach().float(), r.detach().float()

    def _reference_key(self, pairs: Sequence[TokenizedPair] | None = None) -> str:
        return json.dumps(
            {
                "data": fingerprint_pairs(self.pairs if pairs is None else pairs),
                "model": self.cfg.model_spec,
                "weights": self.weights_fp,
                "precision": self.cfg.precision,
            },
            sort_keys=True,
        )

    def _read_reference_cache(self, path: Path, key: str, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached (chosen, rejected) log-probs if ``path`` holds them for ``key``; None if absent or stale."""
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("key") != key:
                    return None  # another model, data or precision: recomputed
                t = {name: fh.get_tensor(name) for name in ("chosen", "rejected")}
        except Exception as exc:  # safetensors raises its own error types on damaged files
            raise CheckpointError(
                f"{path}: corrupt reference log-prob cache ({type(exc).__name__}); {RECOMPUTE_CACHE}"
            ) from None
        if any(v.shape != (n,) or not torch.isfinite(v).all() for v in t.values()):
            raise CheckpointError(f"{path}: corrupt reference log-prob cache (expected {n} finite values per answer); "
                                  f"{RECOMPUTE_CACHE}")
        return t["chosen"], t["rejected"]

    def _compute_reference(self, pairs: Sequence[TokenizedPair], path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """``log pi_ref`` of every pair of ``pairs`` (sharded over ranks), cached atomically at ``path``."""
        from safetensors.torch import save_file

        key = self._reference_key(pairs)
        cached = self._read_reference_cache(path, key, len(pairs))
        if cached is not None:
            return cached
        chosen, rejected = self._all_logps(pairs, lambda b: self._policy_logps(self.base, b, adapters=False))
        out = (chosen.float(), rejected.float())
        if self.rank == 0:
            tmp = path.with_name(f".tmp-{path.name}")
            save_file({"chosen": out[0], "rejected": out[1]}, str(tmp), metadata={"key": key})
            os.replace(tmp, path)
        _barrier()
        return out

    def precompute_reference(self) -> None:
        """Compute ``log pi_ref`` of every training (and eval) pair once and cache it on disk.

        The cache ``output_dir/ref_logps.safetensors`` (``ref_logps_eval.safetensors`` for the
        eval pairs) holds tensors ``chosen`` and ``rejected`` of shape ``(N,)`` and, in its
        metadata, the key: a hash of the tokenised data, a hash of the initial weights
        (:func:`weights_fingerprint`), the model spec and the precision. A cache with another
        key is recomputed; an unreadable one raises :class:`CheckpointError`. The reference is
        the initial policy in eval mode (no dropout; with LoRA, adapters disabled).
        """
        if self.ref_cache is None:
            self.ref_cache = self._compute_reference(self.pairs, self.out / "ref_logps.safetensors")
        if self.eval_pairs and self.eval_ref is None:
            self.eval_ref = self._compute_reference(self.eval_pairs, self.out / "ref_logps_eval.safetensors")

    def _eval_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.eval_ref is None:
            if self.cfg.reference == "precompute":
                self.precompute_reference()
            else:  # frozen reference model (or LoRA base): computed once, kept in memory
                c_all, r_all = self._all_logps(self.eval_pairs, self._reference_logps)
                self.eval_ref = (c_all.float(), r_all.float())
        return self.eval_ref

    # ------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any]:
        """Metrics of the current policy on the eval pairs (eval mode, no grad), TRL's names under ``eval/``.

        With p the eval pairs' normalised weights and l_i the per-pair loss of the method's base
        objective (DPO; IPO for ``ipo``), all on held-out data:

        * ``eval/loss`` = sum_i p_i l_i (the same quantity for every method, so runs compare);
        * ``eval/rewards/{chosen,rejected,margins}``, ``eval/logps/{chosen,rejected}``: p-weighted
          means of the implicit rewards beta (log pi - log pi_ref) and sequence log-probs;
        * ``eval/rewards/accuracies``: p-mass of pairs with a positive reward margin;
        * ``eval/kl_worst_loss@RHO`` for each RHO in ``eval_kl_rhos``: the exact worst-case
          mean loss sup {E_q l : KL(q || p) <= RHO} over the KL ball around the eval pairs
          (``drdpo_theory.solvers.kl.kl_inner``), the robust objective on held-out data.

        Returns an empty dict when there are no eval pairs. Every rank must call it.
        """
        from drdpo_theory.llm.losses import dpo_loss, ipo_loss

        if not self.eval_pairs:
            return {}
        ref_c, ref_r = self._eval_reference()
        n = len(self.eval_pairs)
        pc, pr = self._all_logps(self.eval_pairs, lambda b: self._policy_logps(self.base, b))
        rc, rr = ref_c.double(), ref_r.double()
        beta = self.cfg.beta
        loss_fn = ipo_loss if self.cfg.method == "ipo" else dpo_loss
        losses = loss_fn(pc, pr, rc, rr, beta).numpy()  # (n,)
        w = np.array([p.weight for p in self.eval_pairs], dtype=np.float64)
        if not w.sum() > 0:
            w = np.ones(n)
        p = w / w.sum()
        r_c, r_r = (beta * (pc - rc)).numpy(), (beta * (pr - rr)).numpy()
        margin = r_c - r_r
        out: dict[str, Any] = {
            "eval/loss": float(p @ losses),
            "eval/rewards/chosen": float(p @ r_c),
            "eval/rewards/rejected": float(p @ r_r),
            "eval/rewards/margins": float(p @ margin),
            "eval/rewards/accuracies": float(p @ (margin > 0)),
            "eval/logps/chosen": float(p @ pc.numpy()),
            "eval/logps/rejected": float(p @ pr.numpy()),
        }
        if kl_inner is not None:
            for rho in self.cfg.eval_kl_rhos:
                out[f"eval/kl_worst_loss@{rho:g}"] = float(kl_inner(losses, p, rho).value)
        return out

    def _eval_row(self) -> dict[str, Any]:
        row = {"step": self.step, "epoch": round(self.consumed / self.batches_per_epoch, 4)}
        row.update(self.evaluate())
        self._eval_step = self.step
        return row

    # ------------------------------------------------------------ checkpoint
    def _rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step (state as of the end of that step)."""
        from safetensors.torch import save_file

        root = self.out / "checkpoints"
        final = root / f"step-{self.step:08d}"
        tmp = root / f".tmp-step-{self.step:08d}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        rng = self._rng_snapshot
        rng_t = {"torch": rng["torch"]}
        if "cuda" in rng:
            rng_t["cuda"] = rng["cuda"]
        save_file(rng_t, str(tmp / f"rng_rank{self.rank}.safetensors"))
        _barrier()  # every rank's RNG file is written before rank 0 renames the directory
        # full tensors (FSDP2: gathered from the shards on every rank, in the same order)
        weights = {n: _full(p.detach()).cpu().contiguous() for n, p in zip(self.param_names, self.params)}
        opt = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for pid, st in opt["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{pid}.{k}"] = _full(v.detach()).cpu().contiguous()
                else:
                    scalars[f"{pid}.{k}"] = v
        if self.rank == 0:
            save_file(weights, str(tmp / "trainable.safetensors"))
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
            np_state = rng["numpy"]
            state = {
                "step": self.step,
                "consumed": self.consumed,
                "world_size": self.world,
                "param_names": self.param_names,
                "param_groups": opt["param_groups"],
                "optimizer_scalars": scalars,
                "scheduler": sched,
                "python_rng": [rng["python"][0], list(rng["python"][1]), rng["python"][2]],
                "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
                "config": self.cfg.to_json(),
                "identity": self._identity(),
            }
            if self._group_snapshot is not None:
                state["group_weights"] = self._group_snapshot
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if self.cfg.keep_checkpoints:
                old = sorted(p for p in root.glob("step-*") if p.is_dir())[: -self.cfg.keep_checkpoints]
                for p in old:
                    shutil.rmtree(p)
        _barrier()
        self.last_checkpoint = final
        return final

    def _identity(self) -> dict[str, str]:
        """What makes a checkpoint this run's besides its config: training/eval data and initial weights."""
        return {
            "train_data": fingerprint_pairs(self.pairs, weights=True),
            "eval_data": fingerprint_pairs(self.eval_pairs, weights=True),
            "initial_weights": self.weights_fp,
        }

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore weights, optimizer, scheduler, RNG states and data position from ``path``.

        Raises
        ------
        CheckpointError
            If a file is missing or corrupt, or the checkpoint belongs to another run (other
            configuration, data, initial weights, trainable parameters or process count).
        """
        from safetensors.torch import load_file

        path = Path(path)
        state = read_checkpoint_state(path)
        identity = state.get("identity")
        if identity is not None:
            what = {"train_data": "training data", "eval_data": "eval data", "initial_weights": "initial model weights"}
            differ = [what[k] for k, v in self._identity().items() if identity.get(k) != v]
            if differ:
                raise CheckpointError(
                    f"{path}: written by a run with other {', '.join(differ)}; refusing to resume "
                    "(use another --output, or --overwrite to start over)"
                )
        if state["world_size"] != self.world:
            raise CheckpointError(
                f"{path}: saved with {state['world_size']} processes, resuming with {self.world}; "
                "exact resume needs the same number"
            )
        saved = state["config"]
        defaults = TrainConfig(model_spec=self.cfg.model_spec, lora=self.cfg.lora, max_length=self.cfg.max_length).to_json()
        # a field the checkpoint predates counts as its default (older checkpoints stay resumable)
        changed = sorted(
            k for k, v in self.cfg.to_json().items()
            if k not in RESUME_MAY_CHANGE and saved.get(k, defaults.get(k)) != v
        )
        if changed:
            raise CheckpointError(
                f"{path}: cannot resume with a different configuration; changed: "
                + ", ".join(f"{k} ({saved.get(k)!r} -> {getattr(self.cfg, k)!r})" for k in changed)
            )
        if state["param_names"] != self.param_names:
            raise CheckpointError(f"{path}: trainable parameters differ from this model's (another model or LoRA setting?)")
        if self.group_state is not None:
            if not isinstance(state.get("group_weights"), dict):
                raise CheckpointError(f"{path / 'trainer_state.json'}: no groupdpo group weights (group_weights 'eg'); "
                                      f"{RESUME_ELSEWHERE}")
            try:
                self.group_state.load_state_dict(state["group_weights"])
            except ValueError as exc:
                raise CheckpointError(f"{path / 'trainer_state.json'}: {exc}; {RESUME_ELSEWHERE}") from None
            self._group_snapshot = self.group_state.state_dict()

        def tensors_of(name: str, keys: Sequence[str] = ()) -> dict[str, torch.Tensor]:
            try:
                t = load_file(str(path / name))
            except Exception as exc:  # missing file, or safetensors' own errors on damaged files
                raise CheckpointError(f"{path / name}: missing or corrupt checkpoint file ({type(exc).__name__})") from None
            missing = [k for k in keys if k not in t]
            if missing:
                raise CheckpointError(f"{path / name}: corrupt checkpoint file (missing {missing[:3]})")
            return t

        weights = tensors_of("trainable.safetensors", self.param_names)
        for n, p in zip(self.param_names, self.params):
            if tuple(weights[n].shape) != tuple(p.shape):
                raise CheckpointError(f"{path / 'trainable.safetensors'}: {n} has shape {tuple(weights[n].shape)}, "
                                      f"expected {tuple(p.shape)}")
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params):
                p.copy_(_like(weights[n], p))
        tensors = tensors_of("optimizer.safetensors")
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in list(tensors.items()) + list(state["optimizer_scalars"].items()):
            pid, name = k.split(".", 1)
            if torch.is_tensor(v) and int(pid) < len(self.params) and tuple(v.shape) == tuple(self.params[int(pid)].shape) \
                    and v.ndim > 0:
                v = _like(v, self.params[int(pid)])  # AdamW moments: sharded like their parameter
            opt_state.setdefault(int(pid), {})[name] = v
        try:
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: corrupt optimizer state ({str(exc).splitlines()[0]})") from None
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
        # Same formula as LambdaLR (identical floats when max_steps is unchanged; follows a new max_steps).
        for group, base, lam in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * lam(self.scheduler.last_epoch)
        rng = tensors_of(f"rng_rank{self.rank}.safetensors", ["torch"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        py = state["python_rng"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npr = state["numpy_rng"]
        np.random.set_state((npr[0], np.asarray(npr[1], dtype=np.uint32), npr[2], npr[3], npr[4]))
        self.step = int(state["step"])
        self.consumed = int(state["consumed"])
        self.last_checkpoint = path
        self._rng_snapshot = self._rng_state()

    # --------------------------------------------------------------- logging
    def _read_metrics(self) -> tuple[list[str], list[dict[str, str]]]:
        path = self.out / "metrics.csv"
        if not path.is_file() or path.stat().st_size == 0:
            return [], []
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            return list(reader.fieldnames or []), list(reader)

    def _read_metrics_header(self) -> list[str]:
        path = self.out / "metrics.csv"
        if not path.is_file() or path.stat().st_size == 0:
            return []
        with path.open(newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), [])

    def _rewrite_metrics(self, header: list[str], rows: list[dict[str, Any]]) -> None:
        path = self.out / "metrics.csv"
        tmp = path.with_name(".tmp-metrics.csv")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore", restval="")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)

    @staticmethod
    def _header_for(keys: Sequence[str]) -> list[str]:
        base = [k for k in BASE_COLUMNS]
        return base + sorted(k for k in keys if k not in BASE_COLUMNS)

    def _write_row(self, row: dict[str, Any]) -> None:
        """Append one row to metrics.csv (rank 0); a row with new columns rewrites the file atomically.

        The header is read once and then kept in memory, so a step appends one line and reads nothing.
        """
        if self.rank != 0:
            return
        path = self.out / "metrics.csv"
        if self._metrics_header is None:
            self._metrics_header = self._read_metrics_header()
        header = self._metrics_header
        if not header or any(k not in header for k in row):
            _, rows = self._read_metrics()
            header = self._header_for(set(header) | set(row))
            self._rewrite_metrics(header, rows + [row])
            self._metrics_header = header
        else:
            with path.open("a", newline="", encoding="utf-8") as fh:
                csv.DictWriter(fh, fieldnames=header, extrasaction="ignore", restval="").writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def _truncate_metrics(self) -> None:
        """Drop metrics rows after the resumed step (they will be recomputed); note an eval at that step."""
        if self.rank == 0:
            header, rows = self._read_metrics()
            if header:
                keep = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= self.step]
                if len(keep) != len(rows):
                    self._rewrite_metrics(header, keep)
                if any(int(r["step"]) == self.step and r.get("eval/loss") for r in keep):
                    self._eval_step = self.step
        if self.world > 1:
            flag = torch.tensor(1.0 if self._eval_step == self.step else 0.0, device=self.device)
            dist.broadcast(flag, 0)
            self._eval_step = self.step if flag.item() > 0 else None

    # ------------------------------------------------------------------ loop
    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(value).all() else 1.0, device=self.device)
        if self.world > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            where = self.last_checkpoint or "none written yet"
            raise NonFiniteError(
                f"non-finite {what} at step {self.step + 1}; training stopped without updating the "
                f"weights. Last good checkpoint: {where}"
            )

    def train_step(self) -> dict[str, Any]:
        """Run one optimizer step and return its metrics row (does not log or checkpoint)."""
        from drdpo_theory.llm.objectives import preference_backward

        t0 = time.perf_counter()
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = self._batch_at(self.consumed + micro)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            ref_c, ref_r = self._reference_logps(batch)
            inputs = {k: v for k, v in batch.items() if k not in ("index", "weight")}
            inputs["weight"] = batch["weight"] * self.weight_scale  # (B,) p_i * N: mean 1 over the data
            last = micro == cfg.grad_accum - 1
            # DDP syncs on the last micro-batch only; FSDP2 reduce-scatters every backward (WDPO's
            # two-pass estimator rescales pass 1 in the reduced shard)
            sync = self.model.no_sync() if (self.world > 1 and not self.sharded and not last) else contextlib.nullcontext()
            with sync:
                # forward(s) under autocast; preference_backward runs its backward(s) outside it
                with self._autocast():
                    loss, metrics = preference_backward(
                        self.model, inputs, ref_c, ref_r, self.loss_cfg, loss_scale=1.0 / cfg.grad_accum,
                        group_state=self.group_state,
                    )
            self._check_finite(loss, "loss")  # after the backward: no step is taken on a bad loss
            loss_sum += float(loss.detach())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self._check_finite(grad_norm.detach(), "gradient norm")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.consumed += cfg.grad_accum
        self.step += 1
        self._rng_snapshot = self._rng_state()
        if self.group_state is not None:
            self._group_snapshot = self.group_state.state_dict()
        names = sorted(sums)
        vals = torch.tensor([loss_sum] + [sums[k] for k in names], dtype=torch.float64, device=self.device)
        vals = all_reduce_sum_detached(vals) / (self.world * cfg.grad_accum)  # mean over ranks and micro-batches
        row: dict[str, Any] = {
            "step": self.step,
            "epoch": round(self.consumed / self.batches_per_epoch, 4),
            "loss": float(vals[0]),
            "learning_rate": lr,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "seconds": round(time.perf_counter() - t0, 6),
        }
        row.update({k: float(v) for k, v in zip(names, vals[1:].tolist())})
        return row

    def _install_sigterm(self) -> Callable[[], None]:
        """SIGTERM (a scheduler's kill) asks the loop to checkpoint and stop after the current step."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, frame: Any) -> None:
            self._stop_signal = "SIGTERM"

        old = signal.signal(signal.SIGTERM, handler)
        return lambda: signal.signal(signal.SIGTERM, old)

    def _stop_requested(self) -> bool:
        flag = 1.0 if self._stop_signal else 0.0
        if self.world > 1:  # every rank stops at the same step, even if only one got the signal
            t = torch.tensor(flag, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = float(t.item())
            if flag > 0 and not self._stop_signal:
                self._stop_signal = "SIGTERM"
        return flag > 0

    def export(self) -> list[Path]:
        """Write ``output_dir/final`` (model or adapter folder; ``final-merged`` with ``merge_lora``), rank 0."""
        from drdpo_theory.llm.export import export_policy

        paths: list[Path] = []
        if self.sharded:  # the final checkpoint holds the gathered weights: rebuild unsharded on rank 0
            from drdpo_theory.llm.export import export_checkpoint

            if self.last_checkpoint is None or self.last_checkpoint.name != f"step-{self.step:08d}":
                self.save_checkpoint()
            if self.rank == 0:
                paths = export_checkpoint(self.last_checkpoint, self.out / FINAL_DIR, merge=self.cfg.merge_lora)
            _barrier()
            return paths
        if self.rank == 0:
            spec = self.cfg.model_spec
            if spec and Path(spec).expanduser().exists():
                spec = str(Path(spec).expanduser().resolve())
            info = {"base_model": spec, "method": self.cfg.method, "step": self.step}
            was_training = self.base.training
            self.base.eval()
            try:
                paths = export_policy(self.base, self.tokenizer, self.out / FINAL_DIR, info=info, merge=self.cfg.merge_lora)
            finally:
                self.base.train(was_training)
        _barrier()
        return paths

    def fit(
        self, resume_from: str | os.PathLike | None = None, on_step: Callable[[dict[str, Any]], None] | None = None
    ) -> TrainResult:
        """Train until ``cfg.max_steps``, evaluate, export; see :func:`train`."""
        cfg = self.cfg
        if cfg.reference == "precompute":  # before resuming: pi_ref is the initial policy
            self.precompute_reference()
        elif self.eval_pairs:
            self._eval_reference()
        if resume_from is not None:
            ckpt = latest_checkpoint(cfg.output_dir) if str(resume_from) == "auto" else Path(resume_from)
            if ckpt is not None:
                self.load_checkpoint(ckpt)
                self._truncate_metrics()
        if cfg.tensorboard and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        start = self.step
        losses: list[float] = []
        rows: list[dict[str, Any]] = []
        eval_rows: list[dict[str, Any]] = []
        exported: list[Path] = []
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"align[{cfg.method}]", dynamic_ncols=True)
        interrupted, sig = False, None
        restore_sigterm = self._install_sigterm()

        def evaluate_now() -> None:
            row = self._eval_row()
            self._write_row(row)
            eval_rows.append(row)
            if bar is not None:
                bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}" if rows else "", eval_loss=f"{row['eval/loss']:.4f}")

        try:
            while self.step < cfg.max_steps:
                row = self.train_step()
                losses.append(row["loss"])
                rows.append(row)
                self._write_row(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.eval_pairs and cfg.eval_every and self.step % cfg.eval_every == 0:
                    evaluate_now()
                if on_step is not None:
                    on_step(row)
                if self._stop_requested():
                    interrupted, sig = True, self._stop_signal
                    break
            if (self.step > start or not interrupted) and (
                self.last_checkpoint is None or self.last_checkpoint.name != f"step-{self.step:08d}"
            ):
                self.save_checkpoint()
            if not interrupted:
                if self.eval_pairs and self._eval_step != self.step:
                    evaluate_now()
                if cfg.export:
                    exported = self.export()
        except KeyboardInterrupt:
            interrupted, sig = True, "SIGINT"
            self.optimizer.zero_grad(set_to_none=True)
            if self.step > start and (self.last_checkpoint is None or self.last_checkpoint.name != f"step-{self.step:08d}"):
                self.save_checkpoint()
        finally:
            restore_sigterm()
            if bar is not None:
                bar.close()
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        return TrainResult(losses, rows, start, self.step, self.last_checkpoint, interrupted, sig, exported, eval_rows)


def train(
    cfg: TrainConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[TokenizedPair],
    resume_from: str | os.PathLike | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    device: torch.device | None = None,
    eval_pairs: Sequence[TokenizedPair] | None = None,
) -> TrainResult:
    """Train ``model`` on tokenised preference pairs with the objective of ``cfg``.

    Parameters
    ----------
    cfg : TrainConfig
    model : transformers.PreTrainedModel
        Initial policy; with ``reference`` it also defines ``pi_ref``.
    tokenizer : transformers.PreTrainedTokenizerBase
    pairs : sequence of TokenizedPair
    resume_from : path or "auto", optional
        Checkpoint directory to resume from; ``"auto"``: the newest one under
        ``cfg.output_dir/checkpoints`` if any.
    on_step : callable, optional
        Called with each metrics row after logging and checkpointing (tests use it to
        interrupt a run).
    device : torch.device, optional
    eval_pairs : sequence of TokenizedPair, optional
        Held-out pairs: evaluated every ``cfg.eval_every`` steps and at the end
        (:meth:`Trainer.evaluate`), rows with ``eval/...`` columns in metrics.csv.

    Returns
    -------
    TrainResult

    Raises
    ------
    NonFiniteError
        On a NaN/inf loss or gradient norm; no update and no checkpoint is written for that
        step, so ``latest_checkpoint(cfg.output_dir)`` is the last good state.

    Notes
    -----
    A KeyboardInterrupt (SIGINT) saves a checkpoint of the last completed step and returns
    with ``interrupted=True``; SIGTERM does the same after the step in progress. A finished
    run writes ``output_dir/final`` (:mod:`drdpo_theory.llm.export`) unless ``cfg.export`` is
    False. Under ``torchrun``/``accelerate launch`` (``WORLD_SIZE > 1``) call
    :func:`init_distributed` first; the model is wrapped in DistributedDataParallel, each
    rank reads its :class:`~torch.utils.data.DistributedSampler` shard, rank 0 writes files.
    """
    trainer = Trainer(cfg, model, tokenizer, pairs, device=device, eval_pairs=eval_pairs)
    return trainer.fit(resume_from=resume_from, on_step=on_step)


def init_distributed() -> bool:
    """Initialise the default process group from torchrun/accelerate environment variables.

    Returns
    -------
    bool
        True when ``WORLD_SIZE > 1`` (a group is now up), False for a single process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return True

