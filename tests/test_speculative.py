"""generate(..., speculative="mtp"): DeepSeek's MTP layer drafting, the main model verifying
several tokens a sequence in one forward. Always plain greedy's tokens - random MTP weights
(nothing accepted), agreeing ones (bench_speculative.copying_mtp: everything accepted), k = 1..3,
ragged prompts, EOS and max_new_tokens inside a draft, V3.2's sparse attention; several-token
decode against the forward; the MTP layer loaded from a checkpoint; bad input."""

import pytest
import torch

from bench.bench_speculative import copying_mtp
from ds_model import DeepSeekForCausalLM, ModelConfig
from test_model import ours
from tiny_deepseek import hf_model, write_checkpoint

PRESET = ModelConfig.preset("tiny")


def model_with_mtp(seed=0, std=0.2, **overrides):
    config = ModelConfig(**{**ModelConfig.preset("tiny").__dict__, **overrides})
    model = DeepSeekForCausalLM(config, mtp_layers=1).eval()
    return model.init_weights(std=std, generator=torch.Generator().manual_seed(seed))


def prompts(*lengths, vocab=1024):
    return [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n))
            for n in lengths]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_random_mtp_gives_greedy_tokens(k):
    model = model_with_mtp()
    ps = prompts(5, 17, 9)
    stats = {}
    assert same(model.generate(ps, 12, speculative="mtp", draft_tokens=k, stats=stats),
                model.generate(ps, 12))
    assert stats["drafted"] > 0 and stats["steps"] <= 12


@pytest.mark.parametrize("k", [1, 2, 3])
def test_agreeing_mtp_accepts_every_draft_and_gives_greedy_tokens(k):
    """Everything accepted: ceil(12 / (k + 1)) verification steps after the prefill's token
    (drafts past max_new_tokens are accepted too, then cut)."""
    model = copying_mtp(model_with_mtp(std=0.5))
    ps = prompts(6, 11)
    stats = {}
    got = model.generate(ps, 13, speculative="mtp", draft_tokens=k, stats=stats)
    assert same(got, model.generate(ps, 13))
    assert stats["steps"] == 1 + -(-12 // (k + 1))
    assert stats["accepted"] == stats["drafted"] == 2 * k * (stats["steps"] - 1)


def test_eos_and_the_budget_inside_a_draft():
    """An agreeing model whose greedy continuation hits an EOS id mid-draft: every sequence
    stops at it, as plain greedy does; and max_new_tokens cuts a draft short."""
    model = copying_mtp(model_with_mtp(std=0.5))
    ps = prompts(4, 8, 13)
    plain = model.generate(ps, 10)
    eos = int(plain[1][8 + 3])                                      # sequence 1's 4th new token
    for k in (2, 3):
        assert same(model.generate(ps, 10, speculative="mtp", draft_tokens=k, eos_token_id=eos),
                    model.generate(ps, 10, eos_token_id=eos))
        assert same(model.generate(ps, 5, speculative="mtp", draft_tokens=k),
                    model.generate(ps, 5))
        assert same(model.generate(ps, 1, speculative="mtp", draft_tokens=k),
                    model.generate(ps, 1))


def test_tensor_prompts_and_v32():
    """[B, S] tensors in, [B, S + n] out; V3.2's sparse attention verifies several tokens a
    sequence too (prompts longer than index_topk)."""
    model = model_with_mtp(index_topk=8, index_head_dim=16, index_n_heads=4)
    ids = torch.randint(0, 1024, (3, 20), generator=torch.Generator().manual_seed(5))
    assert torch.equal(model.generate(ids, 9, speculative="mtp", draft_tokens=2),
                       model.generate(ids, 9))


@pytest.mark.parametrize("v32", [False, True], ids=["deepseek_v3", "deepseek_v32"])
def test_several_new_tokens_a_sequence_match_the_forward(v32):
    """decode with [n, s] tokens: each attends causally to its cache and to the new ones
    before it; rewind drops the rejected ones, and decoding other tokens there is the
    forward of that other sequence."""
    model = ours(hf_model(v32=v32))
    g = torch.Generator().manual_seed(4)
    full = [torch.randint(0, 128, (n,), generator=g) for n in (9, 20)]
    cache = model.new_cache([len(s) + 4 for s in full], block_size=16)
    with torch.no_grad():
        model.prefill(torch.cat([s[:-3] for s in full]),
                      torch.tensor([0, 6, 23], dtype=torch.int32), cache)
        got = model.decode(torch.stack([s[-3:] for s in full]), torch.arange(2), cache)
        for b, s in enumerate(full):
            torch.testing.assert_close(got[b], model(s[None])[0, -3:], atol=1e-4, rtol=1e-4)
        cache.rewind(torch.arange(2), torch.tensor([7, 18]))        # one new token kept each
        other = torch.tensor([[5, 6], [7, 8]])
        got = model.decode(other, torch.arange(2), cache)
        for b, s in enumerate(full):
            seq = torch.cat([s[:-2], other[b]])
            torch.testing.assert_close(got[b], model(seq[None])[0, -2:], atol=1e-4, rtol=1e-4)


def test_mtp_layer_loads_from_a_checkpoint(tmp_path):
    """The published layout: layer num_hidden_layers holds the MTP layer; from_pretrained
    reads it with mtp=True (its embed_tokens and shared_head.head from the main model's when
    absent), skips it otherwise, and refuses mtp=True without one."""
    model = copying_mtp(model_with_mtp(std=0.5))
    state = model.state_dict()
    L = PRESET.num_hidden_layers
    for name in ("embed_tokens.weight", "shared_head.head.weight"):
        del state[f"model.layers.{L}.{name}"]
    config = {k: v for k, v in model.config.__dict__.items() if v is not None}
    write_checkpoint(tmp_path, {**config, "num_nextn_predict_layers": 1}, state)
    loaded = DeepSeekForCausalLM.from_pretrained(tmp_path, mtp=True)
    assert len(loaded.model.layers) == L + 1
    ps = prompts(7, 3)
    stats = {}
    assert same(loaded.generate(ps, 8, speculative="mtp", draft_tokens=2, stats=stats),
                model.generate(ps, 8))
    assert stats["accepted"] > 0
    assert len(DeepSeekForCausalLM.from_pretrained(tmp_path).model.layers) == L
    del state[f"model.layers.{L}.eh_proj.weight"]
    write_checkpoint(tmp_path, {**config, "num_nextn_predict_layers": 0},
                     {k: v for k, v in state.items() if not k.startswith(f"model.layers.{L}.")})
    with pytest.raises(ValueError, match="mtp=True, but the checkpoint has no multi-token-"
                                         "prediction layer"):
        DeepSeekForCausalLM.from_pretrained(tmp_path, mtp=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(speculative="eagle"), "speculative must be None or 'mtp'"),
    (dict(speculative="mtp", draft_tokens=0), "draft_tokens must be an int >= 1, got 0"),
    (dict(speculative="mtp", temperature=0.7), "decodes greedily"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        model_with_mtp().generate(prompts(4), 3, **kwargs)


def test_a_model_without_mtp_layers_is_refused():
    model = DeepSeekForCausalLM(PRESET).eval()
    with pytest.raises(ValueError, match=r"needs the model's multi-token-prediction layer: "
                                         r"load it with from_pretrained\(\.\.\., mtp=True\)"):
        model.generate(prompts(4), 3, speculative="mtp")


def test_cli(capsys):
    """--speculative mtp prints the acceptance and the same tokens as plain greedy."""
    from ds_model.__main__ import main

    args = ["generate", "--preset", "tiny", "--batch", "2", "--prompt-len", "6",
            "--max-new-tokens", "5"]
    main(args)
    plain = capsys.readouterr()
    main(args + ["--speculative", "mtp", "--draft-tokens", "2"])
    spec = capsys.readouterr()
    assert "drafted tokens accepted" in spec.err
    tokens = [line for line in plain.out.splitlines() if line.startswith("sequence")]
    assert tokens and tokens == [line for line in spec.out.splitlines()
                                 if line.startswith("sequence")]
    for bad in (["--draft-tokens", "2"], ["--speculative", "mtp", "--temperature", "0.5"]):
        with pytest.raises(SystemExit):
            main(args + bad)
