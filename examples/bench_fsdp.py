"""FSDP2 benchmark: end-to-end vs frozen blocks vs replaced blocks, one unit per block, on N ranks.

Each variant is sharded with torchtitan's loop (``fully_shard`` per block, then the root) and trained with AdamW
on random tokens; per rank the script measures the bytes it stores (parameters, gradients, AdamW state), the
peak of unsharded parameter bytes during a step, the bytes it all-gathers and reduce-scatters per step, the
step time, and the per-rank peak of model memory: stored bytes plus the unsharded peak (activations not
included); on CUDA also the allocator's ``max_memory_allocated``, and prints them next to ``replace_wrap.fsdp_memory``'s prediction.

    python examples/bench_fsdp.py --world 4                                  # spawns 4 CPU processes (gloo)
    torchrun --nproc_per_node 8 examples/bench_fsdp.py --device cuda --layers 16 --hidden 1024   # NCCL
    python examples/bench_fsdp.py --world 2 --layers 4 --hidden 32 --steps 1 --json out.json   # a quick run

Variants: ``end-to-end`` (every block trained), ``freeze`` (the blocks ``convert(every=2)`` would replace are
frozen: gathered, never reduced), ``replace-exact`` (converted with ``every=2, ab_grad_sample="exact"``: the
replaced linear layers' weight gradients are computed and reduce-scattered) and ``replace`` (converted with
``every=2``: the default sampled scalar gradient, no weight gradient for the replaced linear layers); with
``--unfolded`` also ``replace-unfolded`` (the default with its small gradients reduce-scattered on their own,
``fsdp_sampled.FOLD_FLOATS_MAX = 0``: one collective more a replaced block). Ratios are to end-to-end and to
freeze, measured in the same processes, variants interleaved over ``--rounds``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

import replace_wrap
from replace_wrap.integrations import fsdp_sampled
from replace_wrap.integrations.fsdp_measure import FSDPMeter, local_bytes

VARIANTS = ("end-to-end", "freeze", "replace-exact", "replace")


def variants(args: argparse.Namespace) -> tuple[str, ...]:
    return VARIANTS + (("replace-unfolded",) if args.unfolded else ())
MIB = 2**20


def build(args: argparse.Namespace, variant: str, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 512), max_position_embeddings=args.seq,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    if variant in ("replace", "replace-unfolded"):
        replace_wrap.convert(model, every=2)
    elif variant == "replace-exact":  # the exact scalar gradient: the full weight gradient, reduce-scattered
        replace_wrap.convert(model, every=2, ab_grad_sample="exact")
    elif variant == "freeze":
        for b in replace_wrap.plan(model, every=2).replaced:
            model.get_submodule(b.path).requires_grad_(False)
    return model


def shard(model: torch.nn.Module, mesh: Any, args: argparse.Namespace) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": mesh}
    if args.bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.model.layers:  # torchtitan's recipe; nothing of replace_wrap is called
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def run_variant(variant: str, args: argparse.Namespace, mesh: Any, device: torch.device) -> dict[str, Any]:
    before = fsdp_sampled.FOLD_FLOATS_MAX
    if variant == "replace-unfolded":
        fsdp_sampled.FOLD_FLOATS_MAX = 0
    try:
        return _run_variant(variant, args, mesh, device)
    finally:
        fsdp_sampled.FOLD_FLOATS_MAX = before


def _run_variant(variant: str, args: argparse.Namespace, mesh: Any, device: torch.device) -> dict[str, Any]:
    model = build(args, variant, device)
    plan = replace_wrap.fsdp_memory(model, dist.get_world_size(), param_dtype=torch.bfloat16 if args.bf16 else None,
                                    prefetch=0 if device.type == "cpu" else 1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shard(model, mesh, args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(dist.get_rank())

    def step(meter: FSDPMeter | None = None) -> float:
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
        start = time.perf_counter()
        if meter is None:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        else:
            with meter:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()  # warm-up: lazy init, optimizer state
    meter = FSDPMeter(model)  # one step with sampling (slow), for the bytes
    step(meter)
    stored = local_bytes(model, opt)
    with FSDPMeter(model, sample=False) as counted:  # gradients are dropped by zero_grad: count them here
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
    stored["grads"] = local_bytes(model)["grads"]
    opt.zero_grad()
    _reset_peak(device)
    times = [step() for _ in range(args.steps)]
    out = {
        "variant": variant, "trainable": trainable, "step_ms": 1000 * statistics.median(times),
        "gathered": meter.gathered, "reduced": meter.reduced, "all_reduced": meter.all_reduced,
        "peak_unsharded": meter.peak_unsharded, **{f"stored_{k}": v for k, v in stored.items()},
        "plan": {"params": plan.params, "grads": plan.grads, "optimizer": plan.optimizer, "peak": plan.unsharded_peak},
        "peak_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "collectives": dict(meter.calls),
    }
    assert counted.gathered == meter.gathered and counted.reduced == meter.reduced  # every step communicates alike
    del model, opt
    gc.collect()
    return out


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(args.backend or ("nccl" if device.type == "cuda" else "gloo"), rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
        results: dict[str, list[dict]] = {v: [] for v in variants(args)}
        for _ in range(args.rounds):
            for v in variants(args):
                results[v].append(run_variant(v, args, mesh, device))
        merged = {v: _median_rounds(rs) for v, rs in results.items()}
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, merged)
        if rank == 0:
            report(everyone, args)
        dist.barrier()  # no rank tears its connections down while another still uses them (gloo aborts then)
    finally:
        dist.destroy_process_group()


def _median_rounds(rounds: list[dict]) -> dict:
    out = dict(rounds[0])
    out["step_ms"] = statistics.median(r["step_ms"] for r in rounds)
    if out["peak_memory"] is not None:
        out["peak_memory"] = max(r["peak_memory"] for r in rounds)
    return out


def report(per_rank: list[dict], args: argparse.Namespace) -> None:
    world = len(per_rank)
    rows = []
    for v in variants(args):
        rs = [r[v] for r in per_rank]
        rows.append({
            "variant": v, "trainable": rs[0]["trainable"],
            "params_mib": max(r["stored_params"] for r in rs) / MIB, "grads_mib": max(r["stored_grads"] for r in rs) / MIB,
            "optim_mib": max(r["stored_optimizer"] for r in rs) / MIB,
            "unsharded_peak_mib": max(r["peak_unsharded"] for r in rs) / MIB, "plan_peak_mib": rs[0]["plan"]["peak"] / MIB,
            "gathered_mib": rs[0]["gathered"] / MIB, "reduced_mib": rs[0]["reduced"] / MIB,
            "step_ms": max(r["step_ms"] for r in rs),
            "model_peak_mib": max(r["stored_params"] + r["stored_grads"] + r["stored_optimizer"] + r["peak_unsharded"]
                                  for r in rs) / MIB,
            "allocator_peak_mib": None if rs[0]["peak_memory"] is None else max(r["peak_memory"] for r in rs) / MIB,
            "plan_matches": all({k: r[f"stored_{k}"] for k in ("params", "grads", "optimizer")}
                                == {k: r["plan"][k] for k in ("params", "grads", "optimizer")} for r in rs[:1]),
        })
    e2e, frz = rows[0], rows[1]
    for r in rows:
        comm = r["gathered_mib"] + r["reduced_mib"]
        r["comm_vs_e2e"] = comm / (e2e["gathered_mib"] + e2e["reduced_mib"])
        r["comm_vs_freeze"] = comm / (frz["gathered_mib"] + frz["reduced_mib"])
        r["step_vs_e2e"] = r["step_ms"] / e2e["step_ms"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"world": world, "args": vars(args), "rows": rows}, f, indent=1)
    print(f"FSDP2, {world} ranks, Llama {args.layers} layers x {args.hidden}, batch {args.batch}x{args.seq} per rank, "
          f"{'bf16 params' if args.bf16 else 'fp32'}, {args.device}; per rank (the fullest), MiB")
    head = ("variant", "trainable", "params", "grads", "AdamW", "unsharded peak", "(plan)", "gathered/step",
            "reduced/step", "comm vs e2e", "vs freeze", "step ms", "vs e2e", "model peak", "allocator peak")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([r["variant"], f"{r['trainable'] / 1e6:.2f}M", f"{r['params_mib']:.2f}", f"{r['grads_mib']:.2f}",
                          f"{r['optim_mib']:.2f}", f"{r['unsharded_peak_mib']:.2f}", f"{r['plan_peak_mib']:.2f}",
                          f"{r['gathered_mib']:.2f}", f"{r['reduced_mib']:.2f}", f"{r['comm_vs_e2e']:.3f}",
                          f"{r['comm_vs_freeze']:.3f}", f"{r['step_ms']:.1f}", f"{r['step_vs_e2e']:.2f}",
                          f"{r['model_peak_mib']:.2f}",
                          "n/a" if r["allocator_peak_mib"] is None else f"{r['allocator_peak_mib']:.0f}"]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default=None, help="gloo (CPU default) or nccl (CUDA default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--unfolded", action="store_true", help="also the variant replace-unfolded (FOLD_FLOATS_MAX = 0)")
    args = p.parse_args(argv)
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group(args.backend or ("nccl" if args.device == "cuda" else "gloo"))
        worker(dist.get_rank(), dist.get_world_size(), args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.multiprocessing.spawn(worker, args=(args.world, args), nprocs=args.world)


if __name__ == "__main__":
    main()
