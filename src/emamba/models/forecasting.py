"""EMamba-TS: SiMBA for multivariate long-horizon forecasting.

The paper (Section 3 and Table 3) mixes the sequence with Mamba and the channels with EinFFT but released
no forecasting code or configuration. This design follows what works on the ETT / Weather benchmarks:

* **RevIN** (Kim et al., ICLR 2022): each input window is normalised per variate and the forecast is
  de-normalised with the same statistics, which removes the level shift between train and test years.
* **Tokenisation** (``tokenization``):
  ``"patch"`` (default, PatchTST-style, channel independent): each variate's look-back is cut into
  overlapping patches of ``patch_len`` steps (``stride`` apart, the end padded by ``stride`` repeats of the
  last value), every patch is linearly embedded, and Mamba scans the patch sequence of one variate;
  ``"variate"`` (iTransformer-style): one token per variate, its whole look-back embedded, and Mamba scans
  across the variates, so variables interact. With ``time_tokens`` the look-back's calendar features (hour,
  weekday, ...) become extra tokens in front of the variates (iTransformer's use of ``x_mark``).
* A stack of ``e_layers`` EMamba blocks: x + Dropout(Mamba(LN x)), then x + Dropout(EinFFT(LN x)).
* A final LayerNorm and a linear head to ``pred_len`` steps per variate.
* Optionally (``cycle_len`` > 0) a **learned recurring cycle** per variate (the residual cycle forecasting of
  CycleNet, Lin et al., NeurIPS 2024): a table of ``cycle_len`` values per variate, indexed by each step's
  phase in the cycle (e.g. hour of day: ``cycle_len`` 24 for hourly data), is subtracted from the
  normalised look-back and added back to the forecast, so the blocks model only what the daily (or weekly)
  pattern does not explain. The phase comes from the data (the window's absolute row index modulo
  ``cycle_len``, see ``TimeSeriesDataset(cycle_len=...)``), passed as ``cycle_index``.

* Optionally (``decomp_kernel`` > 0) a **series decomposition** (Autoformer / DLinear): a centred moving
  average of the normalised look-back is its trend, which a linear map extrapolates to the horizon; the
  blocks see only the rest (the seasonal part), so they need not model a slow drift from 96 steps.

The linear path, the cycle and RevIN form a linear forecaster of their own (RLinear / CycleNet-Linear),
which ``forward(..., linear_only=True)`` runs without the blocks: ``emamba forecast --linear_epochs`` fits
it first (``linear_parameters``), then trains the whole model from it after ``zero_head``.

``Model(configs)`` wraps it with Time-Series-Library's four-tensor forward so that EMamba-TS drops into that
library (``models/EMamba.py: from emamba.models.forecasting import Model``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..layers import EinFFT, MambaMixer

__all__ = ["EMambaTS", "EMambaTSBlock", "Model", "RevIN", "TOKENIZATIONS"]

TOKENIZATIONS = ("patch", "variate")


class RevIN(nn.Module):
    """Reversible instance normalisation over the time axis of (B, L, C) windows.

    ``normalize`` returns the normalised window and the statistics that ``denormalize`` needs, instead of
    storing them on the module, so one module can be shared safely (and traced) across calls.
    ``affine`` adds a learnable per-variate scale and shift; ``subtract_last`` centres each window on its
    last value instead of its mean (PatchTST's two RevIN options, there off by default).
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, affine: bool = True, subtract_last: bool = False
    ) -> None:
        super().__init__()
        self.num_features, self.eps, self.affine, self.subtract_last = num_features, eps, affine, subtract_last
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def normalize(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        mean = (x[:, -1:, :] if self.subtract_last else x.mean(dim=1, keepdim=True)).detach()
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
        x = (x - mean) / std
        if self.affine:
            x = x * self.weight + self.bias
        return x, (mean, std)

    def denormalize(self, x: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
        mean, std = stats
        if self.affine:
            x = (x - self.bias) / (self.weight + self.eps * self.eps)
        return x * std + mean

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, subtract_last={self.subtract_last}"


class EMambaTSBlock(nn.Module):
    """Pre-norm residual block: x + Dropout(Mamba(LN x)), then x + Dropout(EinFFT(LN x)).

    ``d_ff`` is the inner width of the Mamba mixer (its expand = d_ff / d_model): EinFFT keeps the width,
    so Mamba's gated inner projection is the block's only expansion, like a Transformer's FFN width.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        d_state: int = 16,
        d_conv: int = 4,
        bidirectional: bool = False,
        einfft_blocks: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        # +0.5 so that int(expand * d_model) inside MambaMixer is exactly d_ff despite float rounding.
        expand = (d_ff + 0.5) / d_model
        self.token_mixer = MambaMixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=bidirectional)
        self.norm2 = nn.LayerNorm(d_model)
        self.channel_mixer = EinFFT(d_model, num_blocks=einfft_blocks)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.token_mixer(self.norm1(x)))
        return x + self.drop(self.channel_mixer(self.norm2(x)))


class EMambaTS(nn.Module):
    """EMamba forecaster: (B, seq_len, enc_in) look-back -> (B, pred_len, c_out) forecast.

    Args:
        seq_len, pred_len: look-back and horizon lengths.
        enc_in: number of input variates.
        c_out: number of output variates; the last ``c_out`` input variates are forecast (TSLib puts the
            target last, so ``c_out=1`` is the MS setting). Defaults to ``enc_in``.
        tokenization: ``"patch"`` (PatchTST-style, channel independent) or ``"variate"`` (one token per
            variate, iTransformer-style).
        patch_len, stride: patch size and step (``patch`` only).
        d_model: token width (multiple of ``einfft_blocks``).
        e_layers: number of EMamba blocks.
        d_ff: inner width of the Mamba mixer (default 2 * d_model, Mamba's expand=2).
        d_state, d_conv, bidirectional: Mamba state size, causal conv width, and a reverse-direction branch.
        einfft_blocks: channel blocks of EinFFT's block-diagonal complex weights.
        dropout: after the embedding and on every residual branch.
        head_dropout: before the linear head.
        revin: reversible instance normalisation of every input window.
        revin_affine, subtract_last: RevIN's learnable per-variate scale and shift, and centring on the
            window's last value instead of its mean (see :class:`RevIN`).
        cycle_len: length of the learned recurring cycle in steps (0: off). ``forward`` then needs
            ``cycle_index``, the phase of each window's first step.
        linear_skip: add a linear map from the (normalised) look-back to the horizon, shared by the
            variates, to the head's forecast: RLinear (Li et al., 2023) as a residual path, so the blocks
            learn what a linear forecaster misses. It starts at zero, i.e. from the plain model.
        decomp_kernel: moving-average window of the series decomposition (0: off; odd, DLinear uses 25). The
            trend's linear map starts as DLinear's (every weight 1 / seq_len: the trend's mean, held).
        time_tokens: (``variate`` only) embed each calendar feature of the look-back (``x_mark``, TSLib's
            time features) as one more token, with the variates' embedding, *in front of* the variates: Mamba
            scans forwards, so tokens placed after the variates would reach them only through EinFFT's
            mixing. The forecast is read from the variate tokens only. ``forward`` then needs ``x_mark``.
    """

    def __init__(
        self,
        seq_len: int,
        pred_len: int,
        enc_in: int,
        c_out: Optional[int] = None,
        tokenization: str = "patch",
        patch_len: int = 16,
        stride: int = 16,
        d_model: int = 32,
        e_layers: int = 1,
        d_ff: Optional[int] = None,
        d_state: int = 8,
        d_conv: int = 4,
        bidirectional: bool = False,
        einfft_blocks: int = 4,
        dropout: float = 0.1,
        head_dropout: float = 0.0,
        revin: bool = True,
        revin_affine: bool = True,
        subtract_last: bool = False,
        cycle_len: int = 0,
        linear_skip: bool = False,
        time_tokens: bool = False,
        decomp_kernel: int = 0,
    ) -> None:
        super().__init__()
        c_out = enc_in if c_out is None else c_out
        d_ff = 2 * d_model if d_ff is None else d_ff
        if tokenization not in TOKENIZATIONS:
            raise ValueError(f"tokenization must be one of {TOKENIZATIONS}, got {tokenization!r}")
        if min(seq_len, pred_len, enc_in, c_out, d_model, e_layers, d_ff) <= 0:
            raise ValueError("seq_len, pred_len, enc_in, c_out, d_model, e_layers and d_ff must be positive")
        if cycle_len < 0:
            raise ValueError(f"cycle_len must be >= 0 (0: no learned cycle), got {cycle_len}")
        if c_out > enc_in:
            raise ValueError(f"c_out={c_out} > enc_in={enc_in}: the model forecasts a subset of its input variates")
        if d_model % einfft_blocks:
            raise ValueError(f"d_model={d_model} must be divisible by einfft_blocks={einfft_blocks} (EinFFT)")
        self.seq_len, self.pred_len, self.enc_in, self.c_out = seq_len, pred_len, enc_in, c_out
        self.tokenization = tokenization
        if time_tokens and tokenization != "variate":
            raise ValueError("time_tokens needs tokenization='variate' (calendar features become variate-like tokens)")
        self.time_tokens = time_tokens
        if decomp_kernel < 0 or (decomp_kernel and (decomp_kernel % 2 == 0 or decomp_kernel > seq_len)):
            raise ValueError(
                f"decomp_kernel must be 0 (off) or an odd window <= seq_len={seq_len}, got {decomp_kernel}"
            )
        self.decomp_kernel = decomp_kernel

        self.revin = RevIN(enc_in, affine=revin_affine, subtract_last=subtract_last) if revin else None
        self.cycle_len = cycle_len
        # Zeros: training starts from the plain model and learns the cycle only as far as it helps.
        self.cycle = nn.Parameter(torch.zeros(cycle_len, enc_in)) if cycle_len else None
        if tokenization == "patch":
            if patch_len <= 0 or stride <= 0:
                raise ValueError(f"patch_len and stride must be positive, got {patch_len} and {stride}")
            if patch_len > seq_len + stride:
                raise ValueError(f"patch_len={patch_len} is longer than seq_len + stride = {seq_len + stride}")
            self.patch_len, self.stride = patch_len, stride
            self.num_tokens = (seq_len + stride - patch_len) // stride + 1
            self.embed = nn.Linear(patch_len, d_model)
            self.pos_embed = nn.Parameter(torch.empty(1, self.num_tokens, d_model).uniform_(-0.02, 0.02))
            head_in = self.num_tokens * d_model
        else:
            self.num_tokens = enc_in
            self.embed = nn.Linear(seq_len, d_model)
            self.pos_embed = None
            head_in = d_model
        self.embed_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            EMambaTSBlock(d_model, d_ff, d_state, d_conv, bidirectional, einfft_blocks, dropout) for _ in range(e_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head_drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(head_in, pred_len)
        self.skip = None
        if linear_skip:  # zeros, like the cycle: training starts from the plain model
            self.skip = nn.Linear(seq_len, pred_len)
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)
        self.trend_head = None
        if decomp_kernel:
            self.trend_head = nn.Linear(seq_len, pred_len)
            nn.init.constant_(self.trend_head.weight, 1.0 / seq_len)
            nn.init.zeros_(self.trend_head.bias)

    def _tokens(self, x: Tensor) -> Tensor:
        """(B, L, C) -> (B * C, num_patches, d_model) or (B, C, d_model)."""
        x = x.transpose(1, 2)  # (B, C, L)
        if self.tokenization == "variate":
            return self.embed(x)
        x = F.pad(x, (0, self.stride), mode="replicate")
        patches = x.unfold(-1, self.patch_len, self.stride)  # (B, C, N, P)
        tokens = self.embed(patches) + self.pos_embed.unsqueeze(0)
        return tokens.flatten(0, 1)

    def decompose(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, C) -> (seasonal, trend): the trend is the centred moving average of ``decomp_kernel`` steps,
        the ends padded with repeats of the first and last value (Autoformer's ``series_decomp``)."""
        half = self.decomp_kernel // 2
        padded = F.pad(x.transpose(1, 2), (half, half), mode="replicate")
        trend = F.avg_pool1d(padded, self.decomp_kernel, stride=1).transpose(1, 2)
        return x - trend, trend

    def _encode(self, seasonal: Tensor, x_mark: Optional[Tensor]) -> Tensor:
        """Tokens through the blocks: (B, L, C) -> the head's input, (B, C, d_model) or (B, C, N * d_model)."""
        batch = seasonal.shape[0]
        h = self._tokens(seasonal)
        if self.time_tokens:
            h = torch.cat([self.embed(x_mark.to(seasonal.dtype).transpose(1, 2)), h], dim=1)
        h = self.embed_drop(h)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        if self.time_tokens:
            h = h[:, -self.enc_in :]  # the variate tokens
        if self.tokenization == "patch":
            h = h.reshape(batch, self.enc_in, -1)  # (B, C, N * d_model)
        return h

    def _cycle(self, start: Tensor, length: int) -> Tensor:
        """The learned cycle over ``length`` steps from phase ``start`` (B,): (B, length, enc_in)."""
        steps = torch.arange(length, device=start.device)
        return self.cycle[(start.unsqueeze(1) + steps) % self.cycle_len]

    def linear_parameters(self) -> list[nn.Parameter]:
        """The parameters of the forecaster without its blocks (what ``forward(..., linear_only=True)`` uses):
        the linear path, the trend map, the learned cycle and RevIN's affine, in that order."""
        parts = (self.skip, self.trend_head, self.revin if self.revin is not None and self.revin.affine else None)
        params = [p for part in parts if part is not None for p in part.parameters()]
        return params + ([self.cycle] if self.cycle is not None else [])

    @torch.no_grad()
    def zero_head(self) -> None:
        """Zero the blocks' head, so that the model forecasts exactly what its linear part does (the start of
        the second stage of ``emamba forecast --linear_epochs``): the blocks then learn only a correction,
        and the gradient reaches them once the head has moved off zero (after its first step)."""
        self.head.weight.zero_()
        self.head.bias.zero_()

    def forward(self, x: Tensor, cycle_index: Optional[Tensor] = None, x_mark: Optional[Tensor] = None,
                linear_only: bool = False) -> Tensor:
        """(B, seq_len, enc_in) -> (B, pred_len, c_out); ``cycle_index`` (B,) integer phase of each window's
        first step, required when ``cycle_len`` > 0; ``x_mark`` (B, seq_len, time features), required with
        ``time_tokens``; each is ignored otherwise. ``linear_only`` skips the blocks and their head: the
        forecast of the linear path (``linear_skip``, with the trend map of ``decomp_kernel``) between RevIN
        and the cycle, i.e. RLinear / CycleNet-Linear; it needs ``linear_skip``."""
        if x.dim() != 3 or x.shape[1] != self.seq_len or x.shape[2] != self.enc_in:
            raise ValueError(f"EMambaTS expects (batch, {self.seq_len}, {self.enc_in}), got {tuple(x.shape)}")
        if linear_only and self.skip is None:
            raise ValueError("linear_only needs the linear path: build EMambaTS with linear_skip=True")
        batch = x.shape[0]
        if self.time_tokens and not linear_only and (x_mark is None or x_mark.dim() != 3 or x_mark.shape[:2] != (batch, self.seq_len)):
            got = None if x_mark is None else tuple(x_mark.shape)
            raise ValueError(f"this EMambaTS embeds calendar tokens and needs x_mark of shape ({batch}, "
                             f"{self.seq_len}, time features), got {got}")
        if self.cycle is not None:
            if cycle_index is None:
                raise ValueError(
                    f"this EMambaTS learns a cycle of {self.cycle_len} steps and needs cycle_index, the phase of "
                    "each window's first step (TimeSeriesDataset(cycle_len=...) returns it as a fifth item)"
                )
            if cycle_index.shape != (batch,) or cycle_index.dtype.is_floating_point:
                raise ValueError(
                    f"cycle_index must be a ({batch},) integer tensor, got {tuple(cycle_index.shape)} {cycle_index.dtype}"
                )
            cycle_index = cycle_index.to(x.device)  # _cycle takes every phase modulo cycle_len
        stats = None
        if self.revin is not None:
            x, stats = self.revin.normalize(x)
        if self.cycle is not None:
            x = x - self._cycle(cycle_index, self.seq_len)
        seasonal, trend = x, None
        if self.trend_head is not None:
            seasonal, trend = self.decompose(x)
        if linear_only:
            y = self.skip(x.transpose(1, 2))  # (B, C, pred_len)
        else:
            y = self.head(self.head_drop(self._encode(seasonal, x_mark)))  # (B, C, pred_len)
            if self.skip is not None:
                y = y + self.skip(x.transpose(1, 2))
        if trend is not None:
            y = y + self.trend_head(trend.transpose(1, 2))
        y = y.transpose(1, 2)  # (B, pred_len, C)
        if self.cycle is not None:
            y = y + self._cycle(cycle_index + self.seq_len, self.pred_len)
        if stats is not None:
            y = self.revin.denormalize(y, stats)
        return y[..., -self.c_out :]


#: EMambaTS keyword -> (TSLib ``configs`` attribute, default when the attribute is absent).
_CONFIG_KEYS: dict[str, tuple[str, Any]] = {
    "c_out": ("c_out", None),
    "tokenization": ("tokenization", "patch"),
    "patch_len": ("patch_len", 16),
    "stride": ("stride", 16),
    "d_model": ("d_model", 32),
    "e_layers": ("e_layers", 1),
    "d_ff": ("d_ff", None),
    "d_state": ("d_state", 8),
    "d_conv": ("d_conv", 4),
    "bidirectional": ("bidirectional", False),
    "einfft_blocks": ("einfft_blocks", 4),
    "dropout": ("dropout", 0.1),
    "head_dropout": ("head_dropout", 0.0),
    "revin": ("revin", True),
    "revin_affine": ("affine", True),
    "subtract_last": ("subtract_last", False),
    "cycle_len": ("cycle_len", 0),
    "linear_skip": ("linear_skip", False),
    "time_tokens": ("time_tokens", False),
    "decomp_kernel": ("decomp_kernel", 0),
}


def model_kwargs_from_configs(configs: Any) -> dict[str, Any]:
    """EMambaTS keyword arguments from a TSLib-style namespace (absent attributes take the defaults)."""
    kwargs = {}
    for key, (attr, default) in _CONFIG_KEYS.items():
        value = getattr(configs, attr, default)
        # switches come as 0/1 from TSLib's argparse; the keys with a bool default are the switches
        kwargs[key] = bool(value) if isinstance(default, bool) else value
    return dict(seq_len=configs.seq_len, pred_len=configs.pred_len, enc_in=configs.enc_in, **kwargs)


class Model(nn.Module):
    """Time-Series-Library entry point: ``Model(configs)`` with ``forward(x_enc, x_mark_enc, x_dec, x_mark_dec)``.

    Reads ``seq_len, pred_len, enc_in`` and optionally ``c_out, tokenization, patch_len, stride, d_model,
    e_layers, d_ff, d_state, d_conv, bidirectional, einfft_blocks, dropout, head_dropout, revin, affine,
    subtract_last, cycle_len, linear_skip, time_tokens, decomp_kernel`` from ``configs`` (``affine`` is RevIN's
    learnable affine, as in PatchTST's arguments). EMamba-TS is encoder-only: the decoder input and its
    calendar features are accepted for the interface and not used; ``x_mark_enc`` is used only with
    ``time_tokens``. With ``cycle_len`` > 0 pass ``cycle_index`` (TSLib's own loaders do not make it;
    CycleNet's fork of TSLib adds it the same way). Supports ``task_name`` ``long_term_forecast`` /
    ``short_term_forecast``.
    """

    def __init__(self, configs: Any) -> None:
        super().__init__()
        self.task_name = getattr(configs, "task_name", "long_term_forecast")
        if self.task_name not in ("long_term_forecast", "short_term_forecast"):
            raise ValueError(f"EMamba-TS supports forecasting tasks only, got task_name={self.task_name!r}")
        self.pred_len = configs.pred_len
        self.model = EMambaTS(**model_kwargs_from_configs(configs))

    def forward(
        self,
        x_enc: Tensor,
        x_mark_enc: Optional[Tensor] = None,
        x_dec: Optional[Tensor] = None,
        x_mark_dec: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        cycle_index: Optional[Tensor] = None,
        linear_only: bool = False,
    ) -> Tensor:
        return self.model(x_enc, cycle_index, x_mark_enc if self.model.time_tokens else None, linear_only)
