"""TRL integration: ``trl.DPOTrainer`` subclasses whose loss is KLDPO or WDPO.

A TRL script switches method by changing one import::

    from trl import DPOTrainer                                          # DPO
    from drdpo_theory.llm.trl_adapter import KLDPOTrainer as DPOTrainer  # KLDPO
    from drdpo_theory.llm.trl_adapter import WDPOTrainer as DPOTrainer   # WDPO

Everything else (``DPOConfig``, datasets, PEFT, accelerate/DeepSpeed launch, logging,
checkpointing) stays TRL's. Only ``compute_loss`` is overridden: it maps TRL's batch
(``input_ids``, ``attention_mask``, ``completion_mask``, chosen rows then rejected rows) to
the batch of :func:`drdpo_theory.llm.objectives.preference_loss` (``completion_mask`` is
its ``loss_mask``), takes the reference log-probs from the batch
(``precompute_ref_log_probs=True``) or from TRL's ``compute_ref_log_probs`` (reference model
or PEFT adapters disabled), and returns ``preference_loss``'s value. ``beta`` is read from
``DPOConfig.beta``; the robust hyper-parameters are keyword arguments of the constructor
(defaults of :class:`~drdpo_theory.llm.objectives.LossConfig`).

Tested against TRL :data:`TESTED_TRL_VERSION`; other versions may rename the private
pieces used here (``_metrics``, ``precompute_ref_logps``, ``compute_ref_log_probs``).
DPOConfig options that change TRL's own loss (``loss_type`` other than ``sigmoid``,
``ld_alpha``, ``f_divergence_type``, ``use_weighting``, ``padding_free``) are rejected.
"""

from __future__ import annotations

from typing import Any

from trl import DPOTrainer

from drdpo_theory.llm.objectives import LossConfig, preference_loss

__all__ = ["KLDPOTrainer", "TESTED_TRL_VERSION", "WDPOTrainer"]

TESTED_TRL_VERSION = "1.16.0"
"""The TRL version whose ``DPOTrainer`` internals these subclasses were checked against."""


class _RobustDPOTrainer(DPOTrainer):
    """Shared ``compute_loss`` of :class:`KLDPOTrainer` and :class:`WDPOTrainer`."""

    _method = "dpo"
    _options: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in self._options if k in kwargs}
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # fail before TRL loads a reference model or tokenises
            self._check_args(config)
        loss_config = LossConfig(method=self._method, beta=config.beta if config is not None else 0.1, **options)
        super().__init__(*args, **kwargs)
        self.loss_config = LossConfig(**{**loss_config.__dict__, "beta": self.args.beta})

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
        if problems:
            raise ValueError(f"{type(self).__name__} replaces TRL's loss; unsupported DPOConfig: {'; '.join(problems)}")

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
            Scalar loss; the metrics of ``preference_loss`` go to TRL's logs.
        """
        if return_outputs:
            raise NotImplementedError(f"{type(self).__name__} does not return model outputs")
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
        loss, metrics = preference_loss(model, batch, ref_c, ref_r, self.loss_config)
        mode = "train" if self.model.training else "eval"
        for k, v in metrics.items():
            self._metrics[mode][k].append(v)
        return loss


class KLDPOTrainer(_RobustDPOTrainer):
    """``trl.DPOTrainer`` with the KLDPO loss (THEORY.md section 5).

    Extra keyword arguments (all optional): ``tau``, ``kldpo_variant``, ``rho``, ``clamp``;
    see :class:`~drdpo_theory.llm.objectives.LossConfig`. All other arguments are
    ``DPOTrainer``'s.
    """

    _method = "kldpo"
    _options = ("tau", "kldpo_variant", "rho", "clamp")


class WDPOTrainer(_RobustDPOTrainer):
    """``trl.DPOTrainer`` with the WDPO loss (THEORY.md section 5).

    Extra keyword arguments (all optional): ``rho0``, ``wdpo_impl``
    (``"double-backward"`` switches the model to eager attention; ``"finite-diff"`` keeps
    fused attention), ``fd_step``; see :class:`~drdpo_theory.llm.objectives.LossConfig`.
    """

    _method = "wdpo"
    _options = ("rho0", "wdpo_impl", "fd_step")
