"""Worker of tests/llm/test_trl_distributed.py: a TRL user's script, one run per method.

Run as ``torchrun --nproc_per_node N tests/llm/trl_dist_worker.py OUT.json [--zero STAGE] [--gas K]``:
for DPO, KLDPO and WDPO finite-diff, trains the tiny model for ``STEPS`` SGD steps on the
``GLOBAL_PAIRS`` toy pairs (one global batch per step: ``GLOBAL_PAIRS / (N K)`` pairs per
process and micro-batch, K accumulation steps), with DeepSpeed ZeRO-``STAGE`` when given, evaluates the trained policy on the
same pairs, and rank 0 writes the log history and the evaluation metrics of each run to
OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

GLOBAL_PAIRS = 8
STEPS = 3


def main(out: str, zero: int | None, gas: int = 1) -> None:
    import datasets
    import torch
    import trl

    from drdpo_theory.llm.data import load_preferences
    from drdpo_theory.llm.models import load_model
    from drdpo_theory.llm.trl_adapter import KLDPOTrainer, WDPOTrainer, _RobustDPOTrainer

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = None
    if zero is not None:
        ds_config = {
            "zero_optimization": {"stage": zero},
            "zero_allow_untested_optimizer": True,  # torch SGD (exact, unlike Adam's normalised first step)
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
        }
    methods = {
        "dpo": (_RobustDPOTrainer, {}),
        "kldpo": (KLDPOTrainer, {"tau": 0.5}),
        "wdpo-finite-diff": (WDPOTrainer, {"wdpo_impl": "finite-diff", "rho0": 0.05}),
    }
    # a file-backed dataset: TRL caches the precomputed reference log-probs next to it, where every rank reads them
    work = os.path.dirname(os.path.abspath(out))
    data_file = os.path.join(work, "pairs.jsonl")
    if int(os.environ.get("RANK", "0")) == 0:
        with open(data_file, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in load_preferences("toy")[:GLOBAL_PAIRS])
    if torch.distributed.is_available() and world > 1:
        torch.distributed.init_process_group("gloo")
        torch.distributed.barrier()
    results = {}
    for name, (cls, kw) in methods.items():
        model, tok = load_model("tiny-random")
        args = trl.DPOConfig(
            output_dir=os.path.join(os.path.dirname(out), f"run-{name}"), max_steps=STEPS,
            per_device_train_batch_size=GLOBAL_PAIRS // (world * gas), gradient_accumulation_steps=gas,
            learning_rate=0.1, optim="sgd",
            lr_scheduler_type="constant", max_grad_norm=1e6, beta=0.5, max_length=128,
            precompute_ref_log_probs=False, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
            disable_tqdm=True, seed=0, deepspeed=ds_config, disable_dropout=True, bf16=False, fp16=False,
            per_device_eval_batch_size=GLOBAL_PAIRS // world,
        )
        data = datasets.load_dataset("json", data_files=data_file, split="train",
                                     cache_dir=os.path.join(work, f"cache-{name}"))
        ref_model, _ = load_model("tiny-random")  # the same initial weights: a frozen reference
        trainer = cls(model=model, ref_model=ref_model, args=args, train_dataset=data, eval_dataset=data,
                      processing_class=tok, **kw)
        trainer.train()
        results[name] = [h for h in trainer.state.log_history if "loss" in h]
        results[name + "/eval"] = trainer.evaluate()  # after training: the trained policy's objective
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    zero = int(sys.argv[sys.argv.index("--zero") + 1]) if "--zero" in sys.argv else None
    gas = int(sys.argv[sys.argv.index("--gas") + 1]) if "--gas" in sys.argv else 1
    main(sys.argv[1], zero, gas)
