"""FSDP2 / DDP checks on CPU with gloo, run by tests/test_fsdp.py as a script: ``python _fsdp_worker.py GROUP WORLD OUT``.

Every rank runs the checks of GROUP and saves what it measured to OUT/rank{r}.pt; the test asserts on it. Each
check trains a converted model sharded some way next to a single-process reference fed the same batches (the
full batch; each rank takes its slice), with AdamW, so equal losses mean equal gradients on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import replace_wrap  # noqa: E402
from replace_wrap.integrations.fsdp_measure import FSDPMeter, local_bytes  # noqa: E402
from replace_wrap.synthesis.estimators import sample_size  # noqa: E402

STEPS = 3
BATCH = 12  # divisible by 2, 3 and 4 ranks
# Tokens per rank of the transformer groups: with at most 16 the sampled default reads every row (m = N) and
# is exact, so a sharded run can equal the single-process exact one while it runs the sampled machinery.
EXACT_ROWS = 16


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# --- models: (model, blocks, batch(generator) -> full batch, loss(model, batch)) ------------------------------


def llama(seqs_per_rank: int = EXACT_ROWS // 8, dropout: float = 0.0) -> tuple[torch.nn.Module, Any, Callable, Callable]:
    """A 6-layer Llama; batches of ``seqs_per_rank`` sequences of 8 tokens for every rank."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
                      attention_dropout=dropout, use_cache=False)  # no KV cache: recompute=True replays no
    torch.manual_seed(0)                                       # block that is handed one
    model = LlamaForCausalLM(cfg)

    def batch(g: torch.Generator) -> dict:
        ids = torch.randint(0, 64, (seqs_per_rank * _world(), 8), generator=g)
        return {"input_ids": ids, "labels": ids}

    return model, model.model.layers, batch, lambda m, b: m(**b).loss


def vit() -> tuple[torch.nn.Module, Any, Callable, Callable]:
    """A 6-block timm ViT at 16 px (5 tokens an image), 3 images for every rank (15 tokens: exact rows)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=6,
                              embed_dim=48, num_heads=3, num_classes=5)

    def batch(g: torch.Generator) -> tuple:
        n = 3 * _world()
        return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)

    return model, model.blocks, batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])


def cnn() -> tuple[torch.nn.Module, Any, Callable, Callable]:
    """StagedCNN: stage widths 4 -> 8 -> 6 and kernels 3 -> 5, so replaced blocks have shape-adapted tensors."""
    from toys import StagedCNN

    torch.manual_seed(0)
    model = StagedCNN()
    for m in model.modules():  # batch statistics differ per rank (no SyncBatchNorm): the running ones, fixed
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()

    def batch(g: torch.Generator) -> tuple:
        return torch.randn(BATCH, 3, 12, 12, generator=g), torch.randint(0, 3, (BATCH,), generator=g)

    return model, [b for stage in model.stages for b in stage], batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])


# --- training -------------------------------------------------------------------------------------------------


def _slice(b: Any, rank: int, world: int) -> Any:
    if isinstance(b, dict):
        return {k: v.chunk(world)[rank] for k, v in b.items()}
    return tuple(v.chunk(world)[rank] for v in b)


def train(model: torch.nn.Module, batch: Callable, loss_fn: Callable, steps: int = STEPS, *, sharded: bool = True,
          meter_step: int | None = None, opt: torch.optim.Optimizer | None = None, seed: int = 3) -> dict:
    """AdamW steps on the same full batches; sharded: each rank its slice, the loss averaged over ranks."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    out: dict = {"losses": []}
    for step in range(steps):
        b = _slice(batch(g), rank, world)
        meter = FSDPMeter(model) if step == meter_step else None
        if meter is not None:
            with meter:
                loss = loss_fn(model, b)
                loss.backward()
            out.update(gathered=meter.gathered, reduced=meter.reduced, all_reduced=meter.all_reduced,
                       peak=meter.peak_unsharded, local=local_bytes(model, opt))
        else:
            loss = loss_fn(model, b)
            loss.backward()
        opt.step()
        if meter is not None:
            out["local_after_step"] = local_bytes(model, opt)
        opt.zero_grad()
        value = loss.detach().clone()
        if sharded:
            dist.all_reduce(value)
            value /= world
        out["losses"].append(value.item())
    out["opt"] = opt
    return out


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered, under its name without checkpoint_wrapper's prefix."""
    return {n.replace("_checkpoint_wrapped_module.", ""): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def per_block_loop(model: torch.nn.Module, blocks: Any, **kw: Any) -> None:
    """torchtitan's recipe, written by the user: one unit per block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def reference(make: Callable, **convert: Any) -> dict:
    model, _, batch, loss_fn = make()
    # Exact: the sharded runs read every row (EXACT_ROWS), so the two agree to rounding.
    replace_wrap.convert(model, every=2, **{"ab_grad_sample": "exact", **convert})
    run = train(model, batch, loss_fn, sharded=False)
    return {"losses": run["losses"], "state": full_state(model)}


def compare(run: dict, model: torch.nn.Module, ref: dict) -> dict:
    """Relative loss gap and largest parameter gap to the reference."""
    state = full_state(model)
    gaps = [abs(a - b) / abs(b) for a, b in zip(run["losses"], ref["losses"])]
    return {"loss_gap": max(gaps), "param_gap": max((state[k] - v).abs().max().item() for k, v in ref["state"].items()),
            "keys_equal": sorted(state) == sorted(ref["state"])}


def unit_bytes(model: torch.nn.Module, blocks: Any) -> tuple[int, int]:
    """Bytes of the root's own parameters and of the largest block (of the model before conversion)."""
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_blocks)
    return root, max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)


# --- groups ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _knob(name: str, value: float) -> Any:
    """``fsdp_sampled.<name> = value`` meanwhile (the sampled estimator's thresholds are module constants)."""
    from replace_wrap.integrations import fsdp_sampled

    before = getattr(fsdp_sampled, name)
    setattr(fsdp_sampled, name, value)
    try:
        yield
    finally:
        setattr(fsdp_sampled, name, before)


def _rows_rule(value: float) -> Any:
    """Gather the sampled rows while they cost at most ``value`` times a weight's shard (inf: always; 0: never,
    a sampled weight gradient is reduce-scattered instead). The groups run with inf, the rows path: the tiny
    models here have layers so narrow that the default rule (1.0) takes the other path for most of them."""
    return _knob("ROWS_PER_SHARD_MAX", value)


@contextlib.contextmanager
def _notes() -> Any:
    """What the library logs meanwhile (e.g. an option that cannot apply under sharding)."""
    notes: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: notes.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("replace_wrap").addHandler(handler)
    try:
        yield notes
    finally:
        logging.getLogger("replace_wrap").removeHandler(handler)


def group_llama(mesh: Any, out: Path) -> dict:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy

    res: dict = {}
    ref = reference(llama)
    plain, plain_blocks, batch, loss_fn = llama()
    res["root_bytes"], res["block_bytes"] = unit_bytes(plain, plain_blocks)
    res["total_bytes"] = sum(p.numel() * p.element_size() for p in plain.parameters())

    # 1. the user's own torchtitan loop on a converted model, measured on step 2
    model, blocks, batch, loss_fn = llama()
    replace_wrap.convert(model, every=2)
    unsharded_converted = copy.deepcopy(model)
    res["converted_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    per_block_loop(model, blocks, mesh=mesh)
    with _notes() as notes:
        run = train(model, batch, loss_fn, meter_step=1)
    res["notes"] = notes
    # what a replaced block's sampled linear weights would reduce-scatter (padded as FSDP pads), and the rows
    # each of them all-gathers instead (16 a rank: x, dy and the rescale)
    world = dist.get_world_size()
    linears = [m for i in (1, 3) for m in plain_blocks[i].modules() if isinstance(m, torch.nn.Linear)]
    res["linear_bytes"] = sum(-(-m.out_features // world) * world * m.in_features * 4 for m in linears)
    res["rows_bytes"] = sum(EXACT_ROWS * (m.in_features + m.out_features + 1) * 4 * world for m in linears)
    res["linear_shapes"] = [(m.out_features, m.in_features) for m in linears]
    # the replaced blocks' other tensors (norms): their full gradients ride in the rows' all-gather, from every rank
    others = [p for i in (1, 3) for m in plain_blocks[i].modules() if not isinstance(m, torch.nn.Linear)
              for p in m.parameters(recurse=False)]
    res["norm_bytes"] = sum(p.numel() * 4 for p in others)
    res["norm_padded"] = sum(-(-p.shape[0] // world) * world * p[0].numel() * 4 for p in others)
    res["loop"] = {**compare(run, model, ref), **{k: run[k] for k in ("gathered", "reduced", "peak", "local", "local_after_step")}}
    mem = replace_wrap.fsdp_memory(unsharded_converted, dist.get_world_size(), prefetch=0)
    res["memory_formula"] = {"params": mem.params, "grads": mem.grads, "optimizer": mem.optimizer, "peak": mem.unsharded_peak}
    # a synthesized tensor read between steps is a sharded DTensor, like every FSDP parameter then
    read = model.model.layers[1].mlp.up_proj.weight
    state = full_state(model)
    expect = (state["model.layers.1.replacement.a"] * state["model.layers.0.mlp.up_proj.weight"]
              + state["model.layers.1.replacement.b"] * state["model.layers.2.mlp.up_proj.weight"])
    res["outside_read"] = {"is_dtensor": hasattr(read, "full_tensor"), "gap": (read.full_tensor() - expect).abs().max().item()}

    # 2. the same with e2e (not converted) and freeze (the same blocks frozen): the communication baselines
    for name in ("e2e", "freeze"):
        m, bl, batch, loss_fn = llama()
        if name == "freeze":
            for i in range(1, len(bl) - 1, 2):
                bl[i].requires_grad_(False)
        mem_base = replace_wrap.fsdp_memory(m, dist.get_world_size(), prefetch=0)
        per_block_loop(m, bl, mesh=mesh)
        r = train(m, batch, loss_fn, steps=2, meter_step=1)
        res[name] = {k: r[k] for k in ("gathered", "reduced", "peak", "local", "local_after_step")}
        res[name]["memory_formula"] = {"params": mem_base.params, "grads": mem_base.grads, "optimizer": mem_base.optimizer,
                                       "peak": mem_base.unsharded_peak}

    # 3. replace_wrap.shard with activation checkpointing (checkpoint_wrapper on every block, as torchtitan)
    model, blocks, batch, loss_fn = llama()
    replace_wrap.convert(model, every=2)
    for i in range(len(blocks)):
        blocks[i] = checkpoint_wrapper(blocks[i])
    replace_wrap.shard(model, mesh=mesh)
    res["shard_ckpt"] = compare(train(model, batch, loss_fn), model, ref)
    res["shard_ckpt"]["units"] = replace_wrap.fsdp_units(model)

    # 3b. HF's reentrant gradient checkpointing, with and without dropout
    res["reentrant"] = _reentrant(mesh, ref)

    # 4. coupled neighbour gradients, recompute=True (checkpointing inside the block), no reshard after forward
    ref_c = reference(llama, neighbour_grad="coupled", recompute=True)
    model, blocks, batch, loss_fn = llama()
    replace_wrap.convert(model, every=2, neighbour_grad="coupled", recompute=True)
    replace_wrap.shard(model, mesh=mesh, reshard_after_forward=False)
    res["coupled"] = compare(train(model, batch, loss_fn), model, ref_c)

    # 4b. recompute=True with the sampled default: gathers made per read, announced by their reader
    model, blocks, batch, loss_fn = llama()
    replace_wrap.convert(model, every=2, recompute=True)
    replace_wrap.shard(model, mesh=mesh)
    res["recompute_sampled"] = compare(train(model, batch, loss_fn), model, ref)

    # 5. mixed precision: mixed in fp32 on the shards, gathered in bf16; the scalars stay fp32
    model, blocks, batch, loss_fn = llama()
    replace_wrap.convert(model, every=2)
    replace_wrap.shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    run = train(model, batch, loss_fn)
    site = model.model.layers[1].replacement
    res["bf16"] = {"loss_gap": max(abs(a - b) / b for a, b in zip(run["losses"], ref["losses"])),
                   "scalar_dtypes": {str(site.a.dtype), str(run["opt"].state[site.a]["exp_avg"].dtype)}}

    # 6. torch.distributed.checkpoint: resume exactly; gather on rank 0 and merge into a plain model
    res["dcp"] = _dcp(mesh, out)

    # 7. HF Accelerate's FSDP2 preparation (transformer_based_wrap), driven on the CPU
    res["accelerate"] = _accelerate(ref)

    # 8. bad input: typed errors, the model left as it was
    res["errors"] = _errors(mesh)

    # 9. the FSDP2 internals replace_wrap reads are where it reads them (fails loudly on a torch that moved them)
    from replace_wrap.integrations import fsdp_state

    try:
        fsdp_state.check(model)
        res["compat"] = "ok"
    except replace_wrap.ReplaceWrapError as exc:
        res["compat"] = str(exc)

    # 10. HF Trainer with fsdp= on the CPU: what it really does with a converted model
    res["trainer"] = _trainer(out)

    # 11. the sampled default with fewer sampled rows than rows (m < N): many draws on one batch
    res["sampled"] = _sampled(mesh)

    # 12. a sampled weight also read outside its layer, on one rank only
    res["dense_read"] = _dense_read(mesh)
    res["default_rule"] = _default_rule(mesh)
    res["fold"] = _fold(mesh)

    # 14. the sampled default with gradient accumulation, a backward inside autocast, a layer called twice
    res["more"] = _more(mesh)

    # 13. HF GPT-2: Conv1D stores its weight (in, out), so a rank's shard holds input features
    res["gpt2"] = _gpt2(mesh)
    return res


def _reentrant(mesh: Any, ref: dict) -> dict:
    """HF's ``gradient_checkpointing_enable(use_reentrant=True)`` on a converted Llama sharded by ``shard`` (HF
    checkpoints the layer's ``__call__``, FSDP2's hooks inside): with every row read, trained against the single
    process; with attention dropout and 48 rows a rank (16 drawn), one step's loss and gradients against the same
    sharded step without checkpointing, each rank seeded alike in both. The first forward, without gradients, must
    draw the rows as the recomputation does, or the recomputed dropout masks are other ones."""
    enable = {"gradient_checkpointing_kwargs": {"use_reentrant": True}}
    world, rank = dist.get_world_size(), dist.get_rank()
    model, blocks, batch, loss_fn = llama()
    replace_wrap.convert(model, every=2)
    model.gradient_checkpointing_enable(**enable)
    replace_wrap.shard(model, mesh=mesh)
    res: dict = {"exact_rows": compare(train(model, batch, loss_fn), model, ref)}
    seqs = 6
    res["rows"], res["drawn"] = seqs * 8, sample_size(seqs * 8, "auto")
    step: dict = {}
    for checkpointed in (False, True):
        model, blocks, batch, loss_fn = llama(seqs_per_rank=seqs, dropout=0.1)
        replace_wrap.convert(model, every=2)
        forwards: list[bool] = []  # grad mode of each forward of a replaced block
        blocks[1].register_forward_pre_hook(lambda m, a: forwards.append(torch.is_grad_enabled()))
        if checkpointed:
            model.gradient_checkpointing_enable(**enable)
        replace_wrap.shard(model, mesh=mesh)
        b = _slice(batch(torch.Generator().manual_seed(8)), rank, world)
        torch.manual_seed(100 + rank)
        loss = loss_fn(model, b)
        loss.backward()
        step[checkpointed] = (loss.item(), {n: p.grad.full_tensor() for n, p in model.named_parameters()}, forwards)
    (loss, grads, _), (loss_c, grads_c, res["forwards"]) = step[False], step[True]
    res["loss_gap"] = abs(loss_c - loss)
    res["grad_gap"] = max((grads_c[n] - g).abs().max().item() for n, g in grads.items())
    res["keys_equal"] = sorted(grads) == sorted(grads_c)
    return res


def _gpt2(mesh: Any) -> dict:
    """A tiny GPT-2's scalar gradients, 16 tokens a rank (every row read), sharded against one process."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=5, n_head=4, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg)

    world, rank = dist.get_world_size(), dist.get_rank()
    ids = torch.randint(0, 64, (2 * world, 8), generator=torch.Generator().manual_seed(7))
    ref = make()
    replace_wrap.convert(ref, every=2, ab_grad_sample="exact")
    ref(input_ids=ids, labels=ids).loss.backward()
    model = make()
    replace_wrap.convert(model, every=2)
    per_block_loop(model, model.transformer.h, mesh=mesh)
    mine = ids.chunk(world)[rank]
    with FSDPMeter(model, sample=False) as meter:
        model(input_ids=mine, labels=mine).loss.backward()
    exact = make()
    replace_wrap.convert(exact, every=2, ab_grad_sample="exact")
    per_block_loop(exact, exact.transformer.h, mesh=mesh)
    with FSDPMeter(exact, sample=False) as meter_exact:
        exact(input_ids=mine, labels=mine).loss.backward()
    plain = make()  # the replaced blocks' Conv1D weights, (in, out), padded on dim 0 as FSDP pads
    conv1d = [m.weight for b in replace_wrap.report(ref).replaced for m in plain.get_submodule(b.path).modules()
              if type(m).__name__ == "Conv1D"]
    # and every tensor of theirs, padded likewise: the biases and norms ride in the rows' all-gather
    tensors = [p for b in replace_wrap.report(ref).replaced for p in plain.get_submodule(b.path).parameters()]

    def padded(ts: list) -> int:
        return sum(-(-t.shape[0] // world) * world * t[0].numel() * 4 for t in ts)

    return {"exact": scalar_grads(ref), "sharded": scalar_grads(model), "reduced": meter.reduced,
            "reduced_exact": meter_exact.reduced, "conv1d_bytes": padded(conv1d), "block_bytes": padded(tensors)}


class _ReadBlock(torch.nn.Module):
    """A residual MLP block that, while ``read`` is set, also uses its ``fc1.weight`` outside ``fc1``."""

    read = False

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.fc2(F.gelu(self.fc1(x)))
        if _ReadBlock.read:
            y = y + 0.1 * F.linear(x, self.fc1.weight)[..., :16]
        return y


def _dense_read(mesh: Any) -> dict:
    """Rank 0 reads a replaced block's fc1.weight outside fc1 (a dense gradient for it), the others do not: every
    rank of the mesh (HSDP replicas too) must reduce-scatter that weight's gradient, and the scalars' gradient is
    the single process's."""
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(*[_ReadBlock() for _ in range(5)], torch.nn.Linear(16, 1))

    world, rank = dist.get_world_size(), dist.get_rank()
    xs = torch.randn(world, 8, 16, generator=torch.Generator().manual_seed(6))  # 8 rows a rank: all read
    ref = make()
    replace_wrap.convert(ref, every=2, ab_grad_sample="exact")
    for k in range(world):
        _ReadBlock.read = k == 0
        (ref(xs[k]).pow(2).mean() / world).backward()
    model = make()
    replace_wrap.convert(model, every=2)
    per_block_loop(model, list(model)[:5], mesh=mesh)
    _ReadBlock.read = rank == 0
    with FSDPMeter(model, sample=False) as meter:
        model(xs[rank]).pow(2).mean().backward()
    _ReadBlock.read = False
    return {"exact": scalar_grads(ref), "sharded": scalar_grads(model), "reduced": meter.reduced}


def scalar_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The replaced blocks' scalar gradients, gathered (FSDP shards them with their block)."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone().reshape(-1)
            for n, p in model.named_parameters() if n.endswith(("replacement.a", "replacement.b"))}


def _sampled(mesh: Any, draws: int = 60) -> dict:
    """The sharded default's scalar gradients against the exact ones of the same batch from one process: with
    16 tokens a rank (every row read), and over ``draws`` seeds with 48 (16 of 48 rows sampled a layer and rank);
    the rows gathered (``rows``) and a sampled weight gradient reduce-scattered (``dw``)."""
    out: dict = {}
    # the draws at world 2 only (the default run): the rescale does not depend on the world size, and 4 processes
    # drawing 120 times on 2 cores would outlast the group's time limit
    keys = (("all_rows", EXACT_ROWS // 8), ("draws", 6)) if dist.get_world_size() == 2 else (("all_rows", EXACT_ROWS // 8),)
    for path, rule in (("rows", math.inf), ("dw", 0.0)):
        for key, seqs in keys:
            model, _, batch, loss_fn = llama(seqs_per_rank=seqs)
            full = batch(torch.Generator().manual_seed(4))
            replace_wrap.convert(model, every=2, ab_grad_sample="exact")
            loss_fn(model, full).backward()
            exact = scalar_grads(model)
            model, blocks, _, loss_fn = llama(seqs_per_rank=seqs)
            replace_wrap.convert(model, every=2)
            per_block_loop(model, blocks, mesh=mesh)
            mine = _slice(full, dist.get_rank(), dist.get_world_size())
            estimates = []
            with _rows_rule(rule):
                for d in range(draws if key == "draws" else 1):
                    torch.manual_seed(1000 * dist.get_rank() + d)  # each rank draws its own rows
                    loss_fn(model, mine).backward()
                    estimates.append(scalar_grads(model))
                    model.zero_grad()
            out[f"{path}_{key}"] = {"exact": exact, "estimates": {k: torch.cat([e[k] for e in estimates]) for k in exact}}
    return out


class _Twice(torch.nn.Module):
    """A residual block that calls its one linear layer twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = torch.nn.Linear(32, 32), torch.nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(F.gelu(self.fc(self.norm(x))))


def _more(mesh: Any) -> dict:
    """Largest relative gap of the sharded default's scalar gradients (every row read) to one process's exact
    ones: two micro-batches with ``set_requires_gradient_sync(False)`` on the first; forward and backward under
    CPU bf16 autocast; a block that calls its linear layer twice."""
    world, rank = dist.get_world_size(), dist.get_rank()

    def gap(ref: torch.nn.Module, model: torch.nn.Module) -> float:
        e, s = scalar_grads(ref), scalar_grads(model)
        return max(((s[k] - e[k]).abs() / e[k].abs()).item() for k in e)

    out = {}
    g = torch.Generator().manual_seed(3)
    ref, _, batch, loss_fn = llama()
    b1, b2 = batch(g), batch(g)
    replace_wrap.convert(ref, every=2, ab_grad_sample="exact")
    for b in (b1, b2):
        (loss_fn(ref, b) / 2).backward()
    model, blocks, _, _ = llama()
    replace_wrap.convert(model, every=2)
    per_block_loop(model, blocks, mesh=mesh)
    for sync, b in ((False, b1), (True, b2)):
        model.set_requires_gradient_sync(sync)
        (loss_fn(model, _slice(b, rank, world)) / 2).backward()
    out["accumulation"] = gap(ref, model)

    b = batch(torch.Generator().manual_seed(5))
    ref, *_ = llama()
    replace_wrap.convert(ref, every=2, ab_grad_sample="exact")
    with torch.autocast("cpu", torch.bfloat16):
        loss_fn(ref, b).backward()
    model, blocks, *_ = llama()
    replace_wrap.convert(model, every=2)
    per_block_loop(model, blocks, mesh=mesh)
    with torch.autocast("cpu", torch.bfloat16):
        loss_fn(model, _slice(b, rank, world)).backward()  # the backward inside the autocast region
    out["autocast"] = gap(ref, model)

    def twice() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(*[_Twice() for _ in range(5)], torch.nn.Linear(32, 1))

    xs = torch.randn(world, 8, 32, generator=torch.Generator().manual_seed(2))
    ref = twice()
    replace_wrap.convert(ref, every=2, ab_grad_sample="exact")
    for k in range(world):
        (ref(xs[k]).pow(2).mean() / world).backward()
    model = twice()
    replace_wrap.convert(model, every=2)
    per_block_loop(model, list(model)[:5], mesh=mesh)
    model(xs[rank]).pow(2).mean().backward()
    out["twice"] = gap(ref, model)
    return out


def _fold(mesh: Any) -> dict:
    """One backward of the default (the replaced blocks' norm gradients ride in the rows' all-gather) and one with
    them reduce-scattered (``FOLD_FLOATS_MAX = 0``): collectives, bytes and every local gradient of each."""
    from replace_wrap.integrations import fsdp_sampled

    out: dict = {}
    b = None
    for name, limit in (("folded", fsdp_sampled.FOLD_FLOATS_MAX), ("unfolded", 0)):
        model, blocks, batch, loss_fn = llama()
        replace_wrap.convert(model, every=2)
        per_block_loop(model, blocks, mesh=mesh)
        b = b or _slice(batch(torch.Generator().manual_seed(6)), dist.get_rank(), dist.get_world_size())
        with _knob("FOLD_FLOATS_MAX", limit), FSDPMeter(model, sample=False) as meter:
            loss_fn(model, b).backward()
        grads = {n: p.grad.to_local().clone() for n, p in model.named_parameters() if p.grad is not None}
        out[name] = {"gathered": meter.gathered, "reduced": meter.reduced, "calls": dict(meter.calls), "grads": grads}
    return out


def _default_rule(mesh: Any) -> dict:
    """One step of the default rule on the Llama (16 tokens a rank): the bytes it communicates."""
    model, blocks, batch, loss_fn = llama()
    replace_wrap.convert(model, every=2)
    per_block_loop(model, blocks, mesh=mesh)
    b = _slice(batch(torch.Generator().manual_seed(1)), dist.get_rank(), dist.get_world_size())
    with _rows_rule(1.0), FSDPMeter(model, sample=False) as meter:
        loss_fn(model, b).backward()
    return {"gathered": meter.gathered, "reduced": meter.reduced}


def _dcp(mesh: Any, out: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    def make() -> tuple:
        model, blocks, batch, loss_fn = llama()
        replace_wrap.convert(model, every=2)
        replace_wrap.shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2), batch, loss_fn

    ckpt = str(out / "dcp")
    model, opt, batch, loss_fn = make()
    train(model, batch, loss_fn, steps=2, opt=opt, seed=1)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    # gather: every rank calls it, rank 0 receives full tensors
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.train()
    after = train(model, batch, loss_fn, steps=2, opt=opt, seed=2)["losses"]
    resumed, ropt, _, _ = make()
    sd = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, ropt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(resumed, sd["model"])
    set_optimizer_state_dict(resumed, ropt, sd["optim"])
    again = train(resumed, batch, loss_fn, steps=2, opt=ropt, seed=2)["losses"]
    res = {"resume_equal": after == again, "sharded_keys": sorted(sd["model"])}
    dist.barrier()
    if dist.get_rank() == 0:
        for how in ("gathered", "dcp_to_torch_save"):
            plain, *_ = llama()
            replace_wrap.convert(plain, every=2)
            if how == "gathered":
                plain.load_state_dict(full)
            else:  # offline, from the DCP checkpoint files alone
                dcp_to_torch_save(ckpt, out / "ckpt.pt")
                plain.load_state_dict(torch.load(out / "ckpt.pt", weights_only=True)["model"])
            replace_wrap.merge(plain)
            plain.eval()
            with torch.no_grad():
                res[f"merge_gap_{how}"] = (plain(input_ids=ids).logits - logits).abs().max().item()
            res[f"merged_plain_{how}"] = not any(isinstance(m, replace_wrap.ReplacementSite) for m in plain.modules())
    dist.barrier()
    return res


def _trainer(out: Path) -> dict:
    """Trainer(fsdp=...) on the CPU: Accelerate enables FSDP only on accelerators, so it trains with DDP."""
    from transformers import Trainer, TrainingArguments

    os.environ.update(RANK=str(dist.get_rank()), LOCAL_RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()))
    model, blocks, batch, loss_fn = llama()
    replace_wrap.convert(model, every=2)
    g = torch.Generator().manual_seed(0)
    data = [{k: v[0] for k, v in batch(g).items()} for _ in range(4 * dist.get_world_size())]
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=2, max_steps=2, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True,
                             fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    return {"distributed_type": str(trainer.accelerator.distributed_type), "wrapped": type(trainer.model_wrapped).__name__,
            "loss": result.training_loss}


def _accelerate(ref: dict) -> dict:
    """Accelerate's FSDP2 preparation runs only on accelerators (on the CPU, Accelerator and Trainer fall back
    to DDP); its function that wraps the model, ``fsdp2_prepare_model``, is driven here with the few attributes
    it reads from the Accelerator."""
    import types

    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    shim = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                 mixed_precision="no", device=torch.device("cpu"), is_main_process=dist.get_rank() == 0,
                                 parallelism_config=None)
    model, blocks, batch, loss_fn = llama()
    replace_wrap.convert(model, every=2)
    model = fsdp2_prepare_model(shim, model)
    res = compare(train(model, batch, loss_fn), model, ref)
    res["wrapped"] = [type(b).__name__ for b in model.model.layers]
    return res


def _errors(mesh: Any) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    res: dict = {}

    def caught(fn: Callable) -> str:
        try:
            fn()
        except replace_wrap.ReplaceWrapError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    model, blocks, *_ = llama()
    before = [id(p) for p in model.parameters()]
    res["unconverted"] = caught(lambda: replace_wrap.shard(model, mesh=mesh))
    res["unconverted_unchanged"] = [id(p) for p in model.parameters()] == before and not hasattr(model.model.layers[0], "reshard")
    res["convert_sharded"] = caught(lambda: (fully_shard(model, mesh=mesh), replace_wrap.convert(model, every=2)))

    model, *_ = llama()
    replace_wrap.convert(model, every=2)
    before = [id(p) for p in model.parameters()]
    res["bad_mesh_3d"] = caught(lambda: replace_wrap.shard(model, mesh=init_device_mesh("cpu", (1, 1, dist.get_world_size()))))
    res["bad_mesh_group"] = caught(lambda: replace_wrap.shard(model, mesh=dist.group.WORLD))
    res["bad_mesh_unchanged"] = [id(p) for p in model.parameters()] == before
    replace_wrap.shard(model, mesh=mesh)
    res["twice"] = caught(lambda: replace_wrap.shard(model, mesh=mesh))
    before = [id(p) for p in model.parameters()]
    res["merge_sharded"] = caught(lambda: replace_wrap.merge(model))
    res["merge_unchanged"] = [id(p) for p in model.parameters()] == before and replace_wrap.report(model).replaced != []

    # FSDP1 (FullyShardedDataParallel, a FlatParameter per unit) sets the managed flag FSDP2 sets: the errors
    # must name it and the way to FSDP2, not say that the model is sharded with FSDP2
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model, blocks, batch, loss_fn = llama()
    replace_wrap.convert(model, every=2)
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({type(blocks[0])}),
                                       device_id=torch.device("cpu"))
    res["fsdp1_forward"] = caught(lambda: loss_fn(wrapped, batch(torch.Generator().manual_seed(0))))
    res["fsdp1_merge"] = caught(lambda: replace_wrap.merge(wrapped))
    res["fsdp1_convert"] = caught(lambda: replace_wrap.convert(wrapped, every=2))
    return res


def group_vit(mesh: Any, out: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    res: dict = {}
    ref = reference(vit)
    plain, plain_blocks, *_ = vit()
    res["root_bytes"], res["block_bytes"] = unit_bytes(plain, plain_blocks)
    res["total_bytes"] = sum(p.numel() * p.element_size() for p in plain.parameters())
    model, blocks, batch, loss_fn = vit()
    replace_wrap.convert(model, every=2)
    res["converted_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    per_block_loop(model, blocks, mesh=mesh)
    run = train(model, batch, loss_fn, meter_step=1)
    res["loop"] = {**compare(run, model, ref), **{k: run[k] for k in ("gathered", "reduced", "peak", "local")}}

    # HSDP: 2 replicas of 2 shards (a replaced block's gradient is reduce-scattered, then all-reduced; its
    # sampled rows gathered over the shard group, the scalars' gradient summed over all ranks by FSDP)
    world = dist.get_world_size()
    if world >= 4:
        hsdp = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        model, blocks, batch, loss_fn = vit()
        replace_wrap.convert(model, every=2)
        replace_wrap.shard(model, mesh=hsdp)
        res["hsdp"] = compare(train(model, batch, loss_fn), model, ref)
        ref_llama = reference(llama)
        model, blocks, batch, loss_fn = llama()
        replace_wrap.convert(model, every=2)
        replace_wrap.shard(model, mesh=hsdp)
        res["hsdp_llama"] = compare(train(model, batch, loss_fn), model, ref_llama)
        res["hsdp_dense_read"] = _dense_read(hsdp)

    # a CNN whose replaced blocks have shape-adapted tensors: the gathered-neighbour path
    ref_cnn = reference(cnn)
    model, blocks, batch, loss_fn = cnn()
    replace_wrap.convert(model, every=2)
    res["cnn_adapted"] = any(b.adapted for b in replace_wrap.report(model).replaced)
    per_block_loop(model, blocks, mesh=mesh)
    with _notes() as notes:
        res["cnn"] = compare(train(model, batch, loss_fn), model, ref_cnn)
    res["cnn"]["notes"] = notes

    # DDP on the converted model, no find_unused_parameters. Exact estimator: with the sampled default each rank
    # estimates its own part of the scalar gradient (DDP averages unbiased estimates: unbiased, not equal).
    model, blocks, batch, loss_fn = vit()
    replace_wrap.convert(model, every=2, ab_grad_sample="exact")
    ddp = DistributedDataParallel(model)
    run = train(ddp, batch, loss_fn)
    res["ddp"] = compare(run, model, ref)
    return res


GROUPS = {"llama": group_llama, "vit": group_vit}


def work(rank: int, world: int, group: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        with _rows_rule(math.inf):
            res = GROUPS[group](init_device_mesh("cpu", (world,)), Path(out))
        torch.save(res, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears its connections down while another still uses them (gloo aborts then)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    group, world, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tempfile.tempdir = out
    torch.multiprocessing.spawn(work, args=(world, group, out), nprocs=world)
