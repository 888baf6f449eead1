"""The torch baselines' definition, one copy for bench/compare.py's workers and bench/device_memory.py.

    model, params = adapt(model, "lora")   # full | lora | lora64 | bitfit | split (split trains everything)

Any `AutoModelForSequenceClassification` whose attention has q_proj/v_proj (OPT, Gemma 3, Llama).
"""

from __future__ import annotations

LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS"}
LORA_RANKS = {"lora": 16, "lora64": 64}  # alpha = 2 r for both


def adapt(model, method: str):
    """Make an OPTForSequenceClassification `method`'s baseline; returns (model, trainable parameters).

    lora / lora64: PEFT r 16 / r 64 on q_proj/v_proj (the rest frozen); bitfit: biases + the
    classifier head (a model without biases, such as Gemma 3, trains its norm scales instead: the
    only other per-channel parameters); full and split: every parameter."""
    if method in LORA_RANKS:
        from peft import LoraConfig, get_peft_model

        r = LORA_RANKS[method]
        model = get_peft_model(model, LoraConfig(**{**LORA, "r": r, "lora_alpha": 2 * r}))
    elif method == "bitfit":
        names = [n for n, _ in model.named_parameters()]
        per_channel = ".bias" if any(n.endswith(".bias") and not n.startswith("score") for n in names) else "norm.weight"
        for name, p in model.named_parameters():
            p.requires_grad = name.endswith(per_channel) or name.startswith("score")
    elif method not in ("full", "split"):
        raise ValueError(f"unknown baseline {method!r}")
    return model, [p for p in model.parameters() if p.requires_grad]
