"""Test helper: a real peft LoRA adapter of the embedded model whose B is random and non-zero (peft starts B
at zero, which leaves the model's outputs unchanged), saved where the test needs it."""
from __future__ import annotations


def random_lora(out, seed: int, *, r: int = 8, std: float = 0.05, modules: tuple = ("q_proj", "v_proj")) -> str:
    import torch
    from peft import LoraConfig, get_peft_model

    from selfplay.models import load_causal_lm, resolve_model_path

    model = load_causal_lm(resolve_model_path("embedded"), "float32", "cpu")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(modules)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(str(out))
    return str(out)
