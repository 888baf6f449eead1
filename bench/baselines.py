"""The torch baselines' definition, one copy for bench/compare.py's workers and bench/device_memory.py.

    model, params = adapt(model, "lora")   # full | lora | bitfit | split (split trains everything)
"""

from __future__ import annotations

LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS"}


def adapt(model, method: str):
    """Make an OPTForSequenceClassification `method`'s baseline; returns (model, trainable parameters).

    lora: PEFT r 16 on q_proj/v_proj (the rest frozen); bitfit: biases + the classifier head;
    full and split: every parameter."""
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**LORA))
    elif method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad = name.endswith(".bias") or name.startswith("score")
    elif method not in ("full", "split"):
        raise ValueError(f"unknown baseline {method!r}")
    return model, [p for p in model.parameters() if p.requires_grad]
