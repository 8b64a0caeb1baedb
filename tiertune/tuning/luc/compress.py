"""A frozen linear kept compressed: low-bit codes with group scales, optionally pruned.

A weight of shape (out, in) compressed to ``bits`` bits at ``sparsity`` s keeps the ``k = in - round(s*in)``
largest-magnitude weights of each row (the same count in every row, so every row packs to the same bytes)
and quantizes them in groups of ``group_size`` consecutive kept weights, each group with its own scale and
minimum (asymmetric, round to nearest). Two tensors hold it, both frozen parameters so that the offload
engine stores and moves them like any weight, in the block's flats:

- ``packed`` (uint8, ``(out, row_bytes)``): per row, ``bits`` bit planes of the ``k`` codes (plane b holds
  bit b of every code, eight codes a byte), then, when pruned, the row's keep mask (one bit a weight);
- ``meta`` (the weights' float dtype, ``(out, groups, 2)``): each group's scale and minimum.

Bit planes pack any width from 1 to 8 with the same code: 3 bits cost exactly 3/8 of a byte a weight.
The forward dequantizes on the fly (:class:`CompressedLinear`); its autograd saves ``packed`` and ``meta``,
not the dequantized weight, so backward holds compressed bytes (and the streamer refetches them like any
weight view).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

BITS = (1, 2, 3, 4, 5, 6, 7, 8)
_SHIFTS = torch.arange(8, dtype=torch.uint8)


@dataclass(frozen=True)
class Setting:
    """How one layer's linears are compressed."""

    bits: int  # code width; 16 means "left as it is" (no quantization, no pruning)
    sparsity: float = 0.0  # share of each row's weights pruned (set to zero), 0 <= s < 1

    def __post_init__(self) -> None:
        if self.bits != 16 and self.bits not in BITS:
            raise ValueError(f"bits must be 1..8 or 16, not {self.bits}")
        if not 0.0 <= self.sparsity < 1.0 or (self.bits == 16 and self.sparsity):
            raise ValueError(f"sparsity must be in [0, 1), and 0 for 16 bits: {self.sparsity}")

    @property
    def label(self) -> str:
        return (
            "bf16/fp32"
            if self.bits == 16
            else f"{self.bits}b" + (f" s={self.sparsity:g}" if self.sparsity else "")
        )


@dataclass(frozen=True)
class Layout:
    """The packed shapes of one (out, in) weight under a :class:`Setting`."""

    out_features: int
    in_features: int
    bits: int
    kept: int  # weights kept per row
    group_size: int

    @property
    def groups(self) -> int:
        return math.ceil(self.kept / self.group_size)

    @property
    def plane_bytes(self) -> int:  # one bit plane of a row: the kept codes padded to whole groups
        return math.ceil(self.groups * self.group_size / 8)

    @property
    def mask_bytes(self) -> int:
        return 0 if self.kept == self.in_features else math.ceil(self.in_features / 8)

    @property
    def row_bytes(self) -> int:
        return self.bits * self.plane_bytes + self.mask_bytes

    def nbytes(self, meta_itemsize: int) -> int:
        """Stored bytes: the packed rows plus two ``meta_itemsize``-byte numbers a group."""
        return self.out_features * (self.row_bytes + 2 * self.groups * meta_itemsize)


def layout(out_features: int, in_features: int, setting: Setting, group_size: int) -> Layout:
    kept = in_features - round(setting.sparsity * in_features)
    return Layout(out_features, in_features, setting.bits, max(kept, 1), group_size)


def _pack_bits(bits01: torch.Tensor) -> torch.Tensor:
    """(..., n*8) of 0/1 (uint8) -> (..., n) bytes, bit j of a byte from element j."""
    return (bits01.view(*bits01.shape[:-1], -1, 8) << _SHIFTS).sum(-1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`, the first ``n`` elements."""
    return ((packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1).flatten(-2)[..., :n]


# Byte x -> the int64 whose byte j is bit j of x: one lookup spreads a byte of a bit plane over the eight
# codes it belongs to, so a plane is unpacked with one gather, one shift and one OR per eight codes.
_SPREAD = (
    ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.uint8).contiguous().view(torch.int64)
)
_SPREAD_ON: dict[torch.device, torch.Tensor] = {}


def _unpack_codes(planes: torch.Tensor, bits: int, plane_bytes: int) -> torch.Tensor:
    """(out, bits * plane_bytes) bit planes -> (out, plane_bytes * 8) uint8 codes."""
    spread = _SPREAD_ON.get(planes.device)
    if spread is None:
        spread = _SPREAD_ON.setdefault(planes.device, _SPREAD.view(256).to(planes.device))
    codes = spread[planes[:, :plane_bytes].long()]
    for b in range(1, bits):
        codes |= spread[planes[:, b * plane_bytes : (b + 1) * plane_bytes].long()] << b
    return codes.view(torch.uint8)  # little-endian: byte j of each int64 is code j of its eight


def compress(
    weight: torch.Tensor, setting: Setting, group_size: int, meta_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (out, in) -> (packed, meta) as :class:`CompressedLinear` holds them. The scales are rounded
    to ``meta_dtype`` before the codes are chosen, so the codes are the nearest under the stored scales."""
    w = weight.detach().float()
    lay = layout(*w.shape, setting, group_size)
    out = w.shape[0]
    if lay.kept < lay.in_features:  # magnitude pruning, row by row: keep the k largest |w|, in place order
        top = w.abs().topk(lay.kept, dim=1).indices.sort(dim=1).values
        mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, top, True)
        values = w.gather(1, top)
    else:
        mask, values = None, w
    padded = lay.groups * lay.group_size
    if padded > lay.kept:  # the last group is padded with copies of the row's last value (no range added)
        values = torch.cat([values, values[:, -1:].expand(out, padded - lay.kept)], dim=1)
    groups = values.view(out, lay.groups, lay.group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    levels = 2**setting.bits - 1
    scale = ((high - low) / levels).to(meta_dtype)
    low = low.to(meta_dtype)
    s, m = scale.float().unsqueeze(-1), low.float().unsqueeze(-1)
    codes = torch.where(s > 0, ((groups - m) / s.clamp_min(torch.finfo(torch.float32).tiny)).round(), 0.0)
    codes = codes.clamp_(0, levels).to(torch.uint8).view(out, padded)
    pad8 = lay.plane_bytes * 8 - padded
    if pad8:
        codes = F.pad(codes, (0, pad8))
    planes = [_pack_bits((codes >> b) & 1) for b in range(setting.bits)]
    if mask is not None:
        planes.append(_pack_bits(F.pad(mask.to(torch.uint8), (0, lay.mask_bytes * 8 - lay.in_features))))
    packed = torch.cat(planes, dim=1)
    meta = torch.stack([scale, low], dim=-1)
    return packed, meta


def decompress(packed: torch.Tensor, meta: torch.Tensor, lay: Layout, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in ``dtype`` that (packed, meta) stand for (pruned weights are exactly 0)."""
    out, padded = lay.out_features, lay.groups * lay.group_size
    codes = _unpack_codes(packed, lay.bits, lay.plane_bytes)[:, :padded]
    scale, low = meta.float().unbind(-1)
    values = torch.addcmul(
        low.unsqueeze(-1), codes.reshape(out, lay.groups, lay.group_size).float(), scale.unsqueeze(-1)
    )
    values = values.view(out, padded)[:, : lay.kept]
    if lay.mask_bytes == 0:
        return values.to(dtype)
    mask = _unpack_bits(packed[:, lay.bits * lay.plane_bytes :], lay.in_features).bool()
    weight = torch.zeros(out, lay.in_features, dtype=torch.float32, device=packed.device)
    return weight.masked_scatter_(mask, values).to(dtype)  # row-major: each row takes its k values in order


class _CompressedMatmul(torch.autograd.Function):
    """y = x W^T with W decompressed on the fly, in forward and again in backward: the graph saves the
    compressed tensors, never the full weight (which would be the layer's whole weight, per linear)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor, lay: Layout) -> torch.Tensor:  # noqa: ANN001
        ctx.lay = lay
        ctx.save_for_backward(packed, meta)
        return x @ decompress(packed, meta, lay, x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        packed, meta = ctx.saved_tensors
        return grad @ decompress(packed, meta, ctx.lay, grad.dtype), None, None, None


class CompressedLinear(nn.Module):
    """A frozen ``nn.Linear`` replacement holding its weight compressed (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        setting: Setting,
        group_size: int,
        *,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if setting.bits == 16:
            raise ValueError("16 bits means uncompressed: keep the nn.Linear")
        self.in_features, self.out_features = in_features, out_features
        self.setting, self.group_size = setting, group_size
        self.layout = layout(out_features, in_features, setting, group_size)
        lay = self.layout
        self.packed = nn.Parameter(
            torch.empty(out_features, lay.row_bytes, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.meta = nn.Parameter(
            torch.empty(out_features, lay.groups, 2, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, setting: Setting, group_size: int, dtype: torch.dtype | None = None
    ) -> CompressedLinear:
        """Compress ``linear``'s weight, scales in ``dtype`` (default the weight's); on the meta device only
        the shapes (the engine fills them in from the weights' source, see :class:`CompressedSource`)."""
        w = linear.weight
        made = cls(
            linear.in_features,
            linear.out_features,
            setting,
            group_size,
            bias=linear.bias is not None,
            dtype=dtype or w.dtype,
            device=w.device,
        )
        if not w.is_meta:
            packed, meta = compress(w, setting, group_size, made.meta.dtype)
            made.packed.data.copy_(packed)
            made.meta.data.copy_(meta)
            if linear.bias is not None:
                made.bias.data.copy_(linear.bias.detach())
        return made

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new tensor: for merging and inspection, not for the forward)."""
        return decompress(self.packed, self.meta, self.layout, self.meta.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _CompressedMatmul.apply(x, self.packed, self.meta, self.layout)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.setting.label}, "
            f"group_size={self.group_size}"
        )
