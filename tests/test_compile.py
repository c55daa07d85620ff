"""torch.compile of converted models: no graph breaks, no recompiles while training, inductor matches eager."""

from __future__ import annotations

import pytest
import torch

import replace_wrap
from conftest import TOL
from toys import ConvNet, ResidualMLP, logits, tiny_hf_vit, tiny_timm_vit




MODELS = {
    "mlp": (ResidualMLP, ResidualMLP.example),
    "conv_bn": (ConvNet, ConvNet.example),
    "timm_vit": (lambda: tiny_timm_vit(3), lambda: torch.randn(2, 3, 16, 16)),
    "hf_vit": (lambda: tiny_hf_vit(3), lambda: torch.randn(2, 3, 16, 16)),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_model_compiles_to_one_graph(name):
    factory, example = MODELS[name]
    model = replace_wrap.convert(factory(), every=2).eval()
    explained = torch._dynamo.explain(model)(example())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("name", ["hf_vit"])
def test_compiled_training_matches_eager_without_recompiling(name):
    from torch._dynamo.testing import CompileCounterWithBackend

    factory, example = MODELS[name]
    torch.manual_seed(0)
    eager = replace_wrap.convert(factory(), every=2).train()
    compiled_model = replace_wrap.convert(factory(), every=2).train()
    compiled_model.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend("aot_eager")  # AOTAutograd's forward+backward graphs, no codegen
    compiled = torch.compile(compiled_model, backend=counter)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    for _ in range(3):
        x = example()
        for m, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            logits(m(x)).square().mean().backward()
            opt.step()
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(p, q, atol=TOL["oracle"], rtol=1e-5, msg=n)
    assert counter.frame_count == 1  # optimizer steps on neighbours and scalars trigger no recompile


def test_inductor_matches_eager():
    # The slowest test of this file: inductor compiles C++ kernels (about 30-40 s on 2 cores, cold cache).
    model = replace_wrap.convert(tiny_hf_vit(3), every=2).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, replace_wrap.ReplacementSite):
                m.a.fill_(0.3), m.b.fill_(0.9)
    x = torch.randn(2, 3, 16, 16)
    import torch._inductor.config as inductor_config

    with inductor_config.patch(compile_threads=1), torch.no_grad():  # a worker pool only costs on 2 cores
        got = torch.compile(model)(pixel_values=x).logits
        want = model(pixel_values=x).logits
    torch.testing.assert_close(got, want, atol=TOL["oracle"], rtol=1e-5)


@pytest.mark.parametrize("name", ["timm_vit", "conv_bn"])
def test_sampled_default_trains_compiled_without_breaks_or_recompiles(name):
    """The default estimator samples rows / output positions inside the kernels; under torch.compile it must
    stay in one graph (no host read of the scalars while tracing), recompile never, and give eager's gradients:
    the compiled kernels draw from the same generator as eager mode, so the sampled scalars' too."""
    from torch._dynamo.testing import CompileCounterWithBackend

    factory, _ = MODELS[name]
    example = lambda: torch.randn(8, 3, 16, 16)  # noqa: E731  8 images: more units than "auto" keeps exact
    torch.manual_seed(0)
    eager = replace_wrap.convert(factory(), every=2).train()
    routes = [r.estimator for b in replace_wrap.report(eager).replaced for r in b.layers if not r.generic]
    assert routes and all(e.startswith("sampled") for e in routes)
    explained = torch._dynamo.explain(eager)(example())
    assert explained.graph_break_count == 0, explained.break_reasons
    model = replace_wrap.convert(factory(), every=2).train()
    model.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    x = example()
    for m in (eager, compiled):
        torch.manual_seed(1)  # the same draws
        logits(m(x)).square().mean().backward()
    for (n, p), (_, q) in zip(eager.named_parameters(), model.named_parameters()):
        if ".replacement." in n:
            assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0, n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=TOL["oracle"], rtol=1e-4, msg=n)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        logits(compiled(example())).square().mean().backward()
    assert counter.frame_count == 1


def _saved_for_backward(model, x):
    """The graph nodes that the compiled forward keeps for the backward, as inductor's partitioner picks them."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    saved = []

    def partition(joint, inputs, *, num_fwd_outputs, **kwargs):
        fw, bw = min_cut_rematerialization_partition(joint, inputs, compiler="inductor",
                                                     num_fwd_outputs=num_fwd_outputs, **kwargs)
        outputs = next(n for n in fw.graph.nodes if n.op == "output").args[0]
        saved.extend(n for n in outputs[num_fwd_outputs:] if isinstance(n, torch.fx.Node))
        return fw, bw

    def boxed(gm, _):
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition)
    logits(torch.compile(model, backend=backend)(x)).square().mean().backward()
    return saved


def _base(node):
    # a view of a graph input (a detached neighbour's weight) aliases memory that is kept anyway
    while getattr(node.target, "is_view", False):
        node = node.args[0]
    return node


@pytest.mark.parametrize("name", ["mlp", "conv_bn"])
def test_compiled_replaced_layers_keep_no_weight_for_the_backward(name):
    """Issue 12: compiled through autograd Functions, the forward's and the backward's synthesis of W were merged
    by AOTAutograd's CSE and the partitioner kept W from forward to backward (one weight-sized tensor per replaced
    layer; 1.13x the frozen baseline's peak on a ViT-S). Like eager mode, the compiled forward keeps no weight."""
    factory, example = MODELS[name]
    model = replace_wrap.convert(factory(), every=2).train()
    weights = {
        tuple(m.weight.shape) for b in replace_wrap.report(model).replaced
        for m in model.get_submodule(b.path).modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() > 1
    }
    saved = _saved_for_backward(model, example())
    computed = [tuple(n.meta["val"].shape) for n in saved
                if _base(n).op != "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    assert weights and computed  # replaced layers exist, activations are kept
    assert not [s for s in computed if s in weights], (sorted(weights), computed)


@pytest.mark.parametrize("name", ["mlp", "conv_bn"])
def test_compiled_graph_holds_no_autograd_function(name):
    """AOTAutograd caches no graph that holds a custom autograd.Function, so each process traced and partitioned
    a converted model anew and kept what that left behind (compiled ViT-S: ~45 MiB over a frozen model's cached
    graph). Compiled, the lean layers are torch.library operators: the graph is cacheable, and keyed on the code
    that its backward was traced from (a digest in each operator's arguments)."""
    from replace_wrap.synthesis.compiled_ops import CODE

    factory, example = MODELS[name]
    graphs = []

    def backend(gm, _):
        graphs.append(gm)
        return gm.forward

    model = replace_wrap.convert(factory(), every=2).train()
    torch.compile(model, backend=backend)(example())
    nodes = [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert not [n for n in nodes if "autograd_function" in str(n.target)]
    lean = [n for n in nodes if str(n.target).startswith("replace_wrap.lean_")]
    assert lean and all(CODE in n.args for n in lean)


def _moved(model):
    with torch.no_grad():
        for s in model.modules():
            if isinstance(s, replace_wrap.ReplacementSite):
                s.a.fill_(0.7), s.b.fill_(0.4)
    return model


def test_onnx_capture_records_the_generic_path_not_the_kernels_custom_operators(monkeypatch):
    # torch.onnx.export(dynamo=True) captures with torch.export while its flag is set. With gradients on (its
    # default) the layer kernels' custom operators (replace_wrap::lean_linear) were recorded, for which ONNX has
    # no function: a raw ConversionError. While it captures, replaced layers take the generic path (a * W + b * W').
    from torch.onnx._internal.exporter import _flags

    torch.manual_seed(0)
    model = _moved(replace_wrap.convert(ResidualMLP(), every=2)).eval()
    x = ResidualMLP.example()
    monkeypatch.setattr(_flags, "_is_onnx_exporting", True)
    ep = torch.export.export(model, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [op for op in ops if "replace_wrap" in op], ops
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)
    monkeypatch.setattr(_flags, "_is_onnx_exporting", False)  # a plain torch.export keeps the kernels
    ops = {str(n.target) for n in torch.export.export(model, (x,)).graph.nodes if n.op == "call_function"}
    assert [op for op in ops if "replace_wrap" in op], ops


def test_onnx_export_of_a_converted_model_matches_eager(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _moved(replace_wrap.convert(tiny_timm_vit(3), every=2)).eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.onnx.export(model, (x,), dynamo=True)
    with torch.no_grad():
        torch.testing.assert_close(program(x)[0], model(x), rtol=1e-5, atol=1e-5)
