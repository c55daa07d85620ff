"""FSDP2 with one unit per block: a replaced block synthesized from its neighbours' shards (issue 14).

The distributed checks run in one spawn per group (tests/_fsdp_worker.py, CPU/gloo): a tiny HF Llama-style
decoder at world 2, a timm ViT, a shape-adapting CNN, HSDP and DDP at world 4. Each compares against a
single-process run on the same full batches. The planning and bad-input checks below need no process group.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import replace_wrap
from conftest import run_python
from toys import ResidualMLP

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

LOSS_RTOL = 1e-4  # the bound: loss equal to the single-process run, relative
PARAM_ATOL = 1e-3  # AdamW divides near-zero gradients by their running RMS: DDP itself lands this far (see ddp)
# The Llama runs (16 tokens a rank): 7e-5 at world 3 on the exact path as on the sampled one, 1e-6 at world 2
LLAMA_ATOL = 1e-4
EXACT_ROWS = 16  # tokens a rank in the worker's transformer groups (the sampled default reads them all)


def _group(tmp_path_factory: pytest.TempPathFactory, group: str, world: int) -> list[dict]:
    pytest.importorskip("transformers" if group == "llama" else "timm")
    out = tmp_path_factory.mktemp(f"fsdp-{group}")
    proc = run_python("tests/_fsdp_worker.py", group, str(world), str(out), timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def llama2(request, tmp_path_factory):
    """The Llama group at world 2 (default run); 3 (uneven shards) and 4 behind ``slow``."""
    return _group(tmp_path_factory, "llama", request.param)


@pytest.fixture(scope="module", params=[4, pytest.param(2, marks=pytest.mark.slow)])
def vit4(request, tmp_path_factory):
    """The ViT / CNN / DDP group at world 4 (default run; HSDP as 2 x 2); 2 behind ``slow``."""
    return _group(tmp_path_factory, "vit", request.param)


def _trained_like_reference(res: dict, loss_rtol: float = LOSS_RTOL, atol: float = PARAM_ATOL) -> None:
    assert res["keys_equal"]
    assert res["loss_gap"] <= loss_rtol, res
    assert res["param_gap"] <= atol, res


# --- world 2, tiny Llama ----------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_torchtitan_loop_on_a_converted_llama_trains_like_one_process(llama2):
    # the user's own `for block in layers: fully_shard(block)`, then the root: nothing of replace_wrap called
    for res in llama2:
        # the sampled default (every row read: EXACT_ROWS tokens a rank) equals the exact single-process run
        _trained_like_reference(res["loop"], atol=LLAMA_ATOL)
        assert not [n for n in res["notes"] if "under FSDP2" in n], res["notes"]  # every layer samples: nothing to say


def test_memory_scales_like_plain_fsdp(llama2):
    world = len(llama2)
    for res in llama2:
        loop = res["loop"]
        # at no time more than root + 3 blocks unsharded (the replaced block's tensors, never the stack)
        assert loop["peak"] <= res["root_bytes"] + 3 * res["block_bytes"]
        assert loop["peak"] <= res["e2e"]["peak"] + 2 * 4 * world  # + the scalars' unit (a, b padded to world)
        # each rank stores its share of the converted parameters, gradients and AdamW state; a replaced block
        # adds only its scalars (4 bytes each, held by rank 0) to what the frozen baseline trains
        assert 0 <= loop["local"]["params"] - res["freeze"]["local"]["grads"] <= 4 * 2 * 2
        assert loop["local"]["grads"] == loop["local"]["params"]
        assert loop["local"]["optimizer"] == 2 * loop["local"]["params"]
        assert loop["local"]["params"] <= 1.15 * res["converted_bytes"] / world  # torch.chunk rounds rows up
    assert sum(r["loop"]["local"]["params"] for r in llama2) == llama2[0]["converted_bytes"]


def test_memory_formula_is_what_fsdp_holds(llama2):
    # replace_wrap.fsdp_memory (shapes only) against the bytes FSDP2 really holds on rank 0 (prefetch=0: gloo)
    res = llama2[0]
    for measured, formula in ((res["loop"], res["memory_formula"]), (res["e2e"], res["e2e"]["memory_formula"]),
                              (res["freeze"], res["freeze"]["memory_formula"])):
        assert measured["local"] == {k: formula[k] for k in ("params", "grads", "optimizer")}
        assert measured["peak"] == formula["peak"]


def test_replaced_linear_weights_send_sampled_rows_instead_of_their_gradient(llama2):
    world = len(llama2)
    scalars = 2 * 2 * 4 * world  # a and b of 2 blocks, padded to one element per rank
    header = 2 * world * 2 * 7 * 8  # per replaced block: rows and dense flag of its 7 linear weights, int64
    for res in llama2:
        loop, e2e, freeze = res["loop"], res["e2e"], res["freeze"]
        # a replaced block gathers its synthesized tensors as an ordinary block does, plus in the backward the sampled
        # rows of its linear layers (16 a rank: x, dy and the rescale), every rank's full norm gradients, and the
        # rows' counts
        rows = res["rows_bytes"] + world * res["norm_bytes"]
        assert e2e["gathered"] + rows <= loop["gathered"] <= e2e["gathered"] + rows + header + 2 * scalars  # fwd + bwd
        # it reduce-scatters what end-to-end does less its linear weights' and norms' gradients: its scalars only
        dropped = res["linear_bytes"] + res["norm_padded"]
        assert e2e["reduced"] - dropped <= loop["reduced"] <= e2e["reduced"] - dropped + scalars
        assert freeze["gathered"] == e2e["gathered"]
        assert freeze["reduced"] < loop["reduced"] <= freeze["reduced"] + scalars


def test_small_gradients_of_a_replaced_block_ride_in_the_rows_all_gather(llama2):
    world = len(llama2)
    for res in llama2:
        folded, unfolded = res["fold"]["folded"], res["fold"]["unfolded"]
        # one reduce-scatter fewer per replaced block (2 of 6), the norms' bytes moved from it to the all-gather
        assert unfolded["calls"]["reduce_scatter"] - folded["calls"]["reduce_scatter"] == 2
        assert folded["calls"]["all_gather"] == unfolded["calls"]["all_gather"]
        assert unfolded["reduced"] - folded["reduced"] == res["norm_padded"]
        assert folded["gathered"] - unfolded["gathered"] == world * res["norm_bytes"]
        # the same gradients, to rounding (the sum over ranks in another order)
        assert folded["grads"].keys() == unfolded["grads"].keys() and len(folded["grads"]) > 10
        for name, g in folded["grads"].items():
            u = unfolded["grads"][name]
            assert g.shape == u.shape and torch.allclose(g, u, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("path", ["rows", "dw"])
def test_sampled_scalar_gradient_under_fsdp_reading_every_row_is_exact(llama2, path):
    # rows: every rank's sampled rows all-gathered, thin products with the local shards; dw: each rank's sampled
    # rows make a weight gradient, reduce-scattered (where the rows would cost more bytes than the weight)
    for res in llama2:
        exact, estimates = res["sampled"][f"{path}_all_rows"]["exact"], res["sampled"][f"{path}_all_rows"]["estimates"]
        assert len(exact) == 4
        for name, e in estimates.items():  # measured: 1e-5 relative at world 3, 1e-7 at 2
            assert (e - exact[name]).abs().item() <= 1e-4 * exact[name].abs().item() + 1e-9, (name, e, exact[name])


def test_the_default_rule_reduces_a_sampled_gradient_where_rows_would_cost_more(llama2):
    world = len(llama2)
    for res in llama2:
        e2e, rule = res["e2e"], res["default_rule"]
        # m = 16 rows a rank; the rows path where 16 * (in + out + 1) floats are at most the weight's padded shard
        rows = [(o, i) for o, i in res["linear_shapes"] if EXACT_ROWS * (i + o + 1) <= -(-o // world) * i]
        weights = sum(-(-o // world) * world * i * 4 for o, i in rows)
        gathered_rows = sum(EXACT_ROWS * (i + o + 1) * 4 * world for o, i in rows)
        scalars, header = 2 * 2 * 4 * world, 2 * world * 2 * 7 * 8
        assert e2e["reduced"] - weights <= rule["reduced"] <= e2e["reduced"] - weights + scalars
        assert e2e["gathered"] + gathered_rows <= rule["gathered"] <= e2e["gathered"] + gathered_rows + header + 2 * scalars
        assert not rows  # the tiny Llama's layers are all narrower than 16 rows: each reduces a sampled gradient


def test_a_sampled_weight_read_outside_its_layer_on_one_rank_is_reduced_on_every_rank(llama2):
    for res in llama2:
        r = res["dense_read"]
        assert len(r["exact"]) == 4
        for name, e in r["sharded"].items():
            assert (e - r["exact"][name]).abs().item() <= 1e-5 * r["exact"][name].abs().item() + 1e-8, (name, e, r["exact"])
    # every rank reduce-scattered the same bytes (else a collective would have hung): fc1's weight among them
    assert len({res["dense_read"]["reduced"] for res in llama2}) == 1


def test_gpt2_conv1d_shards_hold_input_features_and_sample_exactly(llama2):
    for res in llama2:
        r = res["gpt2"]
        assert len(r["exact"]) == 4  # 2 replaced blocks of 5
        for name, e in r["sharded"].items():
            assert (e - r["exact"][name]).abs().item() <= 1e-4 * r["exact"][name].abs().item() + 1e-8, (name, e, r["exact"])
        # the sampled path ran: the replaced blocks' Conv1D weight gradients were not reduce-scattered, nor (riding in
        # the rows' all-gather) their biases' and norms'
        assert 0 < r["conv1d_bytes"] < r["block_bytes"] and r["reduced"] == r["reduced_exact"] - r["block_bytes"]


def test_sampled_default_with_accumulation_autocast_and_a_layer_called_twice(llama2):
    for res in llama2:
        more = res["more"]  # measured at world 2: 4e-7, 6e-3 (bf16 against bf16), 2e-7
        assert more["accumulation"] <= 1e-5 and more["twice"] <= 1e-5, more
        assert more["autocast"] <= 3e-2, more


@pytest.mark.parametrize("path", ["rows", "dw"])
def test_sampled_scalar_gradient_under_fsdp_is_unbiased(llama2, path):
    # 60 draws of the sharded default's estimate (16 of 48 rows a layer and rank) against the exact gradient of
    # the same batch from one process: the mean within 4.5 standard errors, and the draws really differ
    if len(llama2) != 2:
        pytest.skip("drawn at world 2 (the default run); worlds 3 and 4 check the exact case")
    for res in llama2:
        exact, estimates = res["sampled"][f"{path}_draws"]["exact"], res["sampled"][f"{path}_draws"]["estimates"]
        assert len(exact) == 4
        for name, e in estimates.items():
            sem = e.std().item() / len(e) ** 0.5
            assert sem > 1e-3 * exact[name].abs().item(), (name, e)
            assert abs(e.mean().item() - exact[name].item()) <= 4.5 * sem, (name, e.mean(), exact[name], sem)


def test_shard_with_activation_checkpointing_trains_like_one_process(llama2):
    res = llama2[0]["shard_ckpt"]
    _trained_like_reference(res, atol=LLAMA_ATOL)
    assert res["units"] == [(f"model.layers.{i}",) for i in range(6)]  # one unit per block, never the stack


def test_reentrant_checkpointing_with_dropout_and_sampled_rows(llama2):
    # HF's gradient_checkpointing_enable(use_reentrant=True) on a sharded converted Llama. (torch's
    # checkpoint_wrapper(REENTRANT) under fully_shard gives wrong gradients on an unconverted Llama too: FSDP2
    # does not support it.)
    for res in llama2:
        _trained_like_reference(res["reentrant"]["exact_rows"], atol=LLAMA_ATOL)  # every row read
        r = res["reentrant"]
        assert r["drawn"] < r["rows"] and r["forwards"] == [False, True], r  # rows drawn; forward, then recomputed
        # attention dropout, rows drawn: the checkpointed step is the unchecked one (measured: 0 and 0; before
        # the no-grad forward drew its rows, 3e-2 on the gradients, 6e-3 on the loss)
        assert r["keys_equal"] and r["loss_gap"] <= 1e-6 and r["grad_gap"] <= 1e-6, r


def test_coupled_neighbours_recompute_and_no_reshard(llama2):
    # neighbour gradients land in the neighbours' sharded gradients; recompute=True replays the synthesis
    for res in llama2:
        _trained_like_reference(res["coupled"], atol=LLAMA_ATOL)
        # the sampled default under recompute=True (checkpointing inside the block: a gather per read)
        _trained_like_reference(res["recompute_sampled"], atol=LLAMA_ATOL)


def test_mixed_precision_keeps_the_scalars_fp32(llama2):
    res = llama2[0]["bf16"]
    assert res["loss_gap"] < 2e-3  # bf16 compute against the fp32 run
    assert res["scalar_dtypes"] == {"torch.float32"}  # sharded scalars and their AdamW state


def test_dcp_resume_and_merge_from_a_gathered_checkpoint(llama2):
    res = llama2[0]["dcp"]
    assert res["resume_equal"]
    assert "model.layers.1.replacement.a" in res["sharded_keys"]
    assert not any(k.startswith("model.layers.1.mlp") for k in res["sharded_keys"])  # synthesized: not saved
    for how in ("gathered", "dcp_to_torch_save"):
        assert res[f"merged_plain_{how}"]
        assert res[f"merge_gap_{how}"] <= 1e-5, how


def test_accelerate_fsdp2_auto_wrap(llama2):
    res = llama2[0]["accelerate"]
    _trained_like_reference(res, atol=LLAMA_ATOL)
    assert res["wrapped"] == ["FSDPLlamaDecoderLayer"] * 6


def test_fsdp_private_state_is_where_replace_wrap_reads_it(llama2):
    # a torch release that moves one of the FSDP2 internals listed in fsdp_state.PRIVATE_API fails here
    assert llama2[0]["compat"] == "ok"


def test_trainer_fsdp_args_on_cpu_fall_back_to_ddp(llama2):
    # What stops HF Trainer(fsdp=...) from sharding here: Accelerate enables FSDP only on accelerators. The
    # Trainer then trains the converted model with DDP (docs/distributed.md). If this starts to say FSDP, the
    # Trainer path can be tested on the CPU: extend test_accelerate_fsdp2_auto_wrap to it.
    res = llama2[0]["trainer"]
    assert res["distributed_type"] == "DistributedType.MULTI_CPU" and res["wrapped"] == "DistributedDataParallel"
    assert torch.isfinite(torch.tensor(res["loss"]))


def test_read_between_steps_is_a_sharded_dtensor(llama2):
    res = llama2[0]["outside_read"]
    assert res["is_dtensor"] and res["gap"] <= 1e-6


def test_bad_input_names_the_fix_and_leaves_the_model(llama2):
    err = llama2[0]["errors"]
    assert err["unconverted"].startswith("NotConvertedError") and err["unconverted_unchanged"]
    assert err["convert_sharded"].startswith("ConfigError: cannot convert") and "Convert the unsharded model first" in err["convert_sharded"]
    assert "got a 3-D DeviceMesh" in err["bad_mesh_3d"] and "got ProcessGroup" in err["bad_mesh_group"]
    assert err["bad_mesh_unchanged"]
    assert "already sharded" in err["twice"]
    assert err["merge_sharded"].startswith("MergeError") and "full_state_dict=True" in err["merge_sharded"]
    assert err["merge_unchanged"]
    # FSDP1 wraps: the errors name it (they said FSDP2, and that the scalars were in no FSDP unit)
    assert err["fsdp1_forward"].startswith("ConfigError") and "wrapped by FSDP1" in err["fsdp1_forward"]
    assert "replace_wrap.shard(model, mesh=...)" in err["fsdp1_forward"] and "FSDP2" not in err["fsdp1_merge"]
    assert err["fsdp1_merge"].startswith("MergeError: cannot merge FullyShardedDataParallel: it is sharded with FSDP1")
    assert err["fsdp1_convert"].startswith("ConfigError: cannot convert") and "already sharded with FSDP1" in err["fsdp1_convert"]


# --- world 4: timm ViT, HSDP, a shape-adapting CNN, DDP ---------------------------------------------------------


@pytest.mark.timeout(300)
def test_vit_per_block_loop_at_world_4(vit4):
    world = len(vit4)
    for res in vit4:
        _trained_like_reference(res["loop"])
        assert res["loop"]["peak"] <= res["root_bytes"] + 3 * res["block_bytes"]
        assert res["loop"]["local"]["params"] <= 1.1 * res["converted_bytes"] / world
    assert sum(r["loop"]["local"]["params"] for r in vit4) == vit4[0]["converted_bytes"]


def test_hsdp_replicas_of_shards(vit4):
    if len(vit4) < 4:
        pytest.skip("HSDP needs 2 x 2 ranks")
    for res in vit4:
        _trained_like_reference(res["hsdp"])
        _trained_like_reference(res["hsdp_llama"], atol=LLAMA_ATOL)
        # rank 0 alone reads a weight outside its layer: its shard group and the other replica reduce it too
        r = res["hsdp_dense_read"]
        for name, e in r["sharded"].items():
            assert (e - r["exact"][name]).abs().item() <= 1e-5 * r["exact"][name].abs().item() + 1e-8, (name, e, r["exact"])
    assert len({res["hsdp_dense_read"]["reduced"] for res in vit4}) == 1


def test_shape_adapted_blocks_gather_their_neighbours(vit4):
    assert vit4[0]["cnn_adapted"]
    for res in vit4:
        _trained_like_reference(res["cnn"], atol=1e-5)
    # convolutions keep the exact scalar gradient under sharding, and say so (once a process)
    said = [n for n in vit4[0]["cnn"]["notes"] if "under FSDP2" in n]
    assert len(said) == 1 and "kernel 'conv' has no estimator for sharded neighbours" in said[0], said
    assert "ab_grad_sample='auto' does not apply" in said[0]


def test_ddp_at_world_4_without_find_unused_parameters(vit4):
    for res in vit4:
        _trained_like_reference(res["ddp"])


# --- no process group needed ------------------------------------------------------------------------------------


def test_fsdp_units_are_one_per_block():
    model = replace_wrap.convert(ResidualMLP(depth=6), every=2)
    assert replace_wrap.fsdp_units(model) == [(f"blocks.{i}",) for i in range(6)]
    with pytest.raises(replace_wrap.NotConvertedError):
        replace_wrap.fsdp_units(ResidualMLP())


def test_shard_refuses_bad_input_before_sharding():
    model = ResidualMLP()
    with pytest.raises(replace_wrap.NotConvertedError, match="replace_wrap.convert"):
        replace_wrap.shard(model)
    replace_wrap.convert(model, every=2)
    with pytest.raises(replace_wrap.ConfigError, match="needs a 1-D DeviceMesh .* got int"):
        replace_wrap.shard(model, mesh=2)
    assert not any(hasattr(p, "full_tensor") for p in model.parameters())


def test_replaced_blocks_carry_the_hooks_until_merge():
    model = replace_wrap.convert(ResidualMLP(depth=5), every=2)
    blocks = [model.blocks[i] for i in (1, 3)]
    assert all(len(b._forward_pre_hooks) == 1 and len(b._forward_hooks) == 1 for b in blocks)
    replace_wrap.merge(model)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in blocks)


def _llama_70b_meta() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                   num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg)


def test_a_70b_shaped_llama_converts_and_plans_on_meta_in_seconds():
    model = _llama_70b_meta()
    start = time.perf_counter()
    replace_wrap.convert(model, every=2)
    plan8 = replace_wrap.fsdp_memory(model, 8, param_dtype=torch.bfloat16)
    assert time.perf_counter() - start < 20
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    # the oracle: the Llama-3-70B shapes by hand
    h, f, v, kv = 8192, 28672, 128256, 1024
    block = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    root = 2 * v * h + h
    replaced = len(range(1, 79, 2))
    assert replaced == len(replace_wrap.report(model).replaced) == 39
    trainable = root + (80 - replaced) * block + replaced * 2  # the scalars a, b of each replaced block
    assert sum(p.numel() for p in model.parameters()) == trainable
    # 8 ranks: every row count above divides by 8, so the shards are exact eighths (scalars: one row on rank 0)
    assert plan8.params == 4 * (root + (80 - replaced) * block) // 8 + 4 * 2 * replaced
    assert plan8.optimizer == 2 * plan8.grads == 2 * plan8.params
    assert plan8.root == 2 * root  # bf16, unsharded
    assert plan8.largest_unit == 2 * block + 2 * (8 * 2)  # a replaced block: its tensors and a, b (padded to 8)
    assert plan8.unsharded_peak == plan8.root + 2 * plan8.largest_unit  # prefetch=1


def test_tensor_parallel_neighbours_are_refused_by_name():
    # parallelize_module after convert makes the neighbours DTensors outside FSDP2: the synthesis cannot mix them
    # with the block's scalars (DTensor raised "got mixed torch.Tensor and DTensor"); the error names the layer,
    # the neighbour tensor and the way out, in both layouts (every block parallelized, or the neighbours only)
    proc = run_python("-c", _TENSOR_PARALLEL, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert line.startswith("CompatibilityError: this replaced Linear (a layer of the block between 'blocks.0' "
                               "and 'blocks.2') synthesizes"), line
        assert "which is a DTensor outside FSDP2" in line and "replace_wrap.merge(model) first" in line, line


_TENSOR_PARALLEL = """
import torch, torch.nn as nn, torch.distributed as dist, replace_wrap
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import parallelize_module, ColwiseParallel, RowwiseParallel
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))
mesh = init_device_mesh("cpu", (2,))
for which in ("all", "neighbours"):
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.Sequential(*[Block() for _ in range(5)])
    replace_wrap.convert(model, every=2)
    try:  # parallelizing a replaced block reads its synthesized tensors already
        for i, b in enumerate(model.blocks):
            if which == "all" or i % 2 == 0:
                parallelize_module(b, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        model.blocks(torch.randn(4, 8))
        print("no error")
    except replace_wrap.ReplaceWrapError as e:
        print(f"{type(e).__name__}: {e}")
"""


def test_fsdp2_ignored_params_are_no_fsdp1_and_fsdp1_is_refused_in_both_layouts():
    # FSDP2 keeps the managed flag on a module whose parameters are all in ignored_params when it has buffers (a
    # BatchNorm): the FSDP1 check read that as FSDP1 and refused the forward. FSDP1 itself, with or without
    # use_orig_params, one unit or one per block, is still refused by name.
    proc = run_python("-c", _IGNORED_AND_FSDP1, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "fsdp2 ignored_params: True", proc.stdout
    assert len(lines) == 5 and all(line.startswith("fsdp1: ConfigError: the neighbours of a replaced block ('0', "
                                                   "'2') are wrapped by FSDP1") for line in lines[1:]), proc.stdout


_IGNORED_AND_FSDP1 = """
import tempfile, copy, torch, torch.distributed as dist, warnings
warnings.filterwarnings("ignore")
from torch import nn
import replace_wrap
from torch.distributed.fsdp import fully_shard, FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.device_mesh import init_device_mesh
dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)
    def forward(self, x):
        return x + self.bn(self.fc(x))
def model():
    torch.manual_seed(0)
    m = replace_wrap.convert(nn.Sequential(*[Block() for _ in range(5)]).eval(), every=2)
    with torch.no_grad():
        m[1].replacement.a.fill_(0.3)
    return m
x = torch.randn(4, 8)
m = model(); y = m(x)
ignored = {p for b in m for p in b.bn.parameters()}  # FSDP2 keeps the norms' parameters out of its units
for b in m:
    fully_shard(b, mesh=mesh, ignored_params=ignored)
fully_shard(m, mesh=mesh, ignored_params=ignored)
with torch.no_grad():
    print("fsdp2 ignored_params:", torch.equal(m(x), y))
for wrap in (None, ModuleWrapPolicy({Block})):
    for uop in (False, True):
        try:
            FullyShardedDataParallel(model(), auto_wrap_policy=wrap, use_orig_params=uop, device_id=torch.device("cpu"))(x)
            print("fsdp1: no error")
        except replace_wrap.ReplaceWrapError as e:
            print(f"fsdp1: {type(e).__name__}: {str(e)[:90]}")
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_memory_formula_matches_fsdp_layout_at_64_ranks():
    # FSDP2 itself on the meta model over a fake process group of 64 ranks: rank 0's shards add up to the formula
    proc = run_python("-c", _FAKE_64, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("True True"), proc.stdout


_FAKE_64 = """
import torch, torch.distributed as dist, replace_wrap, transformers
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.distributed.device_mesh import init_device_mesh
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=64)
cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                               num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
out = []
for convert in (False, True):
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(cfg)
    if convert:
        replace_wrap.convert(m, every=2)
    plan = replace_wrap.fsdp_memory(m, 64)
    from torch.distributed.fsdp import fully_shard
    for b in m.model.layers:
        fully_shard(b, mesh=init_device_mesh("cpu", (64,)))
    fully_shard(m, mesh=init_device_mesh("cpu", (64,)))
    out.append(sum(p.to_local().numel() * p.element_size() for p in m.parameters()) == plan.params)
print(*out)
"""
