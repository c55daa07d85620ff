"""Text, speech and multimodal HF models of the compatibility matrix, built from small configs (no hub access),
and the check each goes through (:func:`check`).

A :class:`Case` holds the model, keyword inputs with labels (training; the output has ``.loss``), inputs
without (evaluation) and, for generative models, the inputs of ``generate``. Every stack has at least five
layers so that ``every=2`` replaces two of them.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import replace_wrap

VOCAB, SEQ, LAYERS = 64, 8, 5
RTOL = 1e-6  # relative to the output scale max(1, |y|), as in the vision matrix


@dataclass
class Case:
    model: nn.Module
    train_inputs: dict[str, Any]
    eval_inputs: dict[str, Any]
    generate_inputs: dict[str, Any] | None = None  # None: not a generative model
    tied: bool = False  # input embeddings tied to the output head


@dataclass
class Row:
    model: str
    kind: str = ""
    params: int = 0
    stacks: list[int] = field(default_factory=list)
    replaced: int = 0
    ratio: float = 1.0
    generate: str = "n/a"
    merge_err: float = float("nan")
    reload_err: float = float("nan")
    plain_err: float = float("nan")
    status: str = "error"
    seconds: float = 0.0


BUILDERS: dict[str, tuple[str, Callable[[], Case]]] = {}


def register(name: str, kind: str) -> Callable[[Callable[[], Case]], Callable[[], Case]]:
    def deco(fn: Callable[[], Case]) -> Callable[[], Case]:
        if name in BUILDERS:
            raise ValueError(f"text builder {name!r} registered twice")
        BUILDERS[name] = (kind, fn)
        return fn

    return deco


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _causal(model: nn.Module, tied: bool = False) -> Case:
    x = _ids()
    return Case(model, {"input_ids": x, "labels": x}, {"input_ids": x}, {"input_ids": x[:1, :4]}, tied)


_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)


@register("GPT-2", "decoder")
def gpt2() -> Case:
    import transformers as T

    cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=2, n_positions=64, bos_token_id=1,
                       eos_token_id=2)
    return _causal(T.GPT2LMHeadModel(cfg), tied=True)


@register("Llama", "decoder")
def llama() -> Case:
    import transformers as T

    return _causal(T.LlamaForCausalLM(T.LlamaConfig(**_DECODER)))


@register("Qwen2", "decoder")
def qwen2() -> Case:
    import transformers as T

    return _causal(T.Qwen2ForCausalLM(T.Qwen2Config(**_DECODER)))


@register("Qwen3", "decoder")
def qwen3() -> Case:
    import transformers as T

    return _causal(T.Qwen3ForCausalLM(T.Qwen3Config(**_DECODER, head_dim=8)))


@register("Mistral", "decoder")
def mistral() -> Case:
    import transformers as T

    return _causal(T.MistralForCausalLM(T.MistralConfig(**_DECODER)))


@register("Gemma", "decoder")
def gemma() -> Case:
    import transformers as T

    return _causal(T.GemmaForCausalLM(T.GemmaConfig(**_DECODER, head_dim=8)), tied=True)


@register("Gemma2", "decoder (alternating sliding-window / global attention)")
def gemma2() -> Case:
    import transformers as T

    return _causal(T.Gemma2ForCausalLM(T.Gemma2Config(**_DECODER, head_dim=8, sliding_window=4)), tied=True)


@register("Phi-3", "decoder (fused qkv / gate-up projections)")
def phi3() -> Case:
    import transformers as T

    return _causal(T.Phi3ForCausalLM(T.Phi3Config(**_DECODER)))


@register("OPT", "decoder")
def opt() -> Case:
    import transformers as T

    cfg = T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                      max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _causal(T.OPTForCausalLM(cfg), tied=True)


@register("GPT-NeoX", "decoder (parallel attention + MLP)")
def gpt_neox() -> Case:
    import transformers as T

    cfg = T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                          num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    return _causal(T.GPTNeoXForCausalLM(cfg))


@register("Mixtral", "decoder, mixture of experts")
def mixtral() -> Case:
    import transformers as T

    return _causal(T.MixtralForCausalLM(T.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)))


# Heterogeneous stacks: one block class whose layers differ inside (dense and MoE feed-forwards, convolution and
# attention mixers, per-layer widths). A replaced block synthesizes what its neighbours have (a side without the
# tensor gives zeros, reported as adapted) and keeps as its own what neither has (reported as kept).
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)


@register("DeepSeek-V3", "decoder, MLA attention, dense then MoE layers (first_k_dense_replace)")
def deepseek_v3() -> Case:
    import transformers as T

    cfg = T.DeepseekV3Config(**_DECODER | dict(num_hidden_layers=6), **_MOE, first_k_dense_replace=3, n_routed_experts=4,
                             n_group=1, topk_group=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16,
                             qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    return _causal(T.DeepseekV3ForCausalLM(cfg))


@register("Qwen3-MoE", "decoder, MoE and dense layers alternating (mlp_only_layers)")
def qwen3_moe() -> Case:
    import transformers as T

    cfg = T.Qwen3MoeConfig(**_DECODER | dict(num_hidden_layers=6), **_MOE, head_dim=8, num_experts=4,
                           mlp_only_layers=[0, 2, 4])
    return _causal(T.Qwen3MoeForCausalLM(cfg))


@register("GPT-OSS", "decoder, MoE, sliding / full attention with sinks")
def gpt_oss() -> Case:
    import transformers as T

    cfg = T.GptOssConfig(**_DECODER, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
    return _causal(T.GptOssForCausalLM(cfg))


@register("Llama4", "decoder, MoE every 2nd layer, no-RoPE layers")
def llama4() -> Case:
    import transformers as T

    cfg = T.Llama4TextConfig(**_DECODER | dict(num_hidden_layers=6), head_dim=8, num_local_experts=2,
                             num_experts_per_tok=1, interleave_moe_layer_step=2, intermediate_size_mlp=48,
                             no_rope_layer_interval=3, attention_chunk_size=8)
    return _causal(T.Llama4ForCausalLM(cfg))


@register("LFM2", "hybrid decoder, short-convolution and attention layers")
def lfm2() -> Case:
    import transformers as T

    cfg = T.Lfm2Config(**_DECODER | dict(num_hidden_layers=6),
                       layer_types=["conv", "conv", "full_attention", "conv", "full_attention", "conv"])
    return _causal(T.Lfm2ForCausalLM(cfg))


@register("Qwen3-Next", "hybrid decoder, gated delta-net and attention layers, MoE")
def qwen3_next() -> Case:
    import transformers as T

    cfg = T.Qwen3NextConfig(**_DECODER, **_MOE, head_dim=8, num_experts=4, shared_expert_intermediate_size=16,
                            linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                            linear_value_head_dim=8, linear_conv_kernel_dim=4,
                            layer_types=["linear_attention"] * 3 + ["full_attention", "linear_attention"])
    return _causal(T.Qwen3NextForCausalLM(cfg))


@register("Gemma3n", "decoder, per-layer intermediate sizes, AltUp, per-layer inputs")
def gemma3n() -> Case:
    import transformers as T

    cfg = T.Gemma3nTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=[64, 48, 64, 32, 64], num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
        num_kv_shared_layers=0, laurel_rank=4, activation_sparsity_pattern=[0.0] * LAYERS, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2 + ["full_attention"], altup_num_inputs=2,
    )
    return _causal(T.Gemma3nForCausalLM(cfg), tied=True)


@register("Mamba", "state-space model (A_log, D, depthwise conv1d)")
def mamba() -> Case:
    import transformers as T

    cfg = T.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=LAYERS, expand=2,
                        conv_kernel=4, use_mambapy=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _causal(T.MambaForCausalLM(cfg), tied=True)


@register("Mamba2", "state-space model, multi-head SSD")
def mamba2() -> Case:
    import transformers as T

    cfg = T.Mamba2Config(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=LAYERS, num_heads=8,
                         head_dim=8, n_groups=1, expand=2, conv_kernel=4, chunk_size=8, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    return _causal(T.Mamba2ForCausalLM(cfg))


@register("Falcon-H1", "hybrid decoder, attention and Mamba-2 in parallel in every layer")
def falcon_h1() -> Case:
    import transformers as T

    cfg = T.FalconH1Config(**_DECODER, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1,
                           mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8)
    return _causal(T.FalconH1ForCausalLM(cfg))


def _masked(model: nn.Module) -> Case:
    x = _ids()
    labels = torch.full_like(x, -100)
    labels[:, 2] = x[:, 2]
    return Case(model, {"input_ids": x, "labels": labels}, {"input_ids": x}, None, tied=True)


_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=4, max_position_embeddings=64)


@register("BERT", "encoder")
def bert() -> Case:
    import transformers as T

    return _masked(T.BertForMaskedLM(T.BertConfig(**_ENCODER)))


@register("RoBERTa", "encoder")
def roberta() -> Case:
    import transformers as T

    return _masked(T.RobertaForMaskedLM(T.RobertaConfig(**_ENCODER, pad_token_id=1)))


@register("T5", "encoder-decoder")
def t5() -> Case:
    import transformers as T

    cfg = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS,
                     num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    x, y = _ids(), _ids(seed=1)
    return Case(T.T5ForConditionalGeneration(cfg), {"input_ids": x, "labels": y},
                {"input_ids": x, "decoder_input_ids": y}, {"input_ids": x[:1]}, tied=True)


@register("Whisper", "speech encoder-decoder")
def whisper() -> Case:
    import transformers as T

    cfg = T.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[],
    )
    model = T.WhisperForConditionalGeneration(cfg)
    feats = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    y = _ids(seq=6, seed=1)
    return Case(model, {"input_features": feats, "labels": y}, {"input_features": feats, "decoder_input_ids": y},
                {"input_features": feats[:1]}, tied=True)


@register("CLIP", "multimodal (text and vision towers)")
def clip() -> Case:
    import transformers as T

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  image_size=16, patch_size=8)
    model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": _ids(), "pixel_values": pixels}
    return Case(model, inputs | {"return_loss": True}, inputs)


# --- the check ---------------------------------------------------------------------------------------------


def _first(y: Any) -> torch.Tensor:
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        v = getattr(y, key, None)
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"no output tensor in {type(y).__name__}")


def _eval(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return _first(model(**inputs)).detach().clone()


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def _generate(model: nn.Module, inputs: dict[str, Any], use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache, min_new_tokens=6,
                             output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


def real_trainable(model: nn.Module) -> int:
    """Trainable parameters, each counted once (tied weights are one parameter): the oracle for the report."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)


def check(name: str) -> Row:
    """Convert, train a step, generate (KV cache vs recompute vs merged), save and reload two ways, merge."""
    kind, build = BUILDERS[name]
    torch.manual_seed(0)
    case = build()
    model, t0 = case.model, time.perf_counter()
    row = Row(model=f"{type(model).__name__} ({name})", kind=kind, params=real_trainable(model))
    replace_wrap.convert(model, every=2)
    rep = replace_wrap.report(model)
    row.stacks, row.replaced, row.ratio = [n for _, n in rep.stacks], len(rep.replaced), rep.trainable_ratio
    if rep.trainable_after != real_trainable(model):
        raise AssertionError(f"report counts {rep.trainable_after} trainable, the model has {real_trainable(model)}")

    model.train()
    out = model(**case.train_inputs)
    if not isinstance(getattr(out, "loss", None), torch.Tensor):
        raise AssertionError(f"the converted model's output has no .loss: {type(out).__name__}")
    out.loss.backward()
    sites = [m for m in model.modules() if isinstance(m, replace_wrap.ReplacementSite)]
    if any(p.grad is None for s in sites for p in s.parameters()) or not torch.isfinite(out.loss):
        raise AssertionError(f"train step: loss {out.loss.item()}, a scalar got no gradient")
    with torch.no_grad():  # one SGD step, and scalars away from 0.5, so that every check below means something
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad)
        for i, s in enumerate(sites):
            s.a.fill_(0.6 + 0.05 * i), s.b.fill_(0.45)
    model.zero_grad(set_to_none=True)
    y = _eval(model, case.eval_inputs)

    tokens = None
    if case.generate_inputs is not None:
        tokens, scores = _generate(model, case.generate_inputs, use_cache=True)
        again, rescored = _generate(model, case.generate_inputs, use_cache=False)
        if not torch.equal(tokens, again) or _err(rescored, scores) > 1e-4:
            raise AssertionError("greedy generate with the KV cache differs from the cache-less recompute")

    cls = type(model)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        twin = replace_wrap.from_pretrained(cls, d)
        row.reload_err = _err(_eval(twin, case.eval_inputs), y)
        if replace_wrap.scalars(twin) != replace_wrap.scalars(model):
            raise AssertionError("replace_wrap.from_pretrained did not restore the scalars")
        if replace_wrap.report(twin).trainable_after != real_trainable(twin):
            raise AssertionError("the report's trainable count after from_pretrained is not the model's")
        if case.tied and twin.get_output_embeddings().weight is not twin.get_input_embeddings().weight:
            raise AssertionError("the reloaded model's embeddings are not tied: the count above proves nothing")
        plain = cls.from_pretrained(d)
        if any(isinstance(m, replace_wrap.ReplacementSite) for m in plain.modules()):
            raise AssertionError("the plain from_pretrained built a converted model")
        row.plain_err = _err(_eval(plain, case.eval_inputs), y)

    replace_wrap.merge(model)
    row.merge_err = _err(_eval(model, case.eval_inputs), y)
    if tokens is not None:
        merged, _ = _generate(model, case.generate_inputs, use_cache=True)
        if not torch.equal(merged, tokens):
            raise AssertionError("greedy generate of the merged model differs from the converted model's")
        row.generate = "cache = recompute = merged"
    worst = max(row.merge_err, row.reload_err, row.plain_err)
    if not worst <= RTOL:  # also catches NaN
        raise AssertionError(f"outputs differ by {worst:.3g} (merge {row.merge_err:.2g}, reload {row.reload_err:.2g}, "
                             f"plain {row.plain_err:.2g})")
    row.status, row.seconds = "ok", time.perf_counter() - t0
    return row


def write_page(rows: list[Row], path: Any, seconds: float, command: str) -> None:
    """Write docs/compatibility_text.md."""
    import platform

    import transformers

    ok = sum(r.status == "ok" for r in rows)
    lines = [
        "# Compatibility: text, speech and multimodal models",
        "",
        "<!-- generated by `pytest -m compat tests/test_compat_text.py`; do not edit by hand -->",
        "",
        "Each model is built from a small config (no hub), five or six layers per stack, and goes through: ",
        "`convert(model, every=2)` (the report's trainable count must be the model's, tied embeddings counted",
        "once); a training step with labels (the output keeps `.loss`, every replaced block's `a` and `b` get a",
        "gradient), then an SGD step and scalars moved off 0.5; greedy `generate` with the KV cache, which must",
        "give the same tokens as the cache-less recompute (and scores within 1e-4); `save_pretrained`, then",
        "`replace_wrap.from_pretrained` (scalars and outputs restored) and the plain `from_pretrained` of the",
        "model class (a plain model predicting the same); `merge` (outputs equal, and greedy `generate` of the",
        "merged model gives the same tokens). Errors are relative to the output scale `max(1, |y|)`; the bound",
        "is 1e-6.",
        "",
        f"- **models passing: {ok} / {len(rows)}**",
        f"- measured with transformers {transformers.__version__}, torch {torch.__version__}, on "
        f"{platform.machine()} CPU; run time {seconds:.0f} s",
        f"- command: `{command}`; the default test run checks a fast subset (Llama, OPT, T5)",
        "",
        "| model | kind | params | stacks | replaced | trainable | generate (greedy, 6 tokens) | merge err | "
        "reload err | plain load err | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r.model}` | {r.kind} | {r.params / 1e3:.0f}k | {','.join(map(str, r.stacks))} | {r.replaced} | "
            f"{r.ratio:.2f} | {r.generate} | {r.merge_err:.1e} | {r.reload_err:.1e} | {r.plain_err:.1e} | {r.status} |"
        )
    lines.append("")
    path.write_text("\n".join(lines))
