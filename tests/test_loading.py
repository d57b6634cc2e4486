"""DeepSeekForCausalLM.from_pretrained: checkpoints that transformers writes, the published
DeepSeek-V3 per-expert layout (sharded), the fused 3-D layout, huggingface_hub's symlinked
cache, and every refusal naming its cause: tensors, config fields, the model's size, index
entries leading out of the folder, files that are not regular files, broken JSON. Quantised
checkpoints: test_quantized_model.py."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors import safe_open

from ds_model import DeepSeekForCausalLM
from tiny_deepseek import hf_model, per_expert, write_checkpoint


@pytest.fixture(scope="module")
def hf():
    return hf_model()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def config_of(model) -> dict:
    return model.config.to_dict()


def check_logits(model, hf, ids):
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_save_pretrained_checkpoint_gives_transformers_logits(tmp_path, ids, q_lora_rank):
    hf = hf_model(q_lora_rank=q_lora_rank)
    hf.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "model.layers.1.mlp.experts.0.gate_proj.weight" in f.keys()  # per expert
    model = DeepSeekForCausalLM.from_pretrained(tmp_path)
    assert not model.training and model.lm_head.weight.dtype == torch.float32
    check_logits(model, hf, ids)


def test_fused_expert_layout(tmp_path, hf, ids):
    state = hf.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    write_checkpoint(tmp_path, config_of(hf), state)
    check_logits(DeepSeekForCausalLM.from_pretrained(tmp_path), hf, ids)


def test_sharded_per_expert_checkpoint_skips_mtp_layers(tmp_path, hf, ids, caplog):
    """The published DeepSeek-V3 layout: per-expert keys in shards with an index, and the
    multi-token-prediction layer after the last layer (skipped with a log line)."""
    tensors = per_expert(hf.state_dict())
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in tensors
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.3.mlp.experts.0.up_proj.weight"] = torch.zeros(32, 64)
    write_checkpoint(tmp_path, {**config_of(hf), "num_nextn_predict_layers": 1}, tensors,
                     shards=3)
    with caplog.at_level("INFO", logger="ds_model"):
        model = DeepSeekForCausalLM.from_pretrained(tmp_path)
    assert "skipped 2 tensors of the multi-token-prediction layers [3]" in caplog.text
    check_logits(model, hf, ids)


def test_dtype_and_tied_embeddings(tmp_path, ids):
    hf = hf_model(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    model = DeepSeekForCausalLM.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    check_logits(model, hf, ids)
    bf16 = DeepSeekForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, tensor in bf16.state_dict().items():
        fp32 = name.endswith(("gate.weight", "e_score_correction_bias"))
        assert tensor.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    torch.testing.assert_close(bf16.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq,
                               rtol=0, atol=0)
    hf_bf16 = type(hf).from_pretrained(tmp_path, dtype=torch.bfloat16)
    with torch.no_grad():
        low, full, reference = bf16(ids), model(ids), hf_bf16(ids).logits
    assert low.dtype == torch.bfloat16

    def error(x):  # relative to the fp32 logits
        return float((x.float() - full).norm() / full.norm())

    assert error(low) < 1.25 * error(reference)  # bf16 rounding no worse than transformers'



def broken(tmp_path, hf, edit=None, config=None, shards=1):
    tensors = per_expert(hf.state_dict())
    if edit:
        edit(tensors)
    return write_checkpoint(tmp_path, {**config_of(hf), **(config or {})}, tensors, shards)


@pytest.mark.parametrize("case, match", [
    ("missing", r"lacks 1 tensor\(s\) the model needs: \['model.layers.1.self_attn.kv_b_proj"),
    ("missing_expert", r"lacks 1 tensor\(s\).*'model.layers.2.mlp.experts.gate_up_proj'"),
    ("unexpected", r"unexpected tensor model.layers.0.self_attn.rotary.weight"),
    ("expert_out_of_range", r"unexpected tensor model.layers.1.mlp.experts.8.up_proj.weight"),
    ("shape", r"model.layers.0.mlp.up_proj.weight has shape \(95, 64\), the model expects "
              r"\(96, 64\)"),
    ("both_layouts", r"\['model.layers.1.mlp.experts.gate_up_proj'\] written more than once"),
    # quantised data in a checkpoint without quantization_config (the rest of the FP8 refusals:
    # test_quantized_model.py)
    ("fp8_scale", r"model.layers.0.self_attn.o_proj.weight \(F32\) is quantised \(it has "
                  r"model.layers.0.self_attn.o_proj.weight_scale_inv\), but config.json has no "
                  r"quantization_config"),
    ("fp8_weight", r"model.norm.weight is F8_E4M3, quantised data, but the checkpoint has no "
                   r"scales model.norm.weight_scale_inv"),
])
def test_bad_tensors_are_named(tmp_path, hf, case, match):
    state = hf.state_dict()
    edits = {
        "missing": lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"),
        "missing_expert": lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"),
        "unexpected": lambda t: t.update({"model.layers.0.self_attn.rotary.weight":
                                          torch.zeros(2)}),
        "expert_out_of_range": lambda t: t.update({
            "model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(32, 64)}),
        "shape": lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)}),
        "both_layouts": lambda t: t.update({"model.layers.1.mlp.experts.gate_up_proj":
                                            state["model.layers.1.mlp.experts.gate_up_proj"]}),
        "fp8_scale": lambda t: t.update({"model.layers.0.self_attn.o_proj.weight_scale_inv":
                                         torch.ones(1, 1)}),
        "fp8_weight": lambda t: t.update({"model.norm.weight":
                                          t["model.norm.weight"].to(torch.float8_e4m3fn)}),
    }
    folder = broken(tmp_path, hf, edits[case], shards=2)
    with pytest.raises(ValueError, match=match):
        DeepSeekForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("config, match", [
    ({"sliding_window": 4096}, r"unknown config field\(s\) \['sliding_window'\]"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}},
     r"quantization_config\['fmt'\] must be one of \['e4m3'\]"),
    # What transformers' model or ds_kernels.route would refuse only at the first forward
    # (every field's own check: test_model.py's test_config_validation_names_the_field).
    ({"n_group": 3}, r"n_routed_experts=8 is not divisible by n_group=3"),
    ({"num_experts_per_tok": 0}, r"num_experts_per_tok must be an int >= 1, got 0"),
    ({"topk_group": 3}, r"topk_group must be an int in \[1, 2\] \(n_group=2\), got 3"),
    ({"hidden_size": 64.0}, r"hidden_size must be an int >= 1, got 64.0"),
    ({"rope_parameters": "yarn"}, r"rope_parameters must be an object or null, got 'yarn'"),
    ({"num_nextn_predict_layers": -1}, r"num_nextn_predict_layers must be an int >= 0, got -1"),
    ({"dtype": "Tensor"}, r"dtype must be one of \['float32', 'bfloat16', 'float16'\], got "
                          r"'Tensor'"),
])
def test_bad_configs_are_named(tmp_path, hf, config, match):
    folder = broken(tmp_path, hf, config=config)
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder / 'config.json'))}: {match}"):
        DeepSeekForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("drop", [None, "n_routed_experts"])
def test_configs_without_the_architecture_are_refused(tmp_path, hf, drop):
    """config.json = {} would otherwise mean DeepSeek-V3-671B's defaults (and allocate
    them); a field that fixes the architecture is never guessed."""
    folder = broken(tmp_path, hf)
    config = {} if drop is None else {k: v for k, v in config_of(hf).items() if k != drop}
    (folder / "config.json").write_text(json.dumps(config))
    missing = r"'vocab_size', 'hidden_size', .*, 'v_head_dim'" if drop is None else f"'{drop}'"
    with pytest.raises(ValueError, match=f"config.json: missing config field\\(s\\) "
                                         f"\\[{missing}\\]: they fix the architecture"):
        DeepSeekForCausalLM.from_pretrained(folder)


def test_model_larger_than_memory_is_refused_before_allocating(tmp_path, hf):
    folder = broken(tmp_path, hf, config={"vocab_size": 10**12})  # 2 * 64e12 parameters
    with pytest.raises(ValueError, match=r"128000.0B parameters in torch.float32 need "
                                         r"[\d.]+ GiB, cpu has [\d.]+ GiB"):
        DeepSeekForCausalLM.from_pretrained(folder)


def test_cuda_without_cuda_is_refused_before_allocating(tmp_path, hf, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="^device cuda: CUDA is not available$"):
        DeepSeekForCausalLM.from_pretrained(broken(tmp_path, hf), device="cuda")


@pytest.mark.parametrize("topk_method", ["noaux_tc", "group_limited_greedy", "greedy"])
def test_topk_method_survives_save_and_load(tmp_path, topk_method):
    model = hf_model(topk_method=topk_method)
    if topk_method != "noaux_tc":  # V2 methods route without a correction bias: zeros here
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.zero_()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["topk_method"] == topk_method
    assert DeepSeekForCausalLM.from_pretrained(tmp_path).config.topk_method == topk_method


@pytest.mark.parametrize("entry", ["../outside.safetensors", "absolute", "sub/inside.safetensors",
                                   7])
def test_index_entries_leading_out_of_the_folder_are_refused(tmp_path, hf, entry):
    """Every entry is a real safetensors file that today's loader would read: refused all the
    same, since an index may only name files beside it."""
    folder = broken(tmp_path / "checkpoint", hf, shards=2)
    shard = folder / "model-00002-of-00002.safetensors"
    (folder / "sub").mkdir()
    shutil.copy(shard, folder / "sub" / "inside.safetensors")
    shutil.copy(shard, tmp_path / "outside.safetensors")
    entry = str(tmp_path / "outside.safetensors") if entry == "absolute" else entry
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map = {k: entry if v == shard.name else v for k, v in weight_map.items()}
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=f"names {entry!r}: shards must be plain file names"):
        DeepSeekForCausalLM.from_pretrained(folder)


def test_symlinked_cache_folder_loads(tmp_path, hf, ids):
    """huggingface_hub's cache: every file of a snapshot is a link to ../../blobs/<hash>."""
    source = broken(tmp_path / "source", hf, shards=2)
    snapshot, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(source.iterdir())):
        path.rename(blobs / f"blob{i}")
        (snapshot / path.name).symlink_to(f"../../blobs/blob{i}")
    check_logits(DeepSeekForCausalLM.from_pretrained(snapshot), hf, ids)


def load_refused(folder, fifo=None, timeout=20):
    """The ValueError from_pretrained(folder) raises, within a few seconds. A loader that
    opens ``fifo`` would block on it, so another process (a read blocked inside safetensors
    holds the GIL: no thread of ours could run) opens it for writing after ``timeout`` s and
    closes it, ending the read: the test then fails instead of hanging."""
    writer = None if fifo is None else subprocess.Popen(
        ["sh", "-c", f"sleep {timeout}; : > \"$0\"", str(fifo)],
        start_new_session=True)  # its own process group: sh and its sleep, killed together
    try:
        start = time.monotonic()
        with pytest.raises(ValueError) as error:
            DeepSeekForCausalLM.from_pretrained(folder)
        assert time.monotonic() - start < timeout / 2, "from_pretrained blocked on the FIFO"
    finally:
        if writer is not None:
            if writer.poll() is None:  # still waiting: nothing opened the FIFO
                os.killpg(writer.pid, signal.SIGKILL)
            writer.wait()
    return error.value


@pytest.mark.parametrize("name, kind", [("config.json", "a FIFO"),
                                        ("model.safetensors.index.json", "a FIFO"),
                                        ("model-00001-of-00002.safetensors", "a FIFO"),
                                        ("model-00001-of-00002.safetensors", "a directory")])
def test_non_regular_files_are_refused(tmp_path, hf, name, kind):
    folder = broken(tmp_path, hf, shards=2)
    (folder / name).unlink()
    if kind == "a FIFO":
        os.mkfifo(folder / name)
    else:
        (folder / name).mkdir()
    error = load_refused(folder, folder / name if kind == "a FIFO" else None)
    assert str(error) == f"{folder / name} is {kind}, not a regular file"


@pytest.mark.parametrize("name, text, match", [
    ("config.json", '{"vocab_size": 128,,}', r"invalid JSON: Expecting property name enclosed "
                                             r"in double quotes: line 1 column 20 \(char 19\)"),
    ("config.json", "[1, 2]", r"a config must be an object of fields, got list"),
    ("model.safetensors.index.json", '{"weight_map": {\n  "a": 1', r"invalid JSON: .*: line 2 "
                                                                    r"column 9 \(char 25\)"),
    ("model.safetensors.index.json", '{"metadata": {}}',
     r"expected \{\"weight_map\": \{tensor: file name\}\}"),
])
def test_json_errors_name_the_file_and_position(tmp_path, hf, name, text, match):
    folder = broken(tmp_path, hf, shards=2)
    (folder / name).write_text(text)
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder / name))}: {match}"):
        DeepSeekForCausalLM.from_pretrained(folder)


def test_missing_files_are_named(tmp_path, hf):
    with pytest.raises(FileNotFoundError, match="nowhere: no such checkpoint folder"):
        DeepSeekForCausalLM.from_pretrained(tmp_path / "nowhere")
    folder = broken(tmp_path, hf, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names model-00002-of-00002.safetensors"):
        DeepSeekForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model-00001-of-00002.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="holds no \\*.safetensors"):
        DeepSeekForCausalLM.from_pretrained(folder)


def test_a_nonzero_correction_bias_with_a_v2_method_is_refused(tmp_path):
    """A V2 method routes without a correction bias: the zeros transformers writes are skipped
    (above), but a real bias would change the routing and must not be dropped silently."""
    model = hf_model(topk_method="group_limited_greedy")
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.fill_(0.5)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.1\.mlp\.gate\."
                                         r"e_score_correction_bias"):
        DeepSeekForCausalLM.from_pretrained(tmp_path)
