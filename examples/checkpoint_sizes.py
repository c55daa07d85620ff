"""What plain-loadable checkpoints cost: ``save_pretrained`` sizes of the original, converted-only and default
(plain-loadable) checkpoints, for a Llama and a ViT-B/16 built from their configs (no download).

    python examples/checkpoint_sizes.py                       # the table in docs/training.md
    python examples/checkpoint_sizes.py --small               # tiny configs, seconds
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Callable

import torch

import replace_wrap


def size_mib(model: torch.nn.Module) -> float:
    """MiB of the ``*.safetensors`` files ``save_pretrained`` writes."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors")) / 2**20


def builders(small: bool) -> dict[str, Callable[[], torch.nn.Module]]:
    import transformers as T

    if small:
        return {
            "Llama, 6 layers, hidden 64, vocab 512": lambda: T.LlamaForCausalLM(T.LlamaConfig(
                vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2)),
        }
    return {
        "Llama, 12 layers, hidden 512, vocab 32000": lambda: T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=12, num_attention_heads=8,
            num_key_value_heads=4)),
        "ViT-B/16, 12 layers, hidden 768": lambda: T.ViTForImageClassification(T.ViTConfig(num_labels=1000)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    print("| model | policy | original (MiB) | converted-only (MiB) | plain-loadable (MiB) | vs converted-only | "
          "vs original |")
    print("|---|---|---|---|---|---|---|")
    for name, build in builders(args.small).items():
        torch.manual_seed(0)
        original = size_mib(build())
        for every in (2, 3):
            converted_only = size_mib(replace_wrap.convert(build(), every=every, plain_state_dict=False))
            plain = size_mib(replace_wrap.convert(build(), every=every))
            rows.append({"model": name, "every": every, "original": original, "converted_only": converted_only,
                         "plain": plain})
            print(f"| {name} | every={every} | {original:.1f} | {converted_only:.1f} | {plain:.1f} | "
                  f"{plain / converted_only:.2f} | {plain / original:.4f} |")
    return rows


if __name__ == "__main__":
    main()
