"""Shape-adapting fusion end to end: which tensors are adapted or stay own, settings of the replaced block kept,
the same-shape path untouched, the adapt_shapes option."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import replace_wrap
from conftest import TOL, oracle_model
from replace_wrap.surgery import swap as hooks
from toys import ResidualMLP, StagedCNN, StageBlock


def _projecting_stack() -> nn.Sequential:
    # block 1 projects (6 -> 8, stride 2) like block 0 (4 -> 6) but unlike block 2: one side of proj is absent
    return nn.Sequential(StageBlock(4, 6), StageBlock(6, 8, stride=2), StageBlock(8, 8), StageBlock(8, 8))


def _check_against_oracle(original: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        for site in (m for m in model.modules() if isinstance(m, replace_wrap.ReplacementSite)):
            site.a.fill_(0.7), site.b.fill_(-0.4)
    oracle = oracle_model(original, model)
    model.eval(), oracle.eval()
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(y, oracle(x), atol=TOL["oracle"], rtol=1e-5)
        replace_wrap.merge(model)
        assert (model(x) - y).abs().max().item() <= TOL["merge"]


def test_tensor_without_counterpart_stays_own_and_stride_is_the_blocks():
    """The strided, projecting first block of stage 2 is replaced; its projection has no counterpart."""
    model = StagedCNN()
    original = copy.deepcopy(model)
    before = sum(p.numel() for p in model.parameters())
    replace_wrap.convert(model, policy=replace_wrap.Indices([2]))
    (b,) = replace_wrap.report(model).replaced
    assert (b.path, b.prev, b.next) == ("stages.1.0", "stages.0.1", "stages.1.1")
    kept = dict(b.kept_tensors)
    assert set(kept) == {"proj.weight", "proj.bias"}
    assert kept["proj.weight"].startswith("no usable counterpart in either neighbour")
    assert "previous block 'stages.0.1': no counterpart" in kept["proj.weight"]
    assert "1 kept as its own" not in b.reason and "2 kept as its own" in b.reason
    block = model.stages[1][0]
    # the kept tensors are ordinary trainable parameters of the model; the fused ones are not
    names = dict(model.named_parameters())
    assert names["stages.1.0.proj.weight"] is block.proj.weight and block.proj.weight.requires_grad
    assert "stages.1.0.conv1.weight" not in names
    fused = sum(original.get_parameter(f"stages.1.0.{rel}").numel() for rel in b.synthesized)
    assert sum(p.numel() for p in model.parameters()) == before - fused + 2
    adapted = dict(b.adapted)
    assert adapted["conv1.weight"] == "prev: zero-pad dim 0 4->8; next: slice dim 1 8->4"
    assert adapted["bn1.weight"] == "prev: zero-pad dim 0 4->8; next: as is"
    # the stride is the replaced block's own: 12x12 -> 6x6, although both neighbours have stride 1
    assert block.conv1.stride == (2, 2) and block.proj.stride == (2, 2)
    seen = []
    block.register_forward_hook(lambda m, i, o: seen.append(o.shape) and None)
    _check_against_oracle(original, model, StagedCNN.example())
    assert seen[0][-2:] == (6, 6)


def test_absent_side_contributes_zeros():
    model = _projecting_stack()
    original = copy.deepcopy(model)
    replace_wrap.convert(model, policy=replace_wrap.Indices([1]))
    (b,) = replace_wrap.report(model).replaced
    assert not b.kept_tensors
    assert dict(b.adapted)["proj.weight"] == "prev: zero-pad dim 0 6->8, zero-pad dim 1 4->6; next: absent: zeros"
    with torch.no_grad():
        model[1].replacement.a.fill_(0.0)
        # with a = 0 only the next side counts, and it has no projection: the synthesized projection is zero
        assert torch.count_nonzero(model[1].proj.weight) == 0
    _check_against_oracle(original, model, torch.randn(2, 4, 8, 8))


def test_kernel_size_change_is_centred():
    model = StagedCNN()
    replace_wrap.convert(model, policy=replace_wrap.Indices([3]))
    block = model.stages[1][1]  # 8 channels, 3x3 kernels; next block (stage 3) has 5x5 kernels
    nxt = model.stages[2][0]
    with torch.no_grad():
        block.replacement.a.fill_(0.0), block.replacement.b.fill_(1.0)
        w = block.conv2.weight  # (8, 8, 3, 3) from next's (6, 6, 5, 5): first 6 channels, centre 3x3
        assert torch.equal(w[:6, :6], nxt.conv2.weight[:, :, 1:4, 1:4])
        assert torch.count_nonzero(w[6:]) == 0 and torch.count_nonzero(w[:, 6:]) == 0
    assert dict(replace_wrap.report(model).replaced[0].adapted)["conv2.weight"] == (
        "prev: as is; next: zero-pad dims 0,1 6->8, crop dims 2,3 5->3 centred"
    )


def test_same_shape_path_calls_no_adapter(monkeypatch):
    calls = []
    real = hooks.adapt_pair
    monkeypatch.setattr(hooks, "adapt_pair", lambda *a: calls.append(1) or real(*a))
    mlp = replace_wrap.convert(ResidualMLP(depth=5), every=2)
    mlp(ResidualMLP.example()).sum().backward()
    assert not calls and not any(b.adapted for b in replace_wrap.report(mlp).replaced)
    cnn = replace_wrap.convert(StagedCNN(), every=2)
    cnn(StagedCNN.example())
    assert calls


def test_adapt_shapes_false_skips_blocks_with_other_shapes():
    model = StagedCNN()
    rep = replace_wrap.plan(model, every=2, adapt_shapes=False)
    assert not rep.replaced
    reasons = [b.reason for b in rep.skipped]
    assert reasons[0] == (
        "tensor 'conv1.weight' of shape (4, 4, 3, 3) has shape (8, 4, 3, 3) in the next block 'stages.1.0'"
    )
    with pytest.raises(replace_wrap.NothingToReplaceError, match="every selected block had to be skipped"):
        replace_wrap.convert(model, every=2, adapt_shapes=False)
    # the same model with adaptation (the default)
    assert len(replace_wrap.plan(model, every=2).replaced) == 2


def test_adapt_shapes_option_is_validated_and_round_trips():
    with pytest.raises(replace_wrap.ConfigError, match="adapt_shapes must be True or False, got 'yes'"):
        replace_wrap.ReplaceConfig(adapt_shapes="yes")
    cfg = replace_wrap.ReplaceConfig(adapt_shapes=False, rule="convex")
    assert replace_wrap.ReplaceConfig.from_dict(cfg.to_dict()) == cfg
    assert replace_wrap.ReplaceConfig().adapt_shapes is True


def test_report_table_names_adapted_and_own_tensors():
    rep = replace_wrap.plan(StagedCNN(), policy=replace_wrap.Indices([2]))
    text = str(rep)
    assert "shape-adapted" in text and "kept as its own (proj.weight: no usable counterpart" in text
    d = rep.to_dict()["blocks"][2]
    assert d["adapted"][0][0] == "conv1.weight" and d["kept_tensors"][0][0] == "proj.weight"


def test_swin_shifted_window_blocks_keep_their_shift():
    """Replaced Swin blocks alternate shifted / plain windows with their neighbours; each keeps its own."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=112, embed_dim=24, depths=(2, 4),
        num_heads=(2, 4), num_classes=3,
    )
    shifts = {n: copy.copy(m.shift_size) for n, m in model.named_modules() if hasattr(m, "shift_size")}
    original = copy.deepcopy(model)
    replace_wrap.convert(model, every=2)
    rep = replace_wrap.report(model)
    assert len(rep.replaced) >= 2
    for b in rep.replaced:
        mine = model.get_submodule(b.path).shift_size
        assert mine == shifts[b.path] and mine != model.get_submodule(b.prev).shift_size
    _check_against_oracle(original, model, torch.randn(2, 3, 112, 112))


@pytest.mark.parametrize("coupled", [False, True], ids=["detached", "coupled"])
def test_adapted_neighbours_are_remade_in_the_backward_not_kept(coupled):
    # Zero-padded neighbours and an absent side's zeros are weight-sized copies. Detached, the layer kernels
    # keep the neighbours' own tensors (held by their blocks anyway) and remake the copies in the backward:
    # nothing weight-sized outlives the forward. Gradients equal the generic path's, with and without it.
    x = torch.randn(2, 4, 8, 8)
    grads, saved_shapes = {}, {}
    for fast in (True, False):
        torch.manual_seed(0)
        model = _projecting_stack()
        replace_wrap.convert(model, policy=replace_wrap.Indices([1]), ab_grad_sample="exact", fast_path=fast,
                             neighbour_grad="coupled" if coupled else "detached")
        with torch.no_grad():
            model[1].replacement.a.fill_(0.7), model[1].replacement.b.fill_(-0.4)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        shapes = []

        def pack(t, shapes=shapes, params=params):
            if t.untyped_storage().data_ptr() not in params:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).square().mean()
        loss.backward()
        grads[fast] = {n: p.grad.clone() for n, p in model.named_parameters()}
        saved_shapes[fast] = shapes
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-6, msg=name)
    weights = {(8, 6, 3, 3), (8, 8, 3, 3), (8, 6, 1, 1)}  # conv1, conv2, proj of the replaced block
    kept = weights & set(saved_shapes[True])
    assert kept == (weights if coupled else set())  # coupled: autograd needs the copies for the neighbours


def test_fast_path_reads_a_parametrized_adapted_neighbour_once_per_forward():
    # A parametrized weight is computed on every read (spectral_norm even advances its power iteration), so
    # the layer kernel reads the adapted neighbour's tensor once, as the generic path does, and remakes the
    # adapted copy in the backward from that one read.
    from torch.nn.utils import parametrize

    class Counted(nn.Module):
        calls = 0

        def forward(self, w):
            Counted.calls += 1
            return w * 1.0

    x = torch.randn(2, 4, 8, 8)
    counts = {}
    for fast in (True, False):
        torch.manual_seed(0)
        model = _projecting_stack()
        replace_wrap.convert(model, policy=replace_wrap.Indices([1]), fast_path=fast)
        assert dict(replace_wrap.report(model).replaced[0].adapted)["conv1.weight"].startswith("prev: zero-pad")
        # after convert (a parametrized tensor is no counterpart at convert time): block 1's previous side
        parametrize.register_parametrization(model[0].conv1, "weight", Counted())
        Counted.calls = 0
        model(x).square().mean().backward()
        counts[fast] = Counted.calls
    assert counts[True] == counts[False] == 2  # the neighbour's own forward and the replaced block's synthesis
