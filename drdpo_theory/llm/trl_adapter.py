r"""TRL integration: ``trl.DPOTrainer`` subclasses whose loss is KLDPO or WDPO.

A TRL script switches method by changing one import::

    from trl import DPOTrainer                                          # DPO
    from drdpo_theory.llm.trl_adapter import KLDPOTrainer as DPOTrainer  # KLDPO
    from drdpo_theory.llm.trl_adapter import WDPOTrainer as DPOTrainer   # WDPO

Everything else (``DPOConfig``, datasets, PEFT, accelerate/DeepSpeed launch, logging,
checkpointing) stays TRL's. What is overridden:

* ``compute_loss``: TRL's batch (``input_ids``, ``attention_mask``, ``completion_mask``,
  chosen rows then rejected rows; ``completion_mask`` is the ``loss_mask``) and its
  reference log-probs (precomputed with ``precompute_ref_log_probs=True``, or TRL's
  ``compute_ref_log_probs``: reference model or PEFT adapters disabled) go to
  :func:`~drdpo_theory.llm.objectives.preference_loss`, whose policy log-probs come from
  TRL's fused LM head (``model(..., labels=..., fused_lm_head=True)``: per-token
  log-probs in tiles, the (2B, T, V) logits are never built, also for WDPO's second
  forward);
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
losses); for WDPO the penalised objective :math:`\frac1B\sum_i[\ell_i +
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
``use_liger_kernel=True`` are rejected.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl import DPOTrainer
from trl.trainer.utils import add_fused_lm_head

from drdpo_theory.llm.objectives import LossConfig, preference_backward, preference_eval, preference_loss

__all__ = ["KLDPOTrainer", "TESTED_TRL_VERSION", "WDPOTrainer"]

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
    """Shared ``compute_loss`` / ``training_step`` / ``prediction_step`` of :class:`KLDPOTrainer` and :class:`WDPOTrainer`."""

    _method = "dpo"
    _options: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in self._options if k in kwargs}
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # fail before TRL loads a reference model or tokenises
            self._check_args(config)
        loss_config = LossConfig(method=self._method, beta=config.beta if config is not None else 0.1, **options)
        super().__init__(*args, **kwargs)
        self._check_args(self.args)
        self.loss_config = LossConfig(**{**loss_config.__dict__, "beta": self.args.beta})
        # TRL's head also computes entropy, mean logits and top-1 hits for its own metrics; our loss reads only the
        # log-probs, so the head is patched again (outermost wrapper wins) with that one output: less work per call
        target = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_fused_lm_head(target, outputs=("log_probs",))

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
        if getattr(a, "use_liger_kernel", False):
            problems.append(
                "use_liger_kernel=True (need False: the loss already uses TRL's fused LM head, which never builds "
                "the full logits; Liger's layer kernels are not tested with WDPO's embedding hook)"
            )
        if problems:
            raise ValueError(f"{type(self).__name__} replaces TRL's loss; unsupported DPOConfig: {'; '.join(problems)}")

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
        loss, metrics = preference_loss(model, batch, ref_c, ref_r, self.loss_config, logps_fn=fused_lm_head_logps)
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
                    logps_fn=fused_lm_head_logps, backward=backward,
                )
            self._log_metrics(metrics, "train")
            return loss.detach() / self.current_gradient_accumulation_steps

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None):
        """Evaluation loss of the method (module docstring); no logits are returned."""
        inputs = self._prepare_inputs(inputs)
        batch, ref_c, ref_r = self._batch_and_refs(inputs)
        with self.compute_loss_context_manager():
            loss, metrics = preference_eval(model, batch, ref_c, ref_r, self.loss_config, logps_fn=fused_lm_head_logps)
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
    fused attention), ``fd_step``; see :class:`~drdpo_theory.llm.objectives.LossConfig`.
    """

    _method = "wdpo"
    _options = ("rho0", "wdpo_impl", "fd_step")
