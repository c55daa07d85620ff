"""Will it fit? Per-rank memory of a Llama-shaped model under FSDP2, end-to-end vs freeze vs replace, on N ranks.

The model is built on the meta device (nothing is allocated; a 70B config converts in a fraction of a second)
and ``replace_wrap.fsdp_memory`` applies FSDP2's sharding rules to it, one unit per block plus the root, as
``replace_wrap.shard`` or torchtitan's loop shard it:

    python examples/fsdp_memory_plan.py                                   # Llama-3-70B shapes, 8 and 64 ranks
    python examples/fsdp_memory_plan.py --layers 32 --hidden 4096 --intermediate 14336 --kv-heads 8 --world 8
    python examples/fsdp_memory_plan.py --fake-pg                         # also shard for real, over a fake
                                                                          # process group, and compare

Per rank (the fullest one): fp32 parameters, gradients and AdamW state (2 tensors), and the peak of unsharded
parameters in bf16 (the root, plus the computing block and the one FSDP prefetches). Activations are not
included: add them for your batch and sequence length.
"""

from __future__ import annotations

import argparse

import torch

import replace_wrap

GIB = 2**30


def build(args: argparse.Namespace, variant: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if variant == "replace":
        replace_wrap.convert(model, every=args.every)
    elif variant == "freeze":
        for b in replace_wrap.plan(model, every=args.every).replaced:
            model.get_submodule(b.path).requires_grad_(False)
    return model


def fake_pg_check(args: argparse.Namespace, world: int, variant: str, expected: int) -> bool:
    """Shard the meta model with FSDP2 itself over a fake process group; rank 0's shards vs the formula."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    model = build(args, variant)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    dist.destroy_process_group()
    return held == expected


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=80)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--intermediate", type=int, default=28672)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--world", type=int, action="append", default=None, help="ranks (repeatable; default 8 and 64)")
    p.add_argument("--fake-pg", action="store_true", help="also shard with FSDP2 over a fake process group and compare")
    args = p.parse_args(argv)
    worlds = args.world or [8, 64]
    print(f"Llama {args.layers} layers x {args.hidden} (intermediate {args.intermediate}, {args.heads} heads, "
          f"{args.kv_heads} kv heads, vocab {args.vocab}); every={args.every}; GiB per rank")
    print("ranks | variant | trainable | params | grads | AdamW | unsharded peak | total" + (" | FSDP2 layout" if args.fake_pg else ""))
    for world in worlds:
        for variant in ("end-to-end", "freeze", "replace"):
            model = build(args, variant)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            m = replace_wrap.fsdp_memory(model, world, param_dtype=torch.bfloat16)
            row = [str(world), variant, f"{trainable / 1e9:.2f}B", f"{m.params / GIB:.1f}", f"{m.grads / GIB:.1f}",
                   f"{m.optimizer / GIB:.1f}", f"{m.unsharded_peak / GIB:.1f}", f"{m.total / GIB:.1f}"]
            if args.fake_pg:
                row.append("matches" if fake_pg_check(args, world, variant, m.params) else "DIFFERS")
            print(" | ".join(row))


if __name__ == "__main__":
    main()
