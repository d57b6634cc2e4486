"""DeepSeekForCausalLM.generate against transformers' generate (greedy, EOS), ragged batches
against one-by-one generation, sampling, bad arguments, and the CLI (its errors: one line)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_model import DeepSeekForCausalLM
from ds_model.__main__ import main
from tiny_deepseek import hf_model

NEW = 12


@pytest.fixture(scope="module", params=[32, None], ids=["q_lora", "no_q_lora"])
def models(request, tmp_path_factory):
    hf = hf_model(q_lora_rank=request.param)
    folder = tmp_path_factory.mktemp("checkpoint")
    hf.save_pretrained(folder)
    return hf, DeepSeekForCausalLM.from_pretrained(folder), folder


def hf_generate(hf, ids, eos=None):
    return hf.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                       pad_token_id=0 if eos is None else eos)


def test_greedy_tokens_match_transformers(models):
    hf, model, _ = models
    ids = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(0))
    want = hf_generate(hf, ids)
    got = model.generate(ids, NEW)
    assert got.shape == (4, 9 + NEW)
    assert torch.equal(got, want)


def test_eos_stops_each_sequence_like_transformers(models):
    """With an EOS that one sequence emits mid-way: that row stops and is padded with EOS,
    the others run on, as transformers' generate does."""
    hf, model, _ = models
    ids = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(0))
    free = model.generate(ids, NEW)[:, 9:]
    eos = int(free[1, 4])
    want = hf_generate(hf, ids, eos)
    got = model.generate(ids, NEW, eos_token_id=eos)
    assert torch.equal(got, want)
    stop = free[1].tolist().index(eos)
    assert (got[1, 9 + stop:] == eos).all()
    out = model.generate(list(ids), NEW, eos_token_id=[eos, 127])
    assert len(out[1]) == 9 + stop + 1 and int(out[1][-1]) == eos


def test_ragged_batch_equals_one_by_one(models):
    """Prompts of 1 to 70 tokens (more than a 64-token page) in one batch."""
    _, model, _ = models
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g) for n in (5, 70, 1, 33)]
    batched = model.generate(prompts, NEW)
    alone = [model.generate([p], NEW)[0] for p in prompts]
    assert [len(o) for o in batched] == [len(p) + NEW for p in prompts]
    for b, (x, y) in enumerate(zip(batched, alone)):
        assert torch.equal(x, y), f"sequence {b}"
    assert torch.equal(model.generate([p.tolist() for p in prompts], 3)[2], alone[2][:4])


def test_sampling(models):
    _, model, _ = models
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    greedy = model.generate(ids, NEW)

    def sample(seed, **options):
        return model.generate(ids, NEW, generator=torch.Generator().manual_seed(seed),
                              **options)

    assert torch.equal(sample(0, temperature=1.0, top_p=1e-6), greedy)  # nucleus of one
    assert torch.equal(sample(5, temperature=0.7, top_p=0.9), sample(5, temperature=0.7,
                                                                      top_p=0.9))
    hot = sample(0, temperature=100.0)
    assert not torch.equal(hot, greedy) and hot.max() < 128 and hot.min() >= 0
    assert torch.equal(model.generate(ids, 0), ids)


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(2, 3), 4), "input_ids must be an integer"),
    (([], 4), "non-empty list of prompts"),
    (([[1, 2], []], 4), r"prompt 1 must be a non-empty 1-D list of integer ids"),
    (([[1, 2], [0.5]], 4), r"prompt 1 must be a non-empty 1-D list of integer ids"),
    (([[1, 128]], 4), r"token ids must be in \[0, vocab_size=128\), got values in \[1, 128\]"),
    (([[1]], -1), "max_new_tokens must be an int >= 0, got -1"),
    (([[1]], 4, dict(temperature=-1.0)), "temperature must be >= 0"),
    (([[1]], 4, dict(top_p=0.0)), r"top_p must be in \(0, 1\]"),
])
def test_bad_arguments(models, args, match):
    _, model, _ = models
    prompts, new, options = (*args, {}) if len(args) == 2 else args
    with pytest.raises(ValueError, match=match):
        model.generate(prompts, new, **options)


def test_cli(models, capsys):
    main(["generate", "--batch", "2", "--prompt-len", "5", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert "model: tiny" in err and "3/3 steps" in err
    assert "prefill: 2 x 5 tokens" in out and "decode: 4 tokens in 2 steps" in out
    assert out.count("sequence ") == 2
    _, _, folder = models
    main(["generate", "--checkpoint", str(folder), "--batch", "1", "--prompt-len", "3",
          "--max-new-tokens", "2", "--temperature", "0.5", "--dtype", "bfloat16"])
    out, err = capsys.readouterr()
    assert f"model: {folder}" in err and "bfloat16" in err and "sequence 0:" in out


@pytest.mark.parametrize("args, match", [
    pytest.param(["--checkpoint", "{tmp}/nowhere"], "{tmp}/nowhere: no such checkpoint folder$",
                 id="missing_checkpoint"),
    pytest.param(["--checkpoint", "{tmp}"], r"{tmp}/config.json: missing config field\(s\) "
                                            r"\['vocab_size'", id="broken_checkpoint"),
    pytest.param(["--record-routing", "{tmp}/no/ids.safetensors"],
                 "--record-routing {tmp}/no/ids.safetensors: no folder {tmp}/no$",
                 id="record_routing_folder"),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available on this machine$",
                 id="no_cuda"),
    pytest.param(["--device", "gpu"], "--device gpu: ", id="bad_device"),  # then torch's words
    pytest.param(["--preset", "deepseek-v3-671b"], r"--preset deepseek-v3-671b: 671.0B "
                 r"parameters in torch.float32 need ", id="too_large"),
    pytest.param(["--preset", "deepseek-v3-671b", "--quantize", "mxfp4"],
                 r"--preset deepseek-v3-671b: 671.0B parameters in FP8 with MXFP4 experts \(the "
                 r"rest in torch.float32\) need 347.8 GiB", id="too_large_quantized"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, args, match):
    """What the user can fix ends the run with one line (argparse's "prog: error: ...", no
    traceback, no usage) and exit status 1, before any generation."""
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--batch", "1", "--prompt-len", "2", "--max-new-tokens", "1", *args])
    message = exit_.value.code  # SystemExit(str): printed to stderr, exit status 1
    assert isinstance(message, str) and "\n" not in message
    assert re.match(f"python -m ds_model: error: {match.format(tmp=tmp_path)}", message)
    assert capsys.readouterr() == ("", "")  # nothing else: no usage, no model line


def test_cli_error_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ds_model", "generate", "--checkpoint",
                             str(tmp_path / "nowhere")], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"python -m ds_model: error: {tmp_path / 'nowhere'}: no such "
                             "checkpoint folder\n")


def test_fp8_kv_cache_decodes_close_to_the_float_cache(tmp_path, models):
    """FlashMLA's FP8 latent rows (e4m3 latent, a scale per 128 columns, bf16 k_pe): prefill
    and a decode step give logits within FP8's rounding of the float cache's, in about a
    quarter of fp32's bytes."""
    hf_model(kv_lora_rank=128).save_pretrained(tmp_path)
    model = DeepSeekForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (11,), generator=torch.Generator().manual_seed(1))
    cu_seqlens = torch.tensor([0, 4, 11], dtype=torch.int32)
    logits = {}
    with torch.inference_mode():
        for fp8 in (False, True):
            cache = model.new_cache([6, 9], fp8=fp8)
            first = model.prefill(ids, cu_seqlens, cache)
            logits[fp8] = model.decode(first.argmax(-1), torch.arange(2), cache)
            layers, Dr = model.config.num_hidden_layers, model.config.qk_rope_head_dim
            row = 128 + 4 + 2 * Dr if fp8 else (128 + Dr) * 4   # codes + 1 scale + bf16 k_pe
            assert cache.bytes_per_token() == layers * row
    error = (logits[True] - logits[False]).norm() / logits[False].norm()
    assert 0 < error < 2**-4, error
    with pytest.raises(ValueError, match="FP8 latent cache needs kv_lora_rank a multiple of 128"):
        models[1].new_cache([4], fp8=True)
