"""rms_norm, apply_rope and the MLA cache write at DeepSeek-V3's sizes (rows of op "norm_rope";
shape["kernel"] tells them apart).

- rms_norm: the hidden norm (D = 7168) against transformers' DeepseekV3RMSNorm (the baseline),
  torch.nn.functional.rms_norm (one fused op; it rounds once where transformers rounds twice)
  and the reference.
- apply_rope: q's rope part [T, H, 64], interleaved (DeepSeek's layout), against the reference
  and transformers' apply_rotary_pos_emb_interleave (the baseline; given q and a one-head k,
  and compared after undoing its de-interleaving permutation).
- mla_cache_write: DeepSeek-V3's latent (Dc = 512) and k_pe (Dr = 64) into a cache of
  64-row blocks: the fused op against the same three steps as separate ds_kernels ops (the
  baseline) and the reference (a Python loop over tokens: up to REFERENCE_MAX_T).
- index_cache_write: DeepSeek-V3.2's index key (Di = 128, the first 64 columns rotated
  non-interleaved) LayerNorm'd, rotated and written into 64-row blocks, fused, against
  torch's layer_norm + ds_kernels' apply_rope + an indexed copy (the baseline: what
  transformers computes, into pages) and the reference.
CPU: fp32, H = 16; CUDA: bf16, H = 128 (one GPU's heads without tensor parallelism). Each
impl's output is checked against ds_kernels' before it is timed. "torch.compile(reference)"
runs on CUDA and in full CPU runs.
"""

import torch
import torch.nn.functional as F

from bench.harness import Impl, Row, assert_close, compare, working
from ds_kernels import rope
from ds_kernels.ops.apply_rope import apply_rope
from ds_kernels.ops.index_cache_write import index_cache_write
from ds_kernels.ops.mla_cache_write import mla_cache_write, mla_cache_write_fused
from ds_kernels.ops.rms_norm import rms_norm
from ds_kernels.reference.apply_rope import apply_rope as reference_apply_rope
from ds_kernels.reference.index_cache_write import (
    index_cache_write as reference_index_cache_write)
from ds_kernels.reference.mla_cache_write import (
    mla_cache_write_fused as reference_mla_cache_write_fused)
from ds_kernels.reference.rms_norm import rms_norm as reference_rms_norm

OP = "norm_rope"
TOKENS = (1, 256, 4096)
HIDDEN, DC, DR, BLOCK_SIZE, EPS = 7168, 512, 64, 64, 1e-6
DI = 128                                      # DeepSeek-V3.2's index_head_dim
HEADS = {"cpu": 16, "cuda": 128}
REFERENCE_MAX_T = 256
V3_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
# Relative (norm-wise) error allowed against ds_kernels: rounding order only, in each dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def run(device: torch.device, quick: bool) -> list[Row]:
    kind = "cuda" if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    with_compile = kind == "cuda" or not quick
    g = torch.Generator(device=device).manual_seed(0)
    inv_freq = rope.rope_frequencies(DR, 10000.0, V3_YARN)
    rows = []
    with torch.inference_mode():
        for T in TOKENS:
            positions = torch.randint(0, 163840, (T,), generator=g, device=device)
            cos, sin = rope.rope_cos_sin(positions, inv_freq)                # [T, 32] fp32
            timing = dict(warmup=1) if kind == "cpu" and T >= 1024 else {}
            rows += _bench_rms_norm(T, g, dtype, with_compile, timing)
            rows += _bench_apply_rope(T, HEADS[kind], g, dtype, cos, sin, with_compile, timing)
            rows += _bench_cache_write(T, g, dtype, cos, sin, timing)
            rows += _bench_index_cache_write(T, g, dtype, cos, sin, timing)
    return rows


def _checker(what, dtype, want):
    def check(name, got):
        assert_close(f"{OP} {what} {name} vs ds_kernels", got, want, TOLERANCE[dtype])
    return check


def _bench_rms_norm(T, g, dtype, with_compile, timing):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    device = g.device
    x = torch.randn(T, HIDDEN, generator=g, device=device, dtype=dtype)
    hf = DeepseekV3RMSNorm(HIDDEN, eps=EPS).to(device, dtype)
    hf.weight.data.normal_(1.0, 0.2, generator=g)
    weight = hf.weight.detach()
    shape = dict(T=T, kernel="rms_norm", D=HIDDEN)
    ds_impl = Impl("ds_kernels", lambda x: rms_norm(x, weight, EPS))
    others = [Impl("transformers", hf),
              Impl("F.rms_norm", lambda x: F.rms_norm(x, (HIDDEN,), weight, EPS)),
              Impl("reference", lambda x: reference_rms_norm(x, weight, EPS))]
    if with_compile:
        compiled = torch.compile(reference_rms_norm, dynamic=False)
        others.append(Impl("torch.compile(reference)", lambda x: compiled(x, weight, EPS)))
    want = ds_impl(x)
    impls = [ds_impl] + working(others, (x,), _checker("rms_norm", dtype, want), op=OP,
                                shape=shape)
    return compare(impls, (x,), op=OP, shape=shape, dtype=dtype, device=device, tokens=T,
                   baseline="transformers", nbytes=2 * x.nbytes + weight.nbytes, **timing)


def _bench_apply_rope(T, H, g, dtype, cos, sin, with_compile, timing):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        apply_rotary_pos_emb_interleave)

    device = g.device
    # The rope part of q [T, H, 192]: strided rows, as the attention hands it over.
    x = torch.randn(T, H, 128 + DR, generator=g, device=device, dtype=dtype)[..., 128:]
    # transformers' tables: cat(freqs, freqs), in the activations' dtype, [1, T, 64].
    cos_hf = torch.cat([cos, cos], dim=-1).to(dtype).unsqueeze(0)
    sin_hf = torch.cat([sin, sin], dim=-1).to(dtype).unsqueeze(0)
    k_hf = torch.randn(1, 1, T, DR, generator=g, device=device, dtype=dtype)
    deinterleave = torch.cat([torch.arange(0, DR, 2), torch.arange(1, DR, 2)]).to(device)

    def transformers(x):
        q, _ = apply_rotary_pos_emb_interleave(x.transpose(0, 1).unsqueeze(0), k_hf, cos_hf,
                                               sin_hf)
        return q                                                  # [1, H, T, 64], de-interleaved

    shape = dict(T=T, kernel="apply_rope", H=H, D=DR)
    ds_impl = Impl("ds_kernels", lambda x: apply_rope(x, cos, sin, interleaved=True))
    others = [Impl("transformers", transformers),
              Impl("reference", lambda x: reference_apply_rope(x, cos, sin, True))]
    if with_compile:
        compiled = torch.compile(reference_apply_rope, dynamic=False)
        others.append(Impl("torch.compile(reference)", lambda x: compiled(x, cos, sin, True)))
    want = ds_impl(x)
    check = _checker("apply_rope", dtype, want)
    reinterleave = _inverse(deinterleave)

    def check_layout(name, got):
        if name == "transformers":
            got = got[0].transpose(0, 1)[..., reinterleave]       # [T, H, 64], interleaved
        check(name, got)

    impls = [ds_impl] + working(others, (x,), check_layout, op=OP, shape=shape)
    return compare(impls, (x,), op=OP, shape=shape, dtype=dtype, device=device, tokens=T,
                   baseline="transformers", nbytes=2 * want.nbytes + cos.nbytes + sin.nbytes,
                   **timing)


def _inverse(permutation):
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(len(permutation), device=permutation.device)
    return inverse


def _bench_cache_write(T, g, dtype, cos, sin, timing):
    device = g.device
    compressed = torch.randn(T, DC + DR, generator=g, device=device, dtype=dtype)  # kv_a_proj
    kv_latent, k_pe = compressed[:, :DC], compressed[:, DC:]
    weight = torch.empty(DC, device=device, dtype=dtype).normal_(1.0, 0.2, generator=g)
    num_blocks = -(-T // BLOCK_SIZE) + 1
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g, device=device)[:T]
    kv_cache = torch.zeros(num_blocks, BLOCK_SIZE, DC + DR, device=device, dtype=dtype)

    def unfused(kv_latent, k_pe):
        latent = rms_norm(kv_latent, weight, EPS)
        rotated = apply_rope(k_pe, cos, sin, interleaved=True)
        mla_cache_write(latent, rotated, kv_cache, slots)
        return latent, rotated

    shape = dict(T=T, kernel="mla_cache_write", D=DC + DR)
    ds_impl = Impl("ds_kernels", lambda kv_latent, k_pe: mla_cache_write_fused(
        kv_latent, k_pe, weight, EPS, cos, sin, kv_cache, slots))
    others = [Impl("ds_kernels unfused", unfused)]
    if T <= REFERENCE_MAX_T:
        others.append(Impl("reference", lambda kv_latent, k_pe: reference_mla_cache_write_fused(
            kv_latent, k_pe, weight, EPS, cos, sin, kv_cache, slots, True)))
    args = (kv_latent, k_pe)
    want = ds_impl(*args)
    written = kv_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE]  # a copy: ds_kernels' rows
    check = _checker("mla_cache_write", dtype, want)

    def check_with_cache(name, got):
        check(name, got)
        assert_close(f"{OP} mla_cache_write {name} cache rows vs ds_kernels",
                     kv_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE], written, TOLERANCE[dtype])

    impls = [ds_impl] + working(others, args, check_with_cache, op=OP, shape=shape)
    # Read the inputs; write the two outputs and the cache rows.
    nbytes = 3 * compressed.nbytes + cos.nbytes + sin.nbytes + slots.nbytes
    return compare(impls, args, op=OP, shape=shape, dtype=dtype, device=device, tokens=T,
                   baseline="ds_kernels unfused", nbytes=nbytes, **timing)


def _bench_index_cache_write(T, g, dtype, cos, sin, timing):
    device = g.device
    k = torch.randn(T, DI, generator=g, device=device, dtype=dtype)           # wk(x)
    weight = torch.empty(DI, device=device, dtype=dtype).normal_(1.0, 0.2, generator=g)
    bias = torch.empty(DI, device=device, dtype=dtype).normal_(0.0, 0.2, generator=g)
    num_blocks = -(-T // BLOCK_SIZE) + 1
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g, device=device)[:T]
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, DI, device=device, dtype=dtype)
    rows = k_cache.view(-1, DI)

    def unfused(k):
        normed = F.layer_norm(k, (DI,), weight, bias, EPS)
        rotated = apply_rope(normed[:, :DR], cos, sin, interleaved=False)
        rows.index_copy_(0, slots, torch.cat([rotated, normed[:, DR:]], dim=1))

    shape = dict(T=T, kernel="index_cache_write", D=DI)
    ds_impl = Impl("ds_kernels", lambda k: index_cache_write(k, weight, bias, EPS, cos, sin,
                                                              k_cache, slots))
    others = [Impl("torch unfused", unfused)]
    if T <= REFERENCE_MAX_T:
        others.append(Impl("reference", lambda k: reference_index_cache_write(
            k, weight, bias, EPS, cos, sin, k_cache, slots, False)))
    ds_impl(k)
    written = rows[slots].clone()                                # ds_kernels' rows
    rows.zero_()  # each impl must write its rows itself

    def check(name, _):
        assert_close(f"{OP} index_cache_write {name} cache rows vs ds_kernels", rows[slots],
                     written, TOLERANCE[dtype])
        rows.zero_()

    impls = [ds_impl] + working(others, (k,), check, op=OP, shape=shape)
    # Read the keys and tables; write the rows.
    nbytes = 2 * k.nbytes + cos.nbytes + sin.nbytes + slots.nbytes
    return compare(impls, (k,), op=OP, shape=shape, dtype=dtype, device=device, tokens=T,
                   baseline="torch unfused", nbytes=nbytes, **timing)
