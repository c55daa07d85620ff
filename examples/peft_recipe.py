"""PEFT + replacement, "replace the middle, LoRA the rest", on a Llama built from a config (no download).

Convert first (every other middle layer's weights become ``a * W_prev + b * W_next``), then add LoRA with
``replace_wrap.integrations.peft.get_peft_model`` to the layers that keep their weights. Train, save the
adapter with PEFT's ``save_pretrained`` (it also carries the scalars and the replaced layers' values), load it
back two ways, and merge: every path predicts exactly as the trained model.

    python examples/peft_recipe.py                         # train a few steps, save, reload, merge, check
    python examples/peft_recipe.py --compare               # memory and trainable parameters: LoRA alone vs
                                                           # replace + LoRA (each in a fresh process)

``--compare`` prints one row per variant: trainable parameters, parameter memory (all weights), gradient +
AdamW state, the parameters plus what autograd keeps for the backward (each storage once), and the
process's peak RSS over the steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile

import torch

import replace_wrap
from replace_wrap.integrations import peft as rw_peft


def build(layers: int, hidden: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 64), num_key_value_heads=max(2, hidden // 64) // 2 or 1,
    )
    return transformers.LlamaForCausalLM(cfg)


def lora_config(layers: int, replaced: list[int]):  # noqa: ANN201
    from peft import LoraConfig

    kept = [i for i in range(layers) if i not in replaced]
    # LoRA on the layers that keep their weights; the replaced ones learn their two scalars
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      layers_to_transform=kept)


def make(variant: str, layers: int, hidden: int, vocab: int) -> torch.nn.Module:
    import peft

    model = build(layers, hidden, vocab)
    if variant == "lora":
        return peft.get_peft_model(model, lora_config(layers, []))
    replace_wrap.convert(model, every=2, recompute=variant == "replace_recompute")
    replaced = [int(b.path.rsplit(".", 1)[1]) for b in replace_wrap.report(model).replaced]
    return rw_peft.get_peft_model(model, lora_config(layers, replaced))


def batch(vocab: int, seq: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (size, seq), generator=torch.Generator().manual_seed(seed))


def train(model: torch.nn.Module, vocab: int, steps: int, seq: int = 32, size: int = 4) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for step in range(steps):
        x = batch(vocab, seq, size, step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def demo(args: argparse.Namespace) -> dict:
    import peft

    model = make("replace", args.layers, args.hidden, args.vocab)
    model.print_trainable_parameters()  # PEFT's line
    replace_wrap.print_trainable_parameters(model)  # ours: also what the replaced layers synthesize
    losses = train(model, args.vocab, args.steps)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; scalars {replace_wrap.scalars(model)}")
    model.eval()
    x = batch(args.vocab, 16, 2, 99)
    with torch.no_grad():
        trained = model(input_ids=x).logits
    diffs = {}
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        # an adapter goes on top of the same pretrained base it was trained on (here: the same seed)
        again = rw_peft.from_pretrained(build(args.layers, args.hidden, args.vocab), d)
        plain = peft.PeftModel.from_pretrained(build(args.layers, args.hidden, args.vocab), d)
        with torch.no_grad():
            diffs["replace_wrap.integrations.peft.from_pretrained"] = (again(input_ids=x).logits - trained).abs().max().item()
            diffs["PeftModel.from_pretrained (plain base)"] = (plain(input_ids=x).logits - trained).abs().max().item()
    merged = copy.deepcopy(model).merge_and_unload()  # replace_wrap.merge runs first, then PEFT merges LoRA
    with torch.no_grad():
        diffs["merge_and_unload"] = (merged(input_ids=x).logits - trained).abs().max().item()
    for name, diff in diffs.items():
        print(f"max |{name} - trained| = {diff:.2e}")
    return {"losses": losses, "diffs": diffs, "merged_type": type(merged).__name__}


def measure(variant: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    model = make(variant, args.layers, args.hidden, args.vocab)
    params = {id(p): p for p in model.parameters()}.values()
    trainable = [p for p in params if p.requires_grad]
    row = {
        "variant": variant,
        "trainable": sum(p.numel() for p in trainable),
        "param_mib": sum(p.numel() * p.element_size() for p in params) / 2**20,
        # a gradient and two AdamW moments per trainable value
        "grad_adam_mib": 3 * sum(p.numel() * p.element_size() for p in trainable) / 2**20,
    }
    # each storage once: a frozen layer's weight that autograd keeps is the parameter itself, while a replaced
    # layer's synthesized weight kept for the backward is memory of its own
    seen = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = batch(args.vocab, args.seq, args.batch, 0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x).loss.backward()
    row["params_saved_mib"] = sum(seen.values()) / 2**20
    model.zero_grad(set_to_none=True)
    train(model, args.vocab, args.steps, args.seq, args.batch)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


VARIANTS = {
    "lora": "LoRA (r=8, attention) on all layers",
    "replace": "replace every 2nd layer + LoRA on the kept ones",
    "replace_recompute": "the same with recompute=True",
}


def compare(args: argparse.Namespace) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--measure", variant, "--layers", str(args.layers), "--hidden",
               str(args.hidden), "--vocab", str(args.vocab), "--steps", str(args.steps), "--seq", str(args.seq),
               "--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| variant | trainable params | parameters (MiB) | grads + AdamW (MiB) | parameters + kept for "
          "backward (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {VARIANTS[r['variant']]} | {r['trainable']:,} | {r['param_mib']:.1f} | {r['grad_adam_mib']:.2f} | "
              f"{r['params_saved_mib']:.1f} | {r['peak_rss_mib']:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> dict | list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--measure", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        row = measure(args.measure, args)
        print(json.dumps(row))
        return row
    if args.compare:
        return compare(args)
    return demo(args)


if __name__ == "__main__":
    main()
