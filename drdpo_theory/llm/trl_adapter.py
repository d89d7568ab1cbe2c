r"""TRL integration: ``trl.DPOTrainer`` subclasses whose loss is KLDPO, WDPO or a robust-family member.

A TRL script switches method by changing one import::

    from trl import DPOTrainer                                          # DPO
    from drdpo_theory.llm.trl_adapter import KLDPOTrainer as DPOTrainer  # KLDPO
    from drdpo_theory.llm.trl_adapter import WDPOTrainer as DPOTrainer   # WDPO

and, for the robust family (docs/theory_family.md), with the member's hyper-parameter as a
constructor keyword (the ``drdpo align`` flag of the same name)::

    RDPOTrainer(..., eps=0.1)         # rdpo: known label-flip rate
    CDPOTrainer(..., eps=0.1)         # cdpo: label smoothing
    Chi2DPOTrainer(..., rho=0.5)      # chi2dpo: chi2 ball of radius rho
    CVaRDPOTrainer(..., alpha=0.5)    # cvardpo: CVaR at level alpha
    GroupDPOTrainer(...)              # groupdpo: needs an integer 'group' column in the datasets;
                                      #   group_weights="eg" (default; group_step, group_init) or "worst"
    DrDPOTrainer(..., beta_prime=1.0) # dr_dpo: Dr.DPO soft minimum

``GroupDPOTrainer`` keeps the dataset's ``group`` column through TRL's column pruning and
collator (the batch gains a ``group`` tensor) and refuses datasets without one. With
``group_weights="eg"`` its online group weights (:class:`~drdpo_theory.llm.family.GroupEGState`,
``trainer.group_state``) start from the groups of ``train_dataset``, are updated once per
training micro-batch, are written to ``group_weights.json`` in every TRL checkpoint and are
restored by ``trainer.train(resume_from_checkpoint=...)``; evaluation uses them without updating.

Everything else (``DPOConfig``, datasets, PEFT, accelerate/DeepSpeed launch, logging,
checkpointing) stays TRL's. What is overridden:

* ``compute_loss``: TRL's batch (``input_ids``, ``attention_mask``, ``completion_mask``,
  chosen rows then rejected rows; ``completion_mask`` is the ``loss_mask``) and its
  reference log-probs (precomputed with ``precompute_ref_log_probs=True``, or TRL's
  ``compute_ref_log_probs``: reference model or PEFT adapters disabled) go to
  :func:`~drdpo_theory.llm.objectives.preference_loss`, whose policy log-probs come from
  TRL's fused LM head (``model(..., labels=..., fused_lm_head=True)``: per-token
  log-probs in tiles, the (2B, T, V) logits are never built, also for WDPO's second
  forward), or with ``lm_head="full"`` (every trainer's keyword) from the model's own forward
  as in ``drdpo align`` (the head on the completion positions only); the default ``"auto"`` takes
  ``"full"`` on CPU and for a PEFT model (:data:`LM_HEADS`);
* ``training_step`` (WDPO ``finite-diff`` with ``rho0 > 0`` only): the two-pass estimator
  of :func:`~drdpo_theory.llm.objectives.preference_backward` (forward-backward at e, then
  at e + h g; one graph alive at a time), with both backward passes through
  ``accelerator.backward`` (DeepSpeed: ``engine.backward``, the optimizer step after the
  second only), the gradient-accumulation division and the return value of TRL's
  ``training_step``; every other method is TRL's ``training_step`` unchanged;
* ``prediction_step`` (evaluation): the loss value of the method (see below), under
  ``torch.no_grad`` except, for WDPO, the embedding gradient;
* metrics: every value of ``preference_loss``'s metrics is averaged over ranks (one
  all-reduce; ``wdpo/grad_emb_norm``, a root mean square, as its square) before it enters
  TRL's logs, so with equal per-rank batches the means are those of the global batch;
  ``kldpo/ess`` and ``kldpo/weight_{min,max}`` stay per-rank statistics (averaged).
  ``loss`` is left to the Trainer, which averages it over ranks itself.

``eval_loss`` is the objective of the method on the evaluation batch: the DPO loss for
DPO; :math:`\frac1B\sum_i w_i\ell_i` for KLDPO (weights from the gathered evaluation
losses); for a family member its batch objective (groupdpo eg: with the current q); for WDPO the penalised objective :math:`\frac1B\sum_i[\ell_i +
\rho_0\|\nabla_e\ell_i\|^2]`, with its parts logged as ``eval_dpo_loss`` and
``eval_wdpo/penalty``.

``beta`` is read from ``DPOConfig.beta``; the robust hyper-parameters are keyword
arguments of the constructor (defaults of
:class:`~drdpo_theory.llm.objectives.LossConfig`).

Tested against TRL :data:`TESTED_TRL_VERSION`; other versions may rename the private
pieces used here (``_metrics``, ``precompute_ref_logps``, ``compute_ref_log_probs``,
``maybe_activation_offload_context``, the fused LM head's ``fused_lm_head`` keyword).
DPOConfig options that change TRL's own loss (``loss_type`` other than ``sigmoid``,
``ld_alpha``, ``f_divergence_type``, ``use_weighting``, ``padding_free``) and
``label_smoothing`` other than 0 (TRL's smoothing of its own loss; use ``CDPOTrainer(eps=...)``)
and ``use_liger_kernel=True`` are rejected.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl import DPOTrainer
from trl.trainer.utils import add_fused_lm_head

from drdpo_theory.llm.family import GroupEGState
from drdpo_theory.llm.logprobs import concatenated_logps
from drdpo_theory.llm.objectives import LossConfig, preference_backward, preference_eval, preference_loss
from drdpo_theory.llm.trainer import sparse_tied_embedding_grad

__all__ = [
    "CDPOTrainer",
    "CVaRDPOTrainer",
    "Chi2DPOTrainer",
    "DrDPOTrainer",
    "GroupDPOTrainer",
    "KLDPOTrainer",
    "RDPOTrainer",
    "TESTED_TRL_VERSION",
    "WDPOTrainer",
]

LM_HEADS = ("auto", "fused", "full")
"""Log-prob paths of every adapter trainer (keyword ``lm_head``): ``"fused"``, TRL's fused LM head,
per-token log-probs in tiles without the (2B, T, V) logits, the tiles' logits recomputed in the
backward (on CPU it scores every position; on Triton devices only the completion's); ``"full"``, the
model's own forward and :func:`~drdpo_theory.llm.logprobs.concatenated_logps`, as ``drdpo align``: the
head runs on the K completion positions only, (K, V) logits held for the backward, nothing recomputed;
``"auto"`` (default): ``"full"`` on CPU and for a PEFT (LoRA) model, where it was measured faster at
the same peak memory (SmolLM2-135M, 4 pairs per step: benchmarks/vs_trl.py, paper_repro.md section 12),
``"fused"`` for full fine-tuning on an accelerator, where long completions would make the held (K, V)
logits the larger cost (not measured here). ``trainer.lm_head`` is the resolved value."""

def auto_lm_head(peft: bool, device_type: str) -> str:
    """What ``lm_head="auto"`` resolves to (:data:`LM_HEADS`): ``"full"`` for a PEFT model or on CPU, else ``"fused"``."""
    return "full" if peft or device_type == "cpu" else "fused"


GROUP_STATE_FILE = "group_weights.json"
"""File of a TRL checkpoint folder holding ``GroupDPOTrainer``'s EG group weights (``GroupEGState.state_dict()``)."""

TESTED_TRL_VERSION = "1.16.0"
"""The TRL version whose ``DPOTrainer`` internals these subclasses were checked against."""


def fused_lm_head_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected sequence log-probs (B,), (B,) through TRL's fused LM head.

    The same call as TRL's ``DPOTrainer`` (``labels`` = ``input_ids`` with -100 off the
    completion, right padding, default positions): per-token log-probs computed in tiles,
    without the (2B, T, V) logits.
    """
    labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                fused_lm_head=True, use_cache=False)
    n = batch["input_ids"].shape[1] - 1
    logps = out.log_probs[:, -n:].sum(dim=1)  # (2B,): prompt-learning PEFT prepends virtual tokens
    return logps.chunk(2, dim=0)


_RMS_METRICS = frozenset({"wdpo/grad_emb_norm"})


class _RobustDPOTrainer(DPOTrainer):
    """Shared ``compute_loss`` / ``training_step`` / ``prediction_step`` of the adapter's trainers."""

    _method = "dpo"
    _options: tuple[str, ...] = ()
    group_state: GroupEGState | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        lm_head = kwargs.pop("lm_head", "auto")
        if lm_head not in LM_HEADS:
            raise ValueError(f"{type(self).__name__}: lm_head must be one of {LM_HEADS}, got {lm_head!r}")
        self.lm_head = lm_head
        options = {k: kwargs.pop(k) for k in self._options if k in kwargs}
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # fail before TRL loads a reference model or tokenises
            self._check_args(config)
        loss_config = LossConfig(method=self._method, beta=config.beta if config is not None else 0.1, **options)
        self._check_datasets(kwargs.get("train_dataset", args[4] if len(args) > 4 else None),
                             kwargs.get("eval_dataset", args[5] if len(args) > 5 else None))
        super().__init__(*args, **kwargs)
        self._check_args(self.args)
        self.loss_config = LossConfig(**{**loss_config.__dict__, "beta": self.args.beta})
        # TRL's head also computes entropy, mean logits and top-1 hits for its own metrics; our loss reads only the
        # log-probs, so the head is patched again (outermost wrapper wins) with that one output: less work per call
        target = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_fused_lm_head(target, outputs=("log_probs",))
        if self.lm_head == "auto":  # the model is PEFT-wrapped by now when a peft_config was given
            self.lm_head = auto_lm_head(is_peft_model(self.model), self.args.device.type)
        self._logps_fn = fused_lm_head_logps if self.lm_head == "fused" else concatenated_logps
        # one process without a sharding engine: a tied, trained embedding table takes its lookup gradient sparse,
        # as in drdpo align (drdpo_theory.llm.trainer.sparse_tied_embedding_grad: same gradient, less peak memory)
        self.sparse_embedding_grad = (self.args.world_size == 1 and not self.is_deepspeed_enabled
                                      and not self.is_fsdp_enabled and sparse_tied_embedding_grad(self.model))

    def _check_args(self, a: Any) -> None:
        problems = []
        if list(a.loss_type) != ["sigmoid"]:
            problems.append(f"loss_type={a.loss_type!r} (need ['sigmoid'])")
        if a.ld_alpha is not None:
            problems.append(f"ld_alpha={a.ld_alpha!r} (need None)")
        if a.f_divergence_type != "reverse_kl":
            problems.append(f"f_divergence_type={a.f_divergence_type!r} (need 'reverse_kl')")
        if a.use_weighting:
            problems.append("use_weighting=True (need False)")
        if getattr(a, "padding_free", False):
            problems.append("padding_free=True (need False)")
        if getattr(a, "label_smoothing", 0.0):
            problems.append(f"label_smoothing={a.label_smoothing!r} (need 0: TRL's smoothing of its own loss; "
                            "label smoothing is CDPOTrainer(eps=...))")
        if getattr(a, "use_liger_kernel", False):
            problems.append(
                "use_liger_kernel=True (need False: the loss computes its own log-probs, through TRL's fused LM head "
                "or the head on the completion positions, neither of which builds the full logits; Liger's layer "
                "kernels are not tested with WDPO's embedding hook)"
            )
        if problems:
            raise ValueError(f"{type(self).__name__} replaces TRL's loss; unsupported DPOConfig: {'; '.join(problems)}")

    def _check_datasets(self, train_dataset: Any, eval_dataset: Any) -> None:
        """Checks of the raw datasets before TRL processes them (none here; GroupDPOTrainer: the 'group' column)."""

    # ------------------------------------------------------------------ pieces

    def _batch_and_refs(self, inputs: dict[str, Any]):
        batch = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "loss_mask": inputs["completion_mask"],  # 1 on completion tokens, aligned with input_ids
        }
        if self.precompute_ref_logps:
            ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_src = self.ref_model if self.ref_model is not None else self.model
            ref_c, ref_r = self.compute_ref_log_probs(ref_src, inputs)
        return batch, ref_c, ref_r

    def _log_metrics(self, metrics: dict[str, float], mode: str) -> None:
        """Append the rank-averaged metrics (one all-reduce; ``loss`` is the Trainer's) to TRL's logs."""
        keys = sorted(k for k in metrics if k != "loss")
        # root-mean-square metrics are averaged as squares, so that equal per-rank batches give the global value
        vals = [metrics[k] ** 2 if k in _RMS_METRICS else metrics[k] for k in keys]
        local = torch.tensor(vals, dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            local = self.accelerator.reduce(local, reduction="mean")
        for k, v in zip(keys, local.tolist()):
            self._metrics[mode][k].append(v**0.5 if k in _RMS_METRICS else v)

    def _two_pass(self) -> bool:
        c = self.loss_config
        return c.method == "wdpo" and c.wdpo_impl == "finite-diff" and c.rho0 > 0

    # ------------------------------------------------------------------ Trainer overrides

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        """Loss of ``self.loss_config.method`` on a TRL preference batch.

        Parameters
        ----------
        model : torch.nn.Module
            The (accelerate-wrapped) policy.
        inputs : dict
            TRL batch: ``input_ids``, ``attention_mask``, ``completion_mask`` of shape
            ``(2B, T)`` and, with precomputed references, ``ref_chosen_logps``,
            ``ref_rejected_logps`` of shape ``(B,)``.
        return_outputs : bool
            Not supported (TRL deprecates it); raises ``NotImplementedError``.

        Returns
        -------
        torch.Tensor
            Scalar loss; the metrics of ``preference_loss`` go to TRL's logs, averaged over ranks.
        """
        if return_outputs:
            raise NotImplementedError(f"{type(self).__name__} does not return model outputs")
        batch, ref_c, ref_r = self._batch_and_refs(inputs)
        loss, metrics = preference_loss(model, batch, ref_c, ref_r, self.loss_config, logps_fn=self._logps_fn,
                                        group_state=self.group_state)
        self._log_metrics(metrics, "train" if self.model.training else "eval")
        return loss

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """TRL's ``training_step``; for WDPO finite-diff the two-pass estimator with the same bookkeeping.

        Both passes go through ``accelerator.backward`` (scaled by 1 / gradient-accumulation
        steps like TRL's single backward); under DeepSpeed the first pass calls
        ``engine.backward`` without a gradient-accumulation boundary, so the engine steps
        once, after the second. Returns the detached loss divided by the accumulation
        steps, as TRL does.
        """
        if not self._two_pass():
            return super().training_step(model, inputs, num_items_in_batch)
        from accelerate.utils import DistributedType

        with self.maybe_activation_offload_context:
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            batch, ref_c, ref_r = self._batch_and_refs(inputs)
            accelerator = self.accelerator
            deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

            def backward(t: torch.Tensor, final: bool) -> float | None:
                if deepspeed:
                    engine = accelerator.deepspeed_engine_wrapped.engine
                    if final:
                        accelerator.backward(t, scale_wrt_gas=False)  # boundary as accelerate says, then step
                    else:
                        engine.set_gradient_accumulation_boundary(is_boundary=False)
                        engine.backward(t, scale_wrt_gas=False)
                    opt = getattr(engine, "optimizer", None)
                    scale = getattr(opt, "loss_scale", None) if engine.fp16_enabled() else None
                    return None if scale is None else float(scale)
                accelerator.backward(t)
                scaler = getattr(accelerator, "scaler", None)
                return None if scaler is None else float(scaler.get_scale())

            with self.compute_loss_context_manager():
                loss, metrics = preference_backward(
                    model, batch, ref_c, ref_r, self.loss_config,
                    loss_scale=1.0 / self.current_gradient_accumulation_steps,
                    logps_fn=self._logps_fn, backward=backward,
                )
            self._log_metrics(metrics, "train")
            return loss.detach() / self.current_gradient_accumulation_steps

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None):
        """Evaluation loss of the method (module docstring); no logits are returned."""
        inputs = self._prepare_inputs(inputs)
        batch, ref_c, ref_r = self._batch_and_refs(inputs)
        with self.compute_loss_context_manager():
            loss, metrics = preference_eval(model, batch, ref_c, ref_r, self.loss_config, logps_fn=self._logps_fn,
                                            group_state=self.group_state)
        self._log_metrics(metrics, "eval")
        return loss.detach(), None, None


class KLDPOTrainer(_RobustDPOTrainer):
    """``trl.DPOTrainer`` with the KLDPO loss (docs/theory.md section 5).

    Extra keyword arguments (all optional): ``tau``, ``kldpo_variant``, ``rho``, ``clamp``;
    see :class:`~drdpo_theory.llm.objectives.LossConfig`. All other arguments are
    ``DPOTrainer``'s.
    """

    _method = "kldpo"
    _options = ("tau", "kldpo_variant", "rho", "clamp")


class WDPOTrainer(_RobustDPOTrainer):
    """``trl.DPOTrainer`` with the WDPO loss (docs/theory.md section 5).

    Extra keyword arguments (all optional): ``rho0``, ``wdpo_impl``
    (``"double-backward"`` switches the model to eager attention; ``"finite-diff"`` keeps
    fused attention), ``fd_step``, ``wdpo_penalty`` (``"rows"`` or ``"tuple"``),
    ``fd_pass2_chunks`` (default 1; K > 1 runs the second finite-difference pass in K pair
    chunks: less peak memory, K - 1 more passes); see :class:`~drdpo_theory.llm.objectives.LossConfig`.
    """

    _method = "wdpo"
    _options = ("rho0", "wdpo_impl", "fd_step", "wdpo_penalty", "fd_pass2_chunks")


# ---------------------------------------------------------------------- the robust family


class RDPOTrainer(_RobustDPOTrainer):
    """``trl.DPOTrainer`` with the rDPO loss (Chowdhury et al. 2024), known label-flip rate ``eps`` in [0, 0.5).

    Per pair :math:`[(1-\\epsilon)\\ell(h) - \\epsilon\\ell(-h)]/(1-2\\epsilon)`
    (:func:`~drdpo_theory.llm.family.flip_loss`). Keyword ``eps`` (required).
    """

    _method = "rdpo"
    _options = ("eps",)


class CDPOTrainer(_RobustDPOTrainer):
    """``trl.DPOTrainer`` with the cDPO loss (label smoothing): per pair :math:`(1-\\epsilon)\\ell(h) + \\epsilon\\ell(-h)`.

    Keyword ``eps`` in [0, 0.5) (required). TRL's own ``DPOConfig.label_smoothing`` must stay 0.
    """

    _method = "cdpo"
    _options = ("eps",)


class Chi2DPOTrainer(_RobustDPOTrainer):
    """``trl.DPOTrainer`` with the chi2-robust DPO loss: the worst case over the chi2 ball of radius ``rho``.

    Exact batch worst case from the 1-D dual on the all-gathered losses, detached multipliers
    (Danskin). Keyword ``rho`` >= 0 (required); metrics ``chi2dpo/eta``, ``chi2dpo/weight_max``.
    """

    _method = "chi2dpo"
    _options = ("rho",)


class CVaRDPOTrainer(_RobustDPOTrainer):
    """``trl.DPOTrainer`` with the CVaR-robust DPO loss at level ``alpha`` in (0, 1] (the worst alpha-fraction).

    Exact batch CVaR on the all-gathered losses, detached multipliers. Keyword ``alpha``
    (required); metrics ``cvardpo/eta``, ``cvardpo/weight_max``.
    """

    _method = "cvardpo"
    _options = ("alpha",)


class DrDPOTrainer(_RobustDPOTrainer):
    """``trl.DPOTrainer`` with the Dr.DPO loss (Wu et al. 2024): :math:`-\\beta'\\log E_p e^{-\\ell/\\beta'}` on the batch.

    Keyword ``beta_prime`` > 0 (default 1.0).
    """

    _method = "dr_dpo"
    _options = ("beta_prime",)


def _group_values(ds: Any, name: str) -> list[int] | None:
    """The 'group' column of a map-style dataset as ints (None for an iterable one); ValueError if absent or not integer."""
    cols = getattr(ds, "column_names", None)
    if cols is None:  # IterableDataset without known features: look at the first row
        try:
            first = next(iter(ds))
        except (StopIteration, TypeError):
            return None
        if not (isinstance(first, dict) and "group" in first):
            raise ValueError(f"GroupDPOTrainer needs an integer 'group' column in {name} (the pair's group label); "
                             f"its first row has the keys {sorted(first) if isinstance(first, dict) else type(first)}")
        return None
    if "group" not in cols:
        raise ValueError(f"GroupDPOTrainer needs an integer 'group' column in {name} (the pair's group label); "
                         f"it has the columns {list(cols)}")
    values = list(ds["group"])
    for i, g in enumerate(values):
        if isinstance(g, bool) or not isinstance(g, int):
            raise ValueError(f"GroupDPOTrainer: {name}['group'] must hold one integer per pair; row {i} has {g!r}")
    return values


class _GroupCollator:
    """Wraps TRL's preference collator: the batch gains ``group`` (B,) long from the examples' 'group' values."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        missing = [i for i, ex in enumerate(examples) if ex.get("group") is None]
        if missing:
            raise ValueError(f"GroupDPOTrainer: example {missing[0]} of the batch has no 'group' value (an integer "
                             "group label per pair is needed; give the dataset a 'group' column)")
        out = self.inner(examples)
        out["group"] = torch.tensor([int(ex["group"]) for ex in examples], dtype=torch.long)
        return out


class GroupDPOTrainer(_RobustDPOTrainer):
    """``trl.DPOTrainer`` with group-robust DPO (Ramesh et al. 2024); the datasets need an integer ``group`` column.

    Keywords: ``group_weights`` (``"eg"``, default: online exponentiated-gradient weights q over
    the groups of ``train_dataset``; ``"worst"``: the exact worst group of each batch),
    ``group_step`` (EG step, default 0.01), ``group_init`` (``"uniform"`` or
    ``"proportional"``). ``trainer.group_state`` holds q (:class:`~drdpo_theory.llm.family.GroupEGState`);
    it is saved as ``group_weights.json`` in each checkpoint folder and restored by
    ``train(resume_from_checkpoint=...)``. Metrics: ``groupdpo/q_max`` and ``groupdpo/q_<label>``
    (eg), ``groupdpo/worst_group`` (worst), ``groupdpo/weight_max``.
    """

    _method = "groupdpo"
    _options = ("group_weights", "group_step", "group_init")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_collator = _GroupCollator(self.data_collator)
        if self.loss_config.group_weights == "eg":
            groups = None if self.train_dataset is None else _group_values(self.train_dataset, "train_dataset")
            if groups is None:
                raise ValueError("GroupDPOTrainer with group_weights='eg' needs a map-style train_dataset with a 'group' "
                                 "column (the groups and their sizes are read before training)")
            self.group_state = GroupEGState.from_data(groups, step=self.loss_config.group_step,
                                                      init=self.loss_config.group_init)

    def _check_datasets(self, train_dataset: Any, eval_dataset: Any) -> None:
        if train_dataset is not None:
            _group_values(train_dataset, "train_dataset")
        sets = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval_dataset", eval_dataset)]
        for name, ds in sets:
            if ds is not None:
                _group_values(ds, name if name == "eval_dataset" else f"eval_dataset[{name!r}]")

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "group" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "group"]  # kept by remove_unused_columns

    def _batch_and_refs(self, inputs: dict[str, Any]):
        if "group" not in inputs:
            raise ValueError("GroupDPOTrainer: the batch has no 'group' tensor (a custom data_collator must pass the "
                             "examples' integer 'group' values on)")
        batch, ref_c, ref_r = super()._batch_and_refs(inputs)
        batch["group"] = inputs["group"]
        return batch, ref_c, ref_r

    def _save_rng_state(self, output_dir: str) -> None:
        """TRL's RNG state, and the EG group weights as ``group_weights.json`` (main process) in the checkpoint."""
        super()._save_rng_state(output_dir)
        if self.group_state is not None and self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, GROUP_STATE_FILE), "w", encoding="utf-8") as fh:
                json.dump(self.group_state.state_dict(), fh)

    def load_group_state(self, checkpoint: str | os.PathLike) -> None:
        """Restore the EG group weights from a checkpoint folder's ``group_weights.json``."""
        path = os.path.join(checkpoint, GROUP_STATE_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing; the checkpoint holds no groupdpo group weights (group_weights='eg')")
        with open(path, encoding="utf-8") as fh:
            try:
                state = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: corrupt group weights ({exc})") from None
        try:
            self.group_state.load_state_dict(state)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """TRL's ``train``; resuming also restores the EG group weights of the checkpoint."""
        if self.group_state is not None and resume_from_checkpoint not in (None, False):
            ckpt = resume_from_checkpoint
            if ckpt is True:
                from transformers.trainer_utils import get_last_checkpoint

                ckpt = get_last_checkpoint(self.args.output_dir)
            if ckpt is not None:  # None: TRL raises its own error
                self.load_group_state(ckpt)
        return super().train(resume_from_checkpoint, *args, **kwargs)
