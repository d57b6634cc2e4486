"""Captured decode steps (ds_model/captured.py, generate(..., compile=True)): every bucket's
logits against eager decode (ragged batches, sequences leaving inside a bucket, V3.2 with FP8
caches), no recompilation across 50 steps and across calls, greedy tokens equal, no value read
back by the ops inside a step, bad combinations refused. On this CPU the steps run through
torch.compile (inductor); CUDA graphs need a GPU."""

import pytest
import torch

import ds_kernels
from ds_kernels.ops.checks import trusted_values
from ds_model import DeepSeekForCausalLM, ModelConfig, captured
from ds_model.__main__ import main

PRESET = ModelConfig.preset("tiny")


def tiny(seed=0, **overrides):
    config = ModelConfig(**{**PRESET.__dict__, **overrides})
    model = DeepSeekForCausalLM(config).eval()
    return model.init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))


def prompts(*lengths, vocab=1024):
    return [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n))
            for n in lengths]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def prefilled(model, ps, steps, fp8=False):
    cache = model.new_cache([len(p) + steps for p in ps], block_size=16, fp8=fp8)
    lengths = torch.tensor([len(p) for p in ps])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return model.prefill(torch.cat(ps), cu, cache), cache


def compare_steps(model, ps, schedule, fp8=False, atol=1e-5):
    """Decode each step of ``schedule`` (the sequences still running) eagerly and captured, on
    two caches from the same prefill; their logits must agree at every step."""
    with torch.inference_mode():
        logits, eager_cache = prefilled(model, ps, len(schedule), fp8)
        _, captured_cache = prefilled(model, ps, len(schedule), fp8)
        step = captured.CapturedDecode(model, captured_cache)
        tokens = logits.argmax(-1)                                        # [B]
        for running in schedule:
            seq_ids = torch.tensor(running)
            eager = model.decode(tokens[seq_ids], seq_ids, eager_cache)   # [n, V]
            got = step(tokens[seq_ids], seq_ids)
            torch.testing.assert_close(got, eager, atol=atol, rtol=1e-4)
            tokens = torch.zeros_like(tokens)
            tokens[seq_ids] = eager.argmax(-1)
        torch.testing.assert_close(captured_cache.seqlens, eager_cache.seqlens)
        return step


def test_every_bucket_equals_eager_decode():
    """Ragged prompts; the batch shrinks 5 -> 3 -> 2 -> 1 sequences, so every bucket (8, 4,
    2, 1) runs, each with padding rows, and sequences leave from inside a bucket (5 -> 3: both
    in bucket 8 and 4; the first ones leave, so rows move)."""
    model = tiny()
    schedule = [[0, 1, 2, 3, 4]] * 2 + [[1, 3, 4], [3, 4], [4], [4]]
    step = compare_steps(model, prompts(3, 17, 9, 30, 1), schedule)
    assert sorted(step.buckets) == [1, 2, 4, 8]


def test_deepseek_v32_with_fp8_caches_equals_eager_decode():
    """Sparse attention (indexer + sparse_mla, index_topk shorter than the prompts) over FP8
    latent and index-key caches."""
    model = tiny(kv_lora_rank=128, index_topk=8, index_head_dim=128, index_n_heads=4)
    compare_steps(model, prompts(20, 11, 6), [[0, 1, 2], [0, 1, 2], [0, 2], [2]], fp8=True,
                  atol=1e-4)


def test_no_recompilation_across_steps_and_calls():
    """50 steps of one call compile each bucket once; a second call with other prompt lengths
    (another cache, with another page count) compiles nothing."""
    model = tiny(seed=1)
    before = captured.compiles
    stats = {}
    first = model.generate(prompts(7), 50, compile=True, stats=stats)
    compiled = captured.compiles - before
    assert compiled == 1  # one bucket: batch 1
    assert stats["capture_s"] > 0
    again = {}
    second = model.generate(prompts(150), 50, compile=True, stats=again)
    assert captured.compiles - before == compiled
    assert again["capture_s"] == 0.0
    assert same(first, model.generate(prompts(7), 50))
    assert same(second, model.generate(prompts(150), 50))


def test_generate_gives_eager_tokens_with_sequences_ending_early():
    """Greedy tokens equal eager's, with an EOS id that some sequences reach early (their rows
    leave the captured batch) and ragged prompts."""
    model = tiny(seed=2)
    ps = prompts(4, 12, 25, 2)
    plain = model.generate(ps, 16)
    eos = int(plain[1][len(ps[1]) + 3])  # sequence 1 stops after 4 tokens, others may too
    expected = model.generate(ps, 16, eos_token_id=eos)
    assert any(len(e) < len(p) + 16 for e, p in zip(expected, ps))
    got = model.generate(ps, 16, eos_token_id=eos, compile=True)
    assert same(got, expected)


def _spy_host_reads(monkeypatch, frames):
    """Record every Tensor.tolist/item/__bool__/__int__/__float__ called from a frame whose file
    is under one of ``frames``: the ops' argument checks, not their torch-path bodies."""
    import sys
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if any(f in caller for f in frames):
                reads.append((_name, caller))
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


@pytest.mark.parametrize("trusted", [False, True])
def test_ops_read_no_values_inside_a_step(monkeypatch, trusted):
    """Under trusted_values() (what a captured step runs in, as under CUDA graph capture) no
    op on the decode path - V3's and V3.2's - reads an index tensor back to check it; outside
    it the checks do read (the spy sees them), so the test can fail."""
    model = tiny(seed=3, index_topk=8, index_head_dim=32, index_n_heads=4)
    ps = prompts(12, 5)
    with torch.inference_mode():
        logits, cache = prefilled(model, ps, 2)
        tokens, seq_ids = logits.argmax(-1), torch.arange(2)
        batch = cache.append(seq_ids)
        reads = _spy_host_reads(monkeypatch, ("ds_kernels/ops/", "ds_model/"))
        with trusted_values() if trusted else torch.inference_mode():
            captured._step(model, cache, tokens, batch.positions, batch.slots,
                           batch.block_table, batch.seqlens, batch.query_seq)
    assert (reads == []) == trusted, reads[:5]


def test_errors():
    model = tiny()
    with pytest.raises(ValueError, match="compile=True .* speculative"):
        model.generate(prompts(3), 2, compile=True, speculative="mtp")
    model.ep_group = object()  # stands in for a torch.distributed group
    cache = model.new_cache([8])
    with pytest.raises(ValueError, match="expert parallelism"):
        captured.CapturedDecode(model, cache)


def test_cli_compile(capsys):
    main(["generate", "--batch", "2", "--prompt-len", "5", "--max-new-tokens", "3", "--compile"])
    out, err = capsys.readouterr()
    assert "capture:" in err and "decode: 4 tokens in 2 steps" in out
    with pytest.raises(SystemExit):
        main(["generate", "--compile", "--speculative", "mtp"])


def test_bucket():
    assert [captured.bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_trusted_values_nests_and_resets():
    """A failure inside leaves the checks on again."""
    ids = torch.tensor([0, 7])
    with pytest.raises(RuntimeError):
        with trusted_values():
            with trusted_values():
                ds_kernels.ops.checks.check_ids_in_range("ids", ids, 4)  # skipped: no error
            raise RuntimeError
    with pytest.raises(ValueError, match="ids must be in"):
        ds_kernels.ops.checks.check_ids_in_range("ids", ids, 4)
