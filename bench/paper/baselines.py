"""The torch baselines' definition, one copy for bench/paper/compare.py's workers and bench/micro/device_memory.py.

    model, params = adapt(model, "lora")   # full | lora | lora64 | bitfit | split | split-bitfit | lst

Any `AutoModelForSequenceClassification` whose attention has q_proj/v_proj (OPT, Gemma 3, Llama).
"""

from __future__ import annotations

LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS"}
LORA_RANKS = {"lora": 16, "lora64": 64}  # alpha = 2 r for both
LST_REDUCTION = 8  # LST's r: the side network is d / 8 wide (the LST paper's main setting)


def train_only_bitfit(model) -> None:
    """BitFit: only biases (or, in a model without biases such as Gemma 3, the norm scales: the only
    other per-channel parameters) and the classifier head (`score`) keep requires_grad."""
    names = [n for n, _ in model.named_parameters()]
    per_channel = ".bias" if any(n.endswith(".bias") and not n.startswith("score") for n in names) else "norm.weight"
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith(per_channel) or name.startswith("score")


def adapt(model, method: str):
    """Make an OPTForSequenceClassification `method`'s baseline; returns (model, trainable parameters).

    lora / lora64: PEFT r 16 / r 64 on q_proj/v_proj (the rest frozen); bitfit and split-bitfit
    (split learning as the MobiLLM paper pairs it): `train_only_bitfit`; full and split: every
    parameter; lst: the frozen base model inside a LadderSideTuning (bench/paper/lst.py), which trains
    only its side network, ladder and head."""
    if method in LORA_RANKS:
        from peft import LoraConfig, get_peft_model

        r = LORA_RANKS[method]
        model = get_peft_model(model, LoraConfig(**{**LORA, "r": r, "lora_alpha": 2 * r}))
    elif method in ("bitfit", "split-bitfit"):
        train_only_bitfit(model)
    elif method == "lst":
        from mobillm.bench.paper.lst import LadderSideTuning

        model = LadderSideTuning(model.base_model, model.config.num_labels, LST_REDUCTION)
    elif method not in ("full", "split"):
        raise ValueError(f"unknown baseline {method!r}")
    return model, [p for p in model.parameters() if p.requires_grad]
