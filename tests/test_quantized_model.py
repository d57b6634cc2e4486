"""DeepSeekForCausalLM on quantised checkpoints (ds_model/quantized.py, loading.py, convert.py):
tiny checkpoints in DeepSeek's published FP8 layout (per-expert keys, weight_scale_inv, sharded
with an index) give the logits and greedy tokens of transformers on the dequantised weights and
stay quantised in memory; the fused layout, ue8m0 / e8m0 scales, MXFP4 experts, edge blocks,
dequantize=True; every refusal names its tensor or key; the quantize CLI round trip; memory
estimates.
"""

import copy
import dataclasses
import json
import re

import pytest
import torch
from safetensors import safe_open

import ds_kernels
from ds_model import DeepSeekForCausalLM, ModelConfig
from ds_model.__main__ import main
from ds_model.config import PRESETS
from ds_model.convert import quantize_checkpoint
from ds_model.loading import check_fits
from ds_model.quantized import (Format, QuantExperts, QuantLinear, planned_formats,
                                quantize_modules)
from tiny_deepseek import (FP8_CONFIG, QUANTIZED_CONFIG, dequantized_model,
                           fused_moe_on_dequantized, hf_model, per_expert, quantize_tensors,
                           transformers, write_checkpoint)

NEW = 10


@pytest.fixture(scope="module")
def hf():
    return hf_model(**QUANTIZED_CONFIG)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def fp8_checkpoint(folder, hf, *, experts="fp8", quantization=None, edit=None, shards=3,
                   layout=per_expert, **options):
    """hf's weights in the published layout (quantised by hand, per expert unless layout says
    otherwise); returns (folder, the transformers model on the dequantised weights)."""
    tensors, dequantized = quantize_tensors(layout(hf.state_dict()), experts=experts, **options)
    if edit:
        edit(tensors)
    if quantization is None:
        quantization = {**FP8_CONFIG, **({"expert_dtype": "fp4"} if experts == "mxfp4" else {})}
    # a dtype, else transformers reads it from the first shard's tensors (and knows no e8m0)
    config = {**hf.config.to_dict(), "dtype": "float32", "quantization_config": quantization}
    write_checkpoint(folder, config, tensors, shards=shards)
    return folder, dequantized_model(hf, dequantized)


def check_logits(model, reference, ids, atol=1e-4):
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=atol, rtol=1e-4)


def hf_generate(model, ids):
    return model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def int8_codes(tensors):
    """MXFP4 codes stored as int8 bytes, as DeepSeek-V4 and transformers store them
    (safetensors 0.8 reads F4 tensors whole, but transformers 5.24 slices them and fails)."""
    for key, tensor in tensors.items():
        if tensor.dtype == torch.float4_e2m1fn_x2:
            tensors[key] = tensor.view(torch.int8)


@pytest.mark.parametrize("experts, edit", [("fp8", None), ("mxfp4", None),
                                           ("mxfp4", int8_codes)], ids=["fp8", "mxfp4", "int8"])
def test_published_layout_gives_transformers_logits_and_tokens(tmp_path, hf, ids, experts,
                                                                edit):
    folder, reference = fp8_checkpoint(tmp_path, hf, experts=experts, edit=edit)
    model = DeepSeekForCausalLM.from_pretrained(folder)
    check_logits(model, reference, ids)
    assert torch.equal(model.generate(ids, NEW), hf_generate(reference, ids))


@pytest.mark.parametrize("variant", [dict(attention_bias=True, rope_interleave=False),
                                     dict(q_lora_rank=None), dict(tie_word_embeddings=True)],
                         ids=["bias", "no_q_lora", "tied"])
def test_variants(tmp_path, ids, variant):
    """Biases beside quantised weights (kept in the model dtype), q_proj, a tied lm_head."""
    folder, reference = fp8_checkpoint(tmp_path, hf_model(**QUANTIZED_CONFIG, **variant))
    model = DeepSeekForCausalLM.from_pretrained(folder)
    assert type(model.model.layers[0].self_attn.o_proj) is QuantLinear
    check_logits(model, reference, ids)


@pytest.mark.parametrize("experts", ["fp8", "mxfp4"])
def test_transformers_own_fp8_loading_agrees(tmp_path, hf, ids, experts):
    """transformers reads the same folder (on CPU it dequantises, which needs accelerate)."""
    pytest.importorskip("accelerate")
    folder, reference = fp8_checkpoint(tmp_path, hf, experts=experts, edit=int8_codes)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(folder)
    assert type(theirs.model.layers[0].self_attn.q_a_proj) is torch.nn.Linear  # dequantised
    check_logits(DeepSeekForCausalLM.from_pretrained(folder), theirs, ids)
    check_logits(DeepSeekForCausalLM.from_pretrained(folder), reference, ids)


@pytest.mark.parametrize("experts", ["fp8", "mxfp4"])
def test_weights_stay_quantized_in_memory(tmp_path, hf, experts):
    folder, _ = fp8_checkpoint(tmp_path, hf, experts=experts)
    model = DeepSeekForCausalLM.from_pretrained(folder)
    layer = model.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    for linear in (attn.q_a_proj, attn.q_b_proj, attn.kv_a_proj_with_mqa, attn.o_proj,
                   mlp.shared_experts.down_proj, model.model.layers[0].mlp.gate_proj):
        assert type(linear) is QuantLinear
        assert (linear.weight.dtype, linear.weight_scale_inv.dtype) == (torch.float8_e4m3fn,
                                                                        torch.float32)
    assert type(attn.kv_b_proj) is torch.nn.Linear and attn.kv_b_proj.weight.dtype == \
        torch.float32  # dequantised at load for absorbed decode
    experts_module = mlp.experts
    assert type(experts_module) is QuantExperts
    E, I, H = 8, 128, 64
    if experts == "fp8":
        assert experts_module.gate_up_proj.dtype == torch.float8_e4m3fn
        assert experts_module.gate_up_proj_scale_inv.shape == (E, 2, 1)
    else:
        assert experts_module.gate_up_proj.dtype == torch.float4_e2m1fn_x2
        assert experts_module.gate_up_proj.shape == (E, 2 * I, H // 2)
        assert experts_module.down_proj_scale_inv.dtype == torch.float8_e8m0fnu
        assert experts_module.down_proj_scale_inv.shape == (E, H, I // 32)
    for dense in (model.lm_head.weight, model.model.embed_tokens.weight, mlp.gate.weight,
                  attn.q_a_layernorm.weight):
        assert dense.dtype == torch.float32
    held = sum(t.nbytes for t in model.parameters()) + sum(
        b.nbytes for name, b in model.named_buffers() if not name.endswith("inv_freq"))
    assert held == model.config.weight_bytes(torch.float32)[0]
    dense_bytes = model.config.weight_bytes(torch.float32, quantized=False)[0]
    assert held < 0.45 * dense_bytes  # the embeddings and lm_head (fp32) are a third of it


def test_fused_layout_and_bfloat16(tmp_path, hf, ids):
    """transformers' in-memory layout: gate_up_proj [E, 2I, H] codes with
    gate_up_proj_scale_inv [E, ceil(2I/128), ceil(H/128)]; loaded in bf16, the quantised
    weights stay FP8 and everything else is bf16."""
    folder, reference = fp8_checkpoint(tmp_path, hf, layout=dict, shards=1)
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert f.get_slice("model.layers.1.mlp.experts.gate_up_proj_scale_inv").get_shape() == \
            [8, 2, 1]
    check_logits(DeepSeekForCausalLM.from_pretrained(folder), reference, ids)
    bf16 = DeepSeekForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert bf16.model.layers[1].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
    assert bf16.model.layers[1].self_attn.o_proj.weight_scale_inv.dtype == torch.float32
    assert bf16.model.layers[1].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits, want = bf16(ids), reference(ids).logits
        theirs = copy.deepcopy(reference).to(torch.bfloat16)(ids).logits
    assert logits.dtype == torch.bfloat16

    def error(x):  # relative to the fp32 logits
        return float((x.float() - want).norm() / want.norm())

    assert error(logits) < 1.25 * error(theirs)  # bf16 rounding no worse than transformers'


@pytest.mark.parametrize("experts", ["fp8", "mxfp4"])
def test_dequantize_folds_every_weight(tmp_path, hf, ids, experts):
    folder, reference = fp8_checkpoint(tmp_path, hf, experts=experts)
    model = DeepSeekForCausalLM.from_pretrained(folder, dequantize=True)
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32}
    assert not any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules())
    check_logits(model, reference, ids)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float8_e8m0fnu])
def test_ue8m0_scales(tmp_path, hf, ids, scale_dtype):
    """V3.1's scale_fmt ue8m0 (powers of two, stored fp32) and V4's e8m0 scale tensors."""
    folder, reference = fp8_checkpoint(tmp_path, hf, scale_fmt="ue8m0", scale_dtype=scale_dtype,
                                       quantization={**FP8_CONFIG, "scale_fmt": "ue8m0"})
    model = DeepSeekForCausalLM.from_pretrained(folder)
    assert model.model.layers[1].mlp.experts.down_proj_scale_inv.dtype == scale_dtype
    assert model.model.layers[0].self_attn.o_proj.weight_scale_inv.dtype == scale_dtype
    check_logits(model, reference, ids)


def test_edge_blocks(tmp_path, ids):
    """Dimensions that are not multiples of 128 (hidden 160 = 1.25 blocks, q_lora_rank 144):
    edge blocks as DeepSeek pads them (transformers' own FP8 loading derives the block from the
    scale grid, 160 // 2 = 80 rows, and would get these wrong)."""
    hf = hf_model(**QUANTIZED_CONFIG, hidden_size=160, q_lora_rank=144, intermediate_size=200)
    folder, reference = fp8_checkpoint(tmp_path, hf)
    with safe_open(folder / "model-00001-of-00003.safetensors", framework="pt") as f:
        scales = {k: f.get_slice(k).get_shape() for k in f.keys() if k.endswith("q_a_proj."
                                                                                "weight_scale_inv")}
    assert set(map(tuple, scales.values())) == {(2, 2)}                   # [144, 160]
    check_logits(DeepSeekForCausalLM.from_pretrained(folder), reference, ids)


def test_modules_left_unquantized_load_dense(tmp_path, hf, ids):
    """A checkpoint that leaves some projections dense (transformers' modules_to_not_convert)
    holds those as plain Linears."""
    def densify(tensors):
        key = "model.layers.1.self_attn.o_proj.weight"
        tensors[key] = ds_kernels.dequantize(tensors[key], tensors.pop(key + "_scale_inv"))

    folder, reference = fp8_checkpoint(tmp_path, hf, edit=densify)
    model = DeepSeekForCausalLM.from_pretrained(folder)
    assert type(model.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.o_proj) is QuantLinear
    check_logits(model, reference, ids)


def test_per_expert_fp8_needs_128_wide_experts(tmp_path, ids):
    """moe_intermediate_size 32: the per-expert gate and up scale blocks do not tile the fused
    [2I, H] grid, so quantised experts are refused; dequantize=True loads them."""
    hf = hf_model()
    folder, reference = fp8_checkpoint(tmp_path, hf)
    with pytest.raises(ValueError, match=r"moe_intermediate_size=32 is not a multiple of 128, "
                                         r".*load with dequantize=True"):
        DeepSeekForCausalLM.from_pretrained(folder)
    check_logits(DeepSeekForCausalLM.from_pretrained(folder, dequantize=True), reference, ids)


def _set(key, value):
    return lambda tensors: tensors.update({key: value})


def _retype(key, dtype):
    return lambda tensors: tensors.update({key: tensors[key].to(dtype)})


_ATTN = "model.layers.1.self_attn.o_proj.weight"
_EXPERT = "model.layers.2.mlp.experts.3.up_proj.weight"
BAD_TENSORS = {
    "grid": (_set(_ATTN + "_scale_inv", torch.ones(1, 2)),
             r"o_proj.weight_scale_inv has shape \(1, 2\), but model.layers.1.self_attn.o_proj."
             r"weight of shape \(64, 64\) needs \(1, 1\) \(fp8: one scale per 128x128 block\)"),
    "expert_grid": (_set(_EXPERT + "_scale_inv", torch.ones(2, 1)),
                    r"experts.3.up_proj.weight_scale_inv has shape \(2, 1\), but .* needs "
                    r"\(1, 1\)"),
    "scale_dtype": (_retype(_ATTN + "_scale_inv", torch.bfloat16),
                    r"o_proj.weight_scale_inv is BF16: the scales of fp8 weights are F32 or "
                    r"F8_E8M0"),
    "fmt": (_retype(_ATTN, torch.float8_e5m2),
            r"o_proj.weight is F8_E5M2, but quantization_config declares fp8 weights "
            r"\(F8_E4M3\)"),
    "dense_with_scale": (_retype(_ATTN, torch.bfloat16),
                         r"o_proj.weight is BF16, but quantization_config declares fp8"),
    "no_scale": (lambda t: t.pop(_ATTN + "_scale_inv"),
                 r"o_proj.weight is F8_E4M3, quantised data, but the checkpoint has no scales "
                 r"model.layers.1.self_attn.o_proj.weight_scale_inv"),
    "no_weight": (lambda t: t.pop(_ATTN),
                  r"o_proj.weight_scale_inv is a scale, but the checkpoint has no weight "
                  r"model.layers.1.self_attn.o_proj.weight$"),
    "quantized_norm": (_set("model.norm.weight_scale_inv", torch.ones(1)),
                       r"model.norm.weight is quantised, but ds_model holds model.norm.weight "
                       r"unquantised"),
    "quantized_router": (_set("model.layers.1.mlp.gate.weight_scale_inv", torch.ones(1, 1)),
                         r"mlp.gate.weight is quantised, but ds_model holds"),
    "mixed_experts": (lambda t: t.update({_EXPERT: ds_kernels.dequantize(
        t[_EXPERT], t.pop(_EXPERT + "_scale_inv"))}),
                      r"experts.3.up_proj.weight is F32, but other weights of "
                      r"model.layers.2.mlp.experts are quantised"),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_bad_tensors_are_named(tmp_path, hf, case):
    edit, match = BAD_TENSORS[case]
    folder, _ = fp8_checkpoint(tmp_path, hf, edit=edit)
    with pytest.raises(ValueError, match=match):
        DeepSeekForCausalLM.from_pretrained(folder)


def test_mxfp4_declared_experts_must_be_mxfp4(tmp_path, hf):
    folder, _ = fp8_checkpoint(tmp_path, hf, quantization={**FP8_CONFIG, "expert_dtype": "fp4"})
    with pytest.raises(ValueError, match=r"experts.\d.\w+_proj.weight is F8_E4M3, but "
                                         r"quantization_config declares mxfp4 routed experts' "
                                         r"weights \(F4 or I8\)"):
        DeepSeekForCausalLM.from_pretrained(folder)
    folder, _ = fp8_checkpoint(tmp_path / "f32", hf, experts="mxfp4", edit=_retype(
        "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv", torch.float32))
    with pytest.raises(ValueError, match=r"gate_proj.weight_scale_inv is F32: the scales of "
                                         r"mxfp4 weights are F8_E8M0"):
        DeepSeekForCausalLM.from_pretrained(folder)


def test_quantized_tensors_without_quantization_config(tmp_path, hf):
    folder, _ = fp8_checkpoint(tmp_path, hf)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\(F8_E4M3\) is quantised \(it has .*weight_scale_inv"
                                         r"\), but config.json has no quantization_config"):
        DeepSeekForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("change, match", [
    ({"fmt": "e5m2"}, r"quantization_config\['fmt'\] must be one of \['e4m3'\] "
                      r"\(float8_e4m3fn, .*\), got 'e5m2'"),
    ({"weight_block_size": [64, 64]}, r"quantization_config\['weight_block_size'\] must be "
                                      r"\[128, 128\] .*, got \[64, 64\]"),
    ({"weight_block_size": None}, r"quantization_config\['weight_block_size'\] must be "
                                  r"\[128, 128\] .*, got None"),
    ({"activation_scheme": "static"}, r"quantization_config\['activation_scheme'\] must be one "
                                      r"of \['dynamic'\] \(ds_model's weight-only paths read no "
                                      r"static activation scales\), got 'static'"),
    ({"quant_method": "awq"}, r"quantization_config\['quant_method'\] must be one of \['fp8'\] "
                              r".*, got 'awq'"),
    ({"scale_fmt": "e4m3"}, r"quantization_config\['scale_fmt'\] must be one of "
                            r"\['float', 'ue8m0'\]"),
    ({"expert_dtype": "int4"}, r"quantization_config\['expert_dtype'\] must be one of "
                               r"\['fp8', 'fp4'\]"),
    ({"group_size": 128}, r"quantization_config has unknown key\(s\) \['group_size'\]"),
])
def test_bad_quantization_config_is_named(tmp_path, hf, change, match):
    folder, _ = fp8_checkpoint(tmp_path, hf, quantization={**FP8_CONFIG, **change})
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder / 'config.json'))}: {match}"):
        DeepSeekForCausalLM.from_pretrained(folder)


def test_transformers_quantization_config_and_v4_expert_dtype():
    """transformers' FineGrainedFP8Config.to_dict() keys are read; V4's top-level expert_dtype
    moves into quantization_config, as transformers' DeepseekV4Config moves it."""
    fields = dataclasses.asdict(ModelConfig.preset("tiny"))
    theirs = transformers.FineGrainedFP8Config(scale_fmt="ue8m0").to_dict()
    config = ModelConfig.from_hf_config({**fields, "quantization_config": theirs})
    assert (config.quantization.scale_fmt, config.quantization.experts) == ("ue8m0", "fp8")
    v4 = ModelConfig.from_hf_config({**fields, "quantization_config": FP8_CONFIG,
                                     "expert_dtype": "fp4"})
    assert v4.quantization.experts == "mxfp4"


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("experts", ["fp8", "mxfp4"])
def test_memory_estimates_count_quantized_bytes(preset, experts):
    """weight_bytes is what a quantised model holds, byte for byte (built on the meta device);
    per token it reads the active weights."""
    config = ModelConfig.preset(preset)
    config.quantization_config = {**FP8_CONFIG, **({"expert_dtype": "fp4"}
                                                   if experts == "mxfp4" else {})}
    with torch.device("meta"):
        model = DeepSeekForCausalLM(config)
        quantize_modules(model, planned_formats(model, config.quantization))
    model.to_dtype(torch.bfloat16)
    held = sum(t.nbytes for t in model.parameters()) + sum(
        b.nbytes for name, b in model.named_buffers() if not name.endswith("inv_freq"))
    total, read = config.weight_bytes(torch.bfloat16)
    assert held == total
    dense, dense_read = config.weight_bytes(torch.bfloat16, quantized=False)
    assert read < dense_read
    if preset == "deepseek-v3-671b":  # kv_b_proj in bf16; no MTP layer
        assert (round(total / 2**30), round(dense / 2**30)) == (
            (628, 1250) if experts == "fp8" else (342, 1250))


def test_check_fits_counts_quantized_bytes(monkeypatch):
    """With 800 GiB, DeepSeek-V3 fits in FP8 (628 GiB) and not in bf16 (1250 GiB)."""
    from ds_model import loading

    monkeypatch.setattr(loading, "_device_memory", lambda device: 800 * 2**30)
    config = ModelConfig.preset("deepseek-v3-671b")
    config.quantization_config = FP8_CONFIG
    check_fits(config, torch.bfloat16, torch.device("cpu"), "v3")
    with pytest.raises(ValueError, match=r"^v3: 671.0B parameters in torch.bfloat16 need "
                                         r"1250.1 GiB, cpu has 800.0 GiB$"):
        check_fits(config, torch.bfloat16, torch.device("cpu"), "v3", quantized=False)
    monkeypatch.setattr(loading, "_device_memory", lambda device: 300 * 2**30)
    with pytest.raises(ValueError, match=r"671.0B parameters in FP8 \(the rest in "
                                         r"torch.bfloat16\) need 628.1 GiB, cpu has 300.0 GiB$"):
        check_fits(config, torch.bfloat16, torch.device("cpu"), "v3")


def _tensors(folder) -> dict:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("experts, scale_fmt", [("fp8", "float"), ("mxfp4", "ue8m0")])
def test_quantize_cli_round_trip(tmp_path, hf, ids, capsys, experts, scale_fmt):
    """save_pretrained's sharded bf16 checkpoint -> python -m ds_model quantize: the published
    layout, byte for byte what the recipes give, in the same shards with an index; loads to the
    logits of the dequantised weights."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(src, max_shard_size="200KB")
    main(["quantize", str(src), str(dst), "--experts", experts, "--scale-fmt", scale_fmt])
    assert f"{dst}: " in capsys.readouterr().out
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in dst.glob("*.safetensors")) == shards
    assert (dst / "generation_config.json").exists()
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == {
        **FP8_CONFIG, **({"scale_fmt": "ue8m0", "expert_dtype": "fp4"} if experts == "mxfp4"
                         else {})}
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    got = _tensors(dst)
    assert set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in got.values())

    want, dequantized = quantize_tensors(_tensors(src), experts=experts, scale_fmt=scale_fmt)
    mxfp4 = [k for k in want if want[k].dtype == torch.float4_e2m1fn_x2]
    assert len(mxfp4) == (2 * 3 * 8 if experts == "mxfp4" else 0)
    for key in mxfp4:  # stored as int8 bytes, as V4 and transformers store them
        want[key] = want[key].view(torch.int8)
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key].view(torch.uint8),
                                                              tensor.view(torch.uint8)), key
    reference = dequantized_model(hf, dequantized)
    model = DeepSeekForCausalLM.from_pretrained(dst, dtype=torch.float32)
    check_logits(model, reference, ids)


@pytest.mark.parametrize("experts", ["fp8", "mxfp4"])
def test_transformers_reads_what_quantize_writes(tmp_path, hf, ids, experts):
    pytest.importorskip("accelerate")
    src, dst = tmp_path / "src", tmp_path / "dst"
    hf.save_pretrained(src, max_shard_size="200KB")
    quantize_checkpoint(src, dst, experts=experts)
    check_logits(DeepSeekForCausalLM.from_pretrained(dst),
                 transformers.DeepseekV3ForCausalLM.from_pretrained(dst), ids)


def test_quantize_cli_splits_fused_experts(tmp_path, hf):
    src = write_checkpoint(tmp_path / "src", hf.config.to_dict(), hf.state_dict())
    quantize_checkpoint(src, tmp_path / "dst")
    got = _tensors(tmp_path / "dst")
    assert "model.layers.1.mlp.experts.gate_up_proj" not in got
    want, _ = quantize_tensors(per_expert(hf.state_dict()))
    assert got.keys() == want.keys()
    for key in ("model.layers.2.mlp.experts.7.up_proj.weight",
                "model.layers.2.mlp.experts.7.up_proj.weight_scale_inv"):
        assert torch.equal(got[key].view(torch.uint8), want[key].view(torch.uint8))


def test_quantize_cli_refusals(tmp_path, hf, capsys):
    src = write_checkpoint(tmp_path / "src", hf.config.to_dict(), hf.state_dict())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    quantized, _ = fp8_checkpoint(tmp_path / "fp8", hf)
    for args, match in [
        ([src, tmp_path / "full"], f"{tmp_path / 'full'} exists and is not an empty folder"),
        ([quantized, tmp_path / "out"], f"{quantized / 'config.json'}: already quantised"),
        ([tmp_path / "nowhere", tmp_path / "out"], f"{tmp_path / 'nowhere'}: no such checkpoint"),
    ]:
        with pytest.raises(SystemExit, match=f"^python -m ds_model: error: {re.escape(match)}"):
            main(["quantize", *map(str, args)])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quantize", ["fp8", "mxfp4"])
def test_generate_cli_on_quantized_presets_and_checkpoints(tmp_path, hf, capsys, quantize):
    main(["generate", "--quantize", quantize, "--batch", "1", "--prompt-len", "3",
          "--max-new-tokens", "2"])
    _, err = capsys.readouterr()
    formats = "fp8 x 21, mxfp4 x 2" if quantize == "mxfp4" else "fp8 x 23"  # 2 MoE layers
    assert re.search(rf"weights [\d.]+ MiB, {formats}\n", err), err
    folder, _ = fp8_checkpoint(tmp_path, hf, experts=quantize)
    for extra, formats in (([], "fp8 x "), (["--dequantize"], None)):
        main(["generate", "--checkpoint", str(folder), "--batch", "1", "--prompt-len", "3",
              "--max-new-tokens", "2", *extra])
        _, err = capsys.readouterr()
        assert (formats in err) if formats else ("fp8 x" not in err), err
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(folder), "--quantize", "fp8"])


def test_triton_backend(tmp_path, ids):
    """The quantised model with every op on its Triton kernel (the interpreter on CPU):
    quant_linear's kernel decodes the FP8 tiles."""
    hf = hf_model(**QUANTIZED_CONFIG, num_hidden_layers=2, n_routed_experts=4, n_group=1,
                  topk_group=1)
    folder, reference = fp8_checkpoint(tmp_path, hf)
    model = DeepSeekForCausalLM.from_pretrained(folder)
    with torch.no_grad(), ds_kernels.use_backend("triton"):
        check_logits(model, reference, ids[:, :5], atol=1e-3)


@pytest.mark.parametrize("experts", ["fp8", "mxfp4"])
@pytest.mark.parametrize("T", [0, 1, 7])
def test_quantized_experts(experts, T):
    """QuantExperts runs ds_kernels.fused_moe on the quantised weights, which means fused_moe on
    the dequantised ones (0 tokens too)."""
    fmt = Format(experts, torch.float8_e8m0fnu if experts == "mxfp4" else torch.float32)
    module = QuantExperts(4, 64, 128, fmt)
    g = torch.Generator().manual_seed(T)
    for e in range(4):
        module.load_dense(e, torch.randn(256, 64, generator=g) * 0.1,
                          torch.randn(64, 128, generator=g) * 0.1)
    x = torch.randn(T, 64, generator=g)
    ids = torch.randint(0, 4, (T, 2), generator=g)
    weights = torch.rand(T, 2, generator=g)
    torch.testing.assert_close(module(x, ids, weights),
                               fused_moe_on_dequantized(
                                   x, module.gate_up_proj, module.down_proj, weights, ids,
                                   w13_scale=module.gate_up_proj_scale_inv,
                                   w2_scale=module.down_proj_scale_inv),
                               atol=1e-4, rtol=1e-4)
