"""The wire formats of expert-parallel dispatch: how a layer's token rows travel to the ranks
holding their experts. A format encodes rows [N, H] into tensors of N rows each (each sent by
its own all_to_all_single with the rows' splits) and decodes what arrives.

- "native": the rows as they are: 2 H bytes a row in a bf16 model.
- "fp8": DeepSeek's activation recipe (act_quant; DeepEP's FP8 dispatch layout): e4m3 codes per
  token and 128 columns, plus one fp32 scale a group: H + 4 ceil(H / 128) bytes a row, 7392 for
  DeepSeek-V3's H = 7168, 0.52 of bf16's 14336. Lossy: the experts see the rows quantised
  (to within half an e4m3 step, ~3%); gradients pass it straight through.

The combine (results back to the tokens' ranks) is always native, as DeepEP's is (bf16): the
results are summed with the routing weights there. Another format is an object with encode,
decode and row_bytes (EPExperts takes one by name or as such an object); a transport of its own
(DeepEP's NVLink/RDMA kernels) would replace the all_to_all_single calls, not the formats.
"""

import math

import torch

from ds_kernels.cpu.quantize import dequantize_fp8_activations, quantize_fp8_activations
from ds_kernels.quant_formats import FP8_BLOCK, FP8_DTYPE


class NativeWire:
    name = "native"

    def encode(self, rows):                                       # [N, H]
        return (rows,)

    def decode(self, parts, dtype):
        return parts[0]

    def row_bytes(self, hidden_size: int, dtype: torch.dtype) -> int:
        return hidden_size * dtype.itemsize


class FP8Wire:
    name = "fp8"

    def encode(self, rows):                                       # [N, H]
        codes, scale = quantize_fp8_activations(rows)             # [N, H] e4m3, [N, H/128]
        return codes.view(torch.uint8), scale  # gloo and NCCL carry no float8 dtype

    def decode(self, parts, dtype):
        codes, scale = parts
        return dequantize_fp8_activations(codes.view(FP8_DTYPE), scale).to(dtype)

    def row_bytes(self, hidden_size: int, dtype: torch.dtype) -> int:
        return hidden_size + 4 * math.ceil(hidden_size / FP8_BLOCK)


WIRES = {wire.name: wire for wire in (NativeWire(), FP8Wire())}


def wire_of(wire):
    """The format named ``wire`` (a WIRES key), or ``wire`` itself if it is a format object."""
    if isinstance(wire, str):
        if wire not in WIRES:
            raise ValueError(f"unknown expert-parallel wire format {wire!r}; known: "
                             f"{sorted(WIRES)} (or an object with encode, decode and row_bytes)")
        return WIRES[wire]
    missing = [m for m in ("encode", "decode", "row_bytes") if not callable(getattr(wire, m, None))]
    if missing:
        raise TypeError(f"wire format {wire!r} lacks {missing}: pass a name in {sorted(WIRES)} "
                        "or an object with encode, decode and row_bytes")
    return wire
