"""Error paths of convert / merge / revert / report, with their message text, and atomicity."""

from __future__ import annotations

import warnings

import pytest
import torch

import replace_wrap
from replace_wrap.surgery import swap as hooks
from conftest import assert_same_state, state_snapshot
from toys import ConvNet, ResidualMLP


def sites(model):
    return [m for m in model.modules() if isinstance(m, replace_wrap.ReplacementSite)]


def test_converting_twice_raises():
    model = replace_wrap.convert(ResidualMLP())
    with pytest.raises(replace_wrap.AlreadyConvertedError, match=r"ResidualMLP is already converted \(replaced block at 'blocks.1'\)"):
        replace_wrap.convert(model)
    with pytest.raises(replace_wrap.AlreadyConvertedError):
        replace_wrap.plan(model)
    # a converted submodule inside a bigger model is noticed too
    outer = torch.nn.Sequential(model)
    with pytest.raises(replace_wrap.AlreadyConvertedError, match="already converted"):
        replace_wrap.convert(outer)


def test_operations_on_unconverted_models():
    model = ResidualMLP()
    with pytest.raises(replace_wrap.NotConvertedError, match=r"cannot merge ResidualMLP: it has no replaced blocks"):
        replace_wrap.merge(model)
    with pytest.raises(replace_wrap.NotConvertedError, match=r"cannot revert ResidualMLP"):
        replace_wrap.revert(model)
    with pytest.raises(replace_wrap.NotConvertedError, match=r"replace_wrap.plan\(model\) to preview"):
        replace_wrap.report(model)


def test_revert_needs_keep_original():
    model = replace_wrap.convert(ResidualMLP())
    with pytest.raises(replace_wrap.MergeError, match=r"cannot revert block 'blocks.1': it was converted without keep_original=True"):
        replace_wrap.revert(model)
    assert len(sites(model)) == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_merge_refuses_non_finite_and_leaves_model_unchanged(value):
    model = replace_wrap.convert(ResidualMLP(depth=6))
    with torch.no_grad():
        model.blocks[3].replacement.a.fill_(value)
    before = state_snapshot(model)
    with pytest.raises(replace_wrap.MergeError, match=r"synthesized tensor '.*' of block 'blocks.3' is not finite"):
        replace_wrap.merge(model)
    assert_same_state(before, state_snapshot(model))
    assert len(sites(model)) == 2  # block 1 (finite) was not merged either: merge is all or nothing


def test_nothing_to_replace_no_stack():
    with pytest.raises(replace_wrap.NothingToReplaceError, match="no stack of repeated blocks was found") as info:
        replace_wrap.convert(torch.nn.Linear(3, 3))
    assert info.value.report.blocks == []


def test_nothing_to_replace_names_one_block_object_repeated():
    """A universal-transformer stack (one block object at every position) shares all its tensors: the error
    names the repeat, not only the missing stack, and leaves the model as it was."""
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    act = torch.nn.ReLU()  # a reused module without parameters is no repeated block
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), act, torch.nn.ModuleList([block] * 6), act)
    before = state_snapshot(model)
    with pytest.raises(replace_wrap.NothingToReplaceError,
                       match=r"no stack of repeated blocks was found .*; '2\.0' and '2\.1' are one module object"):
        replace_wrap.convert(model)
    assert_same_state(before, state_snapshot(model))
    assert all(m is block for m in model[2])


def test_report_of_a_wrapper_rebuilt_from_the_children_names_the_blocks_it_holds():
    # a wrapper that re-registers a converted model's children (timm's FeatureListNet does) holds the replaced
    # blocks but not the converted root, which keeps the report: the error says so (it said "not converted")
    model = replace_wrap.convert(ResidualMLP(), every=2)
    wrapper = torch.nn.Module()
    for name, child in model.named_children():
        wrapper.add_module(name, child)
    with pytest.raises(replace_wrap.NotConvertedError, match=r"Module holds replaced blocks \('blocks.1', 'blocks.3'\) "
                       r"but not the module replace_wrap.convert was called on"):
        replace_wrap.report(wrapper)
    with pytest.raises(replace_wrap.NotConvertedError, match="has no conversion report: it was not converted"):
        replace_wrap.report(ResidualMLP())


def test_nothing_to_replace_short_stack():
    model = ResidualMLP(depth=2)
    with pytest.raises(replace_wrap.NothingToReplaceError, match=r"every stack is shorter than 3 blocks \('blocks.\*' \(2 blocks\)\)"):
        replace_wrap.convert(model)


def test_nothing_to_replace_all_skipped_names_the_reason():
    # widths 4, 4, 8, 8: the block at index 1 has a neighbour of another shape, and shapes must match exactly
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)
    )
    with pytest.raises(replace_wrap.NothingToReplaceError) as info:
        replace_wrap.convert(model, every=2, adapt_shapes=False)
    msg = str(info.value)
    assert "every selected block had to be skipped: 1: tensor 'weight' of shape (4, 4) has shape (8, 4) in the next block '2'" in msg
    assert "replace_wrap.plan(model)" in msg
    assert [b.status for b in info.value.report.blocks] == ["kept", "skipped", "kept", "kept"]


def test_not_a_module():
    with pytest.raises(replace_wrap.ConfigError, match="works on torch.nn.Module instances, got dict"):
        replace_wrap.convert({})


@pytest.mark.parametrize("fail_at", [1, 2, 5])
def test_failure_half_way_leaves_model_exactly_as_it_was(monkeypatch, fail_at):
    model = ConvNet(depth=7)
    before = state_snapshot(model)
    calls = {"n": 0}
    real_install = hooks.install

    def flaky_install(leaf, sources):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("injected failure")
        real_install(leaf, sources)

    monkeypatch.setattr(hooks, "install", flaky_install)
    with pytest.raises(RuntimeError, match="injected failure"):
        replace_wrap.convert(model, every=2)
    assert_same_state(before, state_snapshot(model))
    assert not sites(model) and "_replace_wrap_report" not in model.__dict__
    monkeypatch.setattr(hooks, "install", real_install)
    replace_wrap.convert(model, every=2)  # and it still converts afterwards
    assert len(sites(model)) == 3


def test_block_with_attribute_named_replacement_is_skipped():
    model = ResidualMLP(depth=5)
    model.blocks[1].replacement = "taken"
    rep = replace_wrap.plan(model)
    assert rep.blocks[1].status == "skipped"
    assert rep.blocks[1].reason == "the block already has an attribute 'replacement'"


def test_errors_share_a_base_class():
    for name in replace_wrap.errors.__all__:
        assert issubclass(getattr(replace_wrap, name), replace_wrap.ReplaceWrapError)


def test_convert_logs_its_summary_and_warns_about_skipped_blocks(caplog):
    """Nothing changes silently (issue 11, defect 9): the summary is logged, skipped blocks are a warning."""
    import logging

    from toys import ResidualMLPBlock

    model = ResidualMLP(depth=6)
    wide = ResidualMLPBlock(16)
    wide.fc1, wide.fc2 = torch.nn.Linear(16, 48), torch.nn.Linear(48, 16)  # another hidden width
    model.blocks[4] = wide
    with caplog.at_level(logging.INFO, logger="replace_wrap"):
        replace_wrap.convert(model, policy=replace_wrap.Indices([1, 3]), adapt_shapes=False)
    info = [r for r in caplog.records if r.levelno == logging.INFO]
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 of 6 blocks replaced" in r.getMessage() for r in info)
    assert len(warn) == 1 and "blocks.3" in warn[0].getMessage() and "could not be replaced" in warn[0].getMessage()


def test_recompute_with_batch_norm_warns_about_running_statistics():
    from toys import ConvNet

    with pytest.warns(UserWarning, match=r"running statistics in both passes.*recompute=False"):
        replace_wrap.convert(ConvNet(), every=2, recompute=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replace_wrap.convert(ConvNet(), every=2)  # no recompute: nothing to warn about


def _scalars_moved(model):
    with torch.no_grad():
        for s in sites(model):
            s.a.fill_(0.7), s.b.fill_(0.4)
    return model


@pytest.mark.parametrize("change", ["block swapped in", "layer quantized in place", "stack truncated"])
def test_a_neighbour_module_replaced_after_convert_is_refused_at_save_and_merge_keeps_what_the_model_computes(change):
    torch.manual_seed(0)
    model = _scalars_moved(replace_wrap.convert(ResidualMLP(), every=2))
    x = ResidualMLP.example()
    if change == "block swapped in":
        model.blocks[2] = ResidualMLP().blocks[2]  # another block where the replaced block 1's next neighbour was
    elif change == "stack truncated":  # as timm's prune_intermediate_layers does: block 1 keeps its neighbour 2
        model.blocks = model.blocks[:2]
        notes = replace_wrap.report(model).notes
        assert notes[-2:] == [
            "no longer in the model (removed after convert): blocks.2, blocks.3, blocks.4, blocks.5",
            "blocks.1 still synthesizes from blocks.2, which the model no longer holds or trains; state_dict() "
            "refuses: merge first (replace_wrap.merge(model)), or convert the changed model again"]
    else:
        torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, inplace=True)
    with torch.no_grad():
        out = model(x)
    # its replaced layers still read the layers they were converted with: a state dict would name the new ones
    with pytest.raises(replace_wrap.CompatibilityError, match=r"replaced layer 'blocks\.1\.\w+' .*'blocks\.2'\] .* "
                       r"no longer part of the model .* Merge first"):
        model.state_dict()
    merged = replace_wrap.merge(model)  # the plain model of what the converted one computes
    with torch.no_grad():
        torch.testing.assert_close(merged(x), out, rtol=0, atol=0)
    assert merged.state_dict().keys()  # and it saves


def test_a_parametrized_neighbour_layer_copies_with_its_model():
    # weight_norm computes the neighbour's weight on every read: the deep copy holds its layer, not that tensor
    torch.manual_seed(0)
    model = _scalars_moved(replace_wrap.convert(ResidualMLP(), every=2))
    torch.nn.utils.parametrizations.weight_norm(model.blocks[0].fc1)
    x = ResidualMLP.example()
    twin = __import__("copy").deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
        twin.blocks[0].fc1.parametrizations.weight.original0.mul_(2)  # the copy reads its own neighbour
        assert not torch.equal(twin(x), model(x))
    assert twin.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("tool", ["prune", "spectral_norm", "weight_norm"])
def test_a_neighbour_tensor_a_pre_hook_recomputes_is_refused_with_the_fix(tool):
    # prune and the legacy hook-based weight/spectral norms make the neighbour's weight a plain attribute that a
    # forward pre-hook refreshes before that neighbour's own forward; a replaced block reads it outside that
    # forward (next runs after it; merge and state_dict run none), so it computed with a stale value: after an
    # optimizer step two identical eval calls differed. Both paths (layer kernel, synthesized attribute) refuse.
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = _scalars_moved(replace_wrap.convert(ResidualMLP(), every=2))
    fc1 = model.blocks[2].fc1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy weight_norm's deprecation
        if tool == "prune":
            prune.l1_unstructured(fc1, "weight", amount=0.3)
        else:
            getattr(torch.nn.utils, tool)(fc1)
    msg = (r"block between 'blocks.0' and 'blocks.2' synthesizes 'fc1.weight' from blocks.2.fc1.weight, which is "
           r"no longer a parameter .* forward pre-hook .* parametrize-based versions .* merge first")
    x = ResidualMLP.example()
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(replace_wrap.CompatibilityError, match=msg):
            model(x)
    with pytest.raises(replace_wrap.CompatibilityError, match=msg):
        model.state_dict()
    def snapshot():  # state_dict() refuses: the tensors, their identity and the classes
        return ([(n, id(t), t.detach().clone()) for n, t in (*model.named_parameters(), *model.named_buffers())],
                [(n, type(m)) for n, m in model.named_modules()])

    before = snapshot()
    with pytest.raises(replace_wrap.CompatibilityError, match=msg):
        replace_wrap.merge(model)  # before anything changes
    after = snapshot()
    assert before[1] == after[1] and [t[:2] for t in before[0]] == [t[:2] for t in after[0]]
    assert all(torch.equal(u[2], v[2]) for u, v in zip(before[0], after[0]))
    if tool == "prune":
        prune.remove(fc1, "weight")  # the undo the message names: a parameter again, read fresh
        with torch.no_grad():
            y = model(x)
        torch.testing.assert_close(replace_wrap.merge(model)(x), y, rtol=0, atol=0)


def test_assigning_a_synthesized_tensor_is_refused_with_the_fix():
    model = _scalars_moved(replace_wrap.convert(ResidualMLP(), every=2))
    layer = model.blocks[1].fc1
    before = layer.weight.clone()
    for value in (torch.nn.Parameter(torch.zeros_like(before)), torch.zeros_like(before)):
        with pytest.raises(replace_wrap.CompatibilityError, match=r"'weight' of this replaced Linear \(a layer of the block between 'blocks.0' and 'blocks.2'\) is synthesized .* "
                           r"merge first \(replace_wrap.merge\(model\)\)"):
            layer.weight = value
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=0)
    layer.other = 3  # other names are set as usual
    assert layer.other == 3


def test_functional_call_with_a_state_dict_names_the_block_and_the_dict_to_pass():
    # functional_call assigns every tensor it is given, a state_dict()'s synthesized values too: the refusal
    # names the block and the parameters-and-buffers dict that works, and leaves the model as it was
    from torch.func import functional_call

    x = ResidualMLP.example()
    model = _scalars_moved(replace_wrap.convert(ResidualMLP(), every=2))
    other = _scalars_moved(replace_wrap.convert(ResidualMLP(), every=2))
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    before, y = state_snapshot(model), model(x)
    with pytest.raises(replace_wrap.CompatibilityError, match=r"\(a layer of the block between 'blocks.0' and "
                       r"'blocks.2'\) is synthesized .* give it the parameters and buffers"):
        functional_call(model, other.state_dict(), (x,))
    assert_same_state(before, state_snapshot(model))
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    tensors = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    torch.testing.assert_close(functional_call(model, tensors, (x,)), other(x), rtol=0, atol=0)


class _Packed(torch.Tensor):
    """Stands in for a quantized weight (torchao's Int8Tensor, ...): a tensor subclass that implements only the
    ops its quantized linear needs, so ``a * prev + b * next`` of it fails inside the subclass."""

    @staticmethod
    def __new__(cls, t):
        r = torch.Tensor._make_wrapper_subclass(cls, t.shape, dtype=t.dtype, device=t.device)
        r.inner = t
        return r

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:  # its own quantized linear
            x, w, *rest = args
            return torch.nn.functional.linear(x, w.inner, *rest, **(kwargs or {}))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return _Packed(args[0].inner)
        raise NotImplementedError(f"_Packed dispatch: attempting to run unimplemented operator {func}")


@pytest.mark.parametrize("grad", [True, False])
def test_a_neighbour_tensor_quantized_in_place_after_convert_is_refused_with_the_fix(grad):
    # torchao's quantize_ swaps no module: it assigns the layer a parameter of a tensor subclass. A replaced layer
    # reading it gave a raw NotImplementedError from inside the subclass (forward, state_dict, quantize_ itself).
    torch.manual_seed(0)
    model = _scalars_moved(replace_wrap.convert(ResidualMLP(), every=2))
    fc1 = model.blocks[0].fc1
    fc1.weight = torch.nn.Parameter(_Packed(fc1.weight.detach()), requires_grad=False)
    msg = (r"replaced Linear \(a layer of the block between 'blocks.0' and 'blocks.2'\) synthesizes 'fc1.weight' "
           r"from blocks.0.fc1.weight, which is now a _Packed .* quantize the merged model")
    with torch.set_grad_enabled(grad), pytest.raises(replace_wrap.CompatibilityError, match=msg) as info:
        model(ResidualMLP.example())  # the layer kernel (with gradients) and the generic path (without)
    assert isinstance(info.value.__cause__, NotImplementedError)
    with pytest.raises(replace_wrap.CompatibilityError, match=msg):
        model.state_dict()
    with pytest.raises(replace_wrap.CompatibilityError, match=msg):
        model.blocks[1].fc1.weight


def test_torchao_quantize_of_a_converted_model_is_refused_with_the_fix():
    torchao = pytest.importorskip("torchao.quantization")
    for skip_replaced in (False, True):
        model = _scalars_moved(replace_wrap.convert(ResidualMLP(), every=2))
        only_kept = {"filter_fn": lambda m, fqn: isinstance(m, torch.nn.Linear) and not hooks.is_swapped(m)}
        with pytest.raises(replace_wrap.CompatibilityError, match=r"which is now a \w+ .* quantize the merged model"):
            torchao.quantize_(model, torchao.Int8WeightOnlyConfig(), **(only_kept if skip_replaced else {}))
            model(ResidualMLP.example())


def test_torch_jit_script_of_a_converted_model_is_refused_with_the_fix_and_the_model_unchanged():
    # TorchScript cannot compile the synthesizing properties: refused before compiling anything, not a raw
    # RuntimeError from inside the compiler; the merged model scripts and computes the same
    torch.manual_seed(0)
    model = _scalars_moved(replace_wrap.convert(ResidualMLP(), every=2)).eval()
    x = ResidualMLP.example()
    with torch.no_grad():
        out = model(x)
    before = state_snapshot(model)
    fix = r"replace_wrap\.merge\(model\) first .* torch\.jit\.trace, torch\.export or torch\.compile"
    for target in (model, model.blocks[1], model.blocks[1].fc1):
        with pytest.raises(replace_wrap.CompatibilityError, match=r"torch\.jit\.script cannot compile a converted "
                           r"model: the replaced block between 'blocks\.0' and 'blocks\.2' synthesizes .* " + fix):
            torch.jit.script(target)
    assert_same_state(before, state_snapshot(model))
    scripted = torch.jit.script(replace_wrap.merge(model))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), out, rtol=0, atol=0)


def _tensors_and_classes(model):
    # state_dict() is what is refused, so the snapshot reads parameters, buffers and classes directly
    return ([(n, id(t), t.detach().clone()) for n, t in (*model.named_parameters(), *model.named_buffers())],
            [(n, type(m)) for n, m in model.named_modules()])


@pytest.mark.parametrize("change", ["swapped", "deleted"])
def test_a_layer_of_a_replaced_block_changed_after_convert_is_refused_at_save_and_merge(change, tmp_path):
    # module surgery inside a replaced block (timm's reparameterize_model deletes its layers, freeze_batch_norm_2d
    # swaps its norms): the state dict and merge cannot describe the block any more; refused, typed, nothing changed
    torch.manual_seed(0)
    model = _scalars_moved(replace_wrap.convert(ResidualMLP(), every=2))
    block = model.blocks[1]
    if change == "swapped":  # a plain LayerNorm holding the synthesized values, as a fused or frozen copy would
        norm = torch.nn.LayerNorm(16)
        norm.load_state_dict({"weight": block.norm.weight.detach(), "bias": block.norm.bias.detach()})
        block.norm = norm
        what = r"the layer is now a LayerNorm that does not synthesize it"
    else:
        del block.norm
        what = r"the layer was deleted"
    before = _tensors_and_classes(model)
    message = (r"the replaced block between 'blocks\.0' and 'blocks\.2' no longer holds the layer that synthesizes "
               r"'norm\.weight': " + what + r" .* after replace_wrap\.merge\(model\)")
    for action in (model.state_dict, lambda: replace_wrap.merge(model), lambda: replace_wrap.save(model, tmp_path)):
        with pytest.raises(replace_wrap.CompatibilityError, match=message):
            action()
        after = _tensors_and_classes(model)
        assert [n for n, *_ in after[0]] == [n for n, *_ in before[0]] and after[1] == before[1]
        for (_, i, t), (_, j, u) in zip(before[0], after[0]):
            assert i == j and torch.equal(t, u)
