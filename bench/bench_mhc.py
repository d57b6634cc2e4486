"""mhc: one V4 block's hyper-connections (mhc_pre, then mhc_post on a stand-in block output)
against transformers' DeepseekV4HyperConnection and its decoder layer's mix, on the same
fp32 hc parameters; and the reference.

DeepSeek-V4-Flash's widths: hc_mult n = 4 streams of D = 4096, 20 Sinkhorn rounds; tokens
T = 1 (a decode step), 16, 256, 4096. Bytes: the streams read twice by mhc_pre (the mixes,
then the collapse; fn's 24 x 16K fp32 once) and once by mhc_post, the new streams written. On a
GPU the fused kernels are two launches where transformers runs ~50 small ops; on this CPU the
torch path is transformers' own arithmetic, so the rows show the op layer's overhead, not a
fusion.
"""

import torch

import ds_kernels
from bench.harness import Impl, Row, assert_close, compare

N, D, ITERS, EPS = 4, 4096, 20, 1e-6
TOKENS = (1, 16, 256, 4096)
QUICK_TOKENS = (1, 256)
BASELINE = "transformers"


def run(device: torch.device, quick: bool) -> list[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    m = (2 + N) * N
    fn = (torch.randn(m, N * D, generator=g) * 0.02).to(device)     # [24, nD] fp32
    base = (torch.randn(m, generator=g) * 0.1).to(device)
    scale = torch.rand(3, generator=g).to(device)
    hf = _hf_block(device, fn, base, scale)
    impls = [Impl(BASELINE, hf), Impl("ds_kernels", _ours(fn, base, scale)),
             Impl("reference", _ours(fn, base, scale), backend="reference")]
    rows = []
    with torch.inference_mode():
        for T in QUICK_TOKENS if quick else TOKENS:
            streams = torch.randn(T, N, D, generator=g).to(device, dtype)   # [T, n, D]
            assert_close(f"mhc T={T}: ds_kernels vs transformers", impls[1](streams).float(),
                         hf(streams).float(), 1e-4 if dtype == torch.float32 else 3e-2)
            rows += compare(impls, (streams,), op="mhc", shape=dict(T=T, n=N, D=D), dtype=dtype,
                            device=device, tokens=T, baseline=BASELINE,
                            nbytes=4 * streams.nbytes + fn.nbytes)
    return rows


def _ours(fn, base, scale):
    def block(streams):                                            # [T, n, D]
        collapsed, post, comb = ds_kernels.mhc_pre(streams, fn, base, scale, norm_eps=EPS,
                                                   hc_eps=EPS, sinkhorn_iters=ITERS)
        return ds_kernels.mhc_post(streams, collapsed, post, comb)  # the collapse as "output"
    return block


def _hf_block(device, fn, base, scale):
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    config = DeepseekV4Config(hidden_size=D, hc_mult=N, hc_sinkhorn_iters=ITERS, hc_eps=EPS,
                              rms_norm_eps=EPS, num_hidden_layers=1)
    hc = DeepseekV4HyperConnection(config).to(device)
    with torch.no_grad():
        hc.fn.copy_(fn), hc.base.copy_(base), hc.scale.copy_(scale)

    def block(streams):
        # DeepseekV4DecoderLayer's mix around its attention, the collapse standing for it.
        post, comb, collapsed = hc(streams[None])
        dtype = streams.dtype
        return (post.to(dtype).unsqueeze(-1) * collapsed.unsqueeze(-2)
                + torch.matmul(comb.to(dtype).transpose(-1, -2), streams[None]))[0]
    return block

