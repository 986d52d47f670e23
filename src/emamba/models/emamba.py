"""EMamba (SiMBA) hierarchical vision backbone, registered with timm.

Paper: "SiMBA: Simplified Mamba-based Architecture for Vision and Multivariate Time series"
(Patro & Agneeswaran, arXiv 2403.15360).

Layout: conv stem (stride 4) -> 4 stages of pre-norm residual blocks [Mamba token mixer, channel mixer]
with stride-2 conv downsampling between stages -> a class token (mean of the last stage's tokens) refined
by one class block -> LayerNorm -> linear head, plus a token-labeling aux head on every last-stage token.

Channel mixer: ``EinFFT`` for ``emamba_{s,b,l}`` (the paper's default) or the PVTv2 conv-MLP for
``emamba_{s,b,l}_mlp`` (what the released code shipped by default).
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..layers import ConvMlp, EinFFT, MambaMixer, Mlp

__all__ = ["EMamba", "checkpoint_filter_fn", "TOTAL_STRIDE"]

TOTAL_STRIDE = 32
MIXERS = ("einfft", "mlp")


def check_image_size(height: int, width: int) -> None:
    """Raise a ValueError unless both sides are positive multiples of the backbone's total stride."""
    if height % TOTAL_STRIDE or width % TOTAL_STRIDE or height <= 0 or width <= 0:
        raise ValueError(
            f"EMamba needs input height and width that are multiples of {TOTAL_STRIDE} (the total stride of "
            f"its 4 stages); got {height}x{width}. Resize or pad the images, e.g. to "
            f"{max(TOTAL_STRIDE, round(height / TOTAL_STRIDE) * TOTAL_STRIDE)}x"
            f"{max(TOTAL_STRIDE, round(width / TOTAL_STRIDE) * TOTAL_STRIDE)}."
        )


class Stem(nn.Module):
    """Conv stem, stride 4: 7x7/2 conv-BN-ReLU, two 3x3 conv-BN-ReLU, 3x3/2 projection, LayerNorm."""

    def __init__(self, in_chans: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, hidden_dim, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
        )
        self.proj = nn.Conv2d(hidden_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C, H/4, W/4); the LayerNorm is applied per token."""
        x = self.proj(self.conv(x))
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """3x3 stride-2 conv followed by a per-token LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class EMambaBlock(nn.Module):
    """Pre-norm residual block: x + DropPath(Mamba(LN x)), then x + DropPath(Mixer(LN x))."""

    def __init__(
        self,
        dim: int,
        mixer: str,
        mlp_ratio: float,
        drop_path: float,
        mamba_kwargs: dict[str, Any],
        einfft_kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = MambaMixer(dim, **mamba_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        self.uses_grid = mixer == "mlp"
        if mixer == "einfft":
            self.channel_mixer = EinFFT(dim, **einfft_kwargs)
        else:
            self.channel_mixer = ConvMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = x + self.drop_path(self.token_mixer(self.norm1(x)))
        y = self.norm2(x)
        y = self.channel_mixer(y, height, width) if self.uses_grid else self.channel_mixer(y)
        return x + self.drop_path(y)


class ClassBlock(nn.Module):
    """Refines the class token only: Mamba on the class token, then the channel mixer (no drop path).

    As in the released code the Mamba mixer sees the class token as a length-1 sequence; the MLP variants
    use a plain MLP (ratio 4) here because the class token has no spatial grid for the depthwise conv.
    """

    def __init__(
        self, dim: int, mixer: str, mlp_ratio: float, mamba_kwargs: dict[str, Any], einfft_kwargs: dict[str, Any]
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = MambaMixer(dim, **mamba_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mixer = EinFFT(dim, **einfft_kwargs) if mixer == "einfft" else Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        cls = x[:, :1]
        cls = cls + self.token_mixer(self.norm1(cls))
        cls = cls + self.channel_mixer(self.norm2(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


class EMambaStage(nn.Module):
    """Optional stride-2 downsample, ``depth`` blocks, optional LayerNorm (stages 1-3)."""

    def __init__(self, downsample: Optional[nn.Module], blocks: list[EMambaBlock], norm: Optional[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm if norm is not None else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C, H', W')."""
        x = self.downsample(x)
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, height, width, use_reentrant=False)
            else:
                tokens = block(tokens, height, width)
        tokens = self.norm(tokens)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


def rand_box(height: int, width: int, lam: float, generator: Optional[torch.Generator] = None) -> tuple[int, int, int, int]:
    """CutMix box covering about (1 - lam) of an H x W grid: (top, left, bottom, right), clipped."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, left, bottom, right


class EMamba(nn.Module):
    """EMamba / SiMBA vision backbone.

    Args:
        img_size: nominal input size (only for ``pretrained_cfg``; any multiple of 32 works).
        in_chans: input channels.
        num_classes: classifier classes (0 for a feature extractor without heads).
        stem_hidden_dim: width of the conv stem.
        embed_dims: widths of the 4 stages.
        depths: blocks per stage.
        mlp_ratios: hidden ratio of the conv-MLP mixer per stage (also the class block's MLP ratio).
        mixer: ``"einfft"`` (paper) or ``"mlp"`` (released default).
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        token_label: add the token-labeling aux head and MixToken (the original training recipe).
        mix_token_beta: Beta(beta, beta) parameter of the MixToken box area.
        d_state, d_conv, expand, bidirectional: Mamba mixer settings.
        einfft_fft_mode: ``"tokens_blocks"`` (released) or ``"tokens"`` (paper's Appendix B).
        scan_backend: selective-scan backend passed to every Mamba mixer.
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        stem_hidden_dim: int = 32,
        embed_dims: tuple[int, ...] = (64, 128, 320, 448),
        depths: tuple[int, ...] = (3, 4, 6, 3),
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
        mixer: str = "einfft",
        drop_path_rate: float = 0.0,
        token_label: bool = True,
        mix_token_beta: float = 1.0,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        bidirectional: bool = False,
        einfft_fft_mode: str = "tokens_blocks",
        scan_backend: str = "auto",
        global_pool: str = "token",
    ) -> None:
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        if not (len(embed_dims) == len(depths) == len(mlp_ratios) == 4):
            raise ValueError("embed_dims, depths and mlp_ratios need one entry per stage (4)")
        if global_pool != "token":
            raise ValueError("EMamba pools with its class block only (global_pool='token')")
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.mixer = mixer
        self.token_label = token_label
        self.mix_token_beta = mix_token_beta
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.embed_dims = tuple(embed_dims)
        self.grad_checkpointing = False

        mamba_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=bidirectional,
                            backend=scan_backend)
        einfft_kwargs = dict(fft_mode=einfft_fft_mode)
        total_depth = sum(depths)
        dpr = [drop_path_rate * i / max(total_depth - 1, 1) for i in range(total_depth)]

        self.stem = Stem(in_chans, stem_hidden_dim, embed_dims[0])
        stages, cursor = [], 0
        self.feature_info = []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            blocks = [
                EMambaBlock(dim, mixer, mlp_ratios[i], dpr[cursor + j], mamba_kwargs, einfft_kwargs)
                for j in range(depth)
            ]
            cursor += depth
            downsample = Downsample(embed_dims[i - 1], dim) if i > 0 else None
            norm = nn.LayerNorm(dim) if i < len(depths) - 1 else None  # the last norm follows the class block
            stages.append(EMambaStage(downsample, blocks, norm))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)
        self.class_block = ClassBlock(embed_dims[-1], mixer, mlp_ratios[-1], mamba_kwargs, einfft_kwargs)
        self.norm = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 and token_label else None

        self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, MambaMixer):
                module.reset_dt_parameters()  # the generic init above must not erase Mamba's dt init

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The released init: trunc-normal(0.02) Linear, unit LayerNorm, He-normal (fan-out) Conv2d."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """SSM parameters (A_log, D) are excluded from weight decay, as in Mamba; biases/norms by timm."""
        return {name for name, p in self.named_parameters() if name.rsplit(".", 1)[-1] in ("A_log", "A_b_log", "D", "D_b")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", None),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
                (r"^class_block|^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "token"):
            raise ValueError("EMamba pools with its class block only (global_pool='token')")
        self.num_classes = num_classes
        dim = self.num_features
        device = self.norm.weight.device
        self.head = nn.Linear(dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        self.aux_head = (
            nn.Linear(dim, num_classes, device=device) if num_classes > 0 and self.token_label else None
        )
        for head in (self.head, self.aux_head):
            if isinstance(head, nn.Linear):
                self._init_weights(head)

    # ----------------------------------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"EMamba expects images (batch, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        check_image_size(x.shape[2], x.shape[3])

    def _tokens_with_class(self, x: Tensor) -> Tensor:
        """Last-stage feature map (B, C, h, w) -> normed tokens (B, 1 + h*w, C), class token first."""
        tokens = x.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        return self.norm(self.class_block(tokens))

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> final normed tokens (B, 1 + N, C); index 0 is the class token."""
        self._check_input(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self._tokens_with_class(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens from :meth:`forward_features` -> logits (cls + 0.5 * max-over-tokens aux, as released)."""
        cls = x[:, 0]
        if pre_logits:
            return cls
        out = self.head(cls)
        if self.aux_head is not None:
            out = out + 0.5 * self.aux_head(x[:, 1:]).max(dim=1)[0]
        return out

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """Stage outputs (after each stage's LayerNorm; the last stage is before the class block).

        ``norm`` is accepted for timm compatibility; stage outputs are always those of the stage norms.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NHWC'")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        intermediates = []
        stages = self.stages[: max_index + 1] if (stop_early or intermediates_only) else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return self._tokens_with_class(x), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, list[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last requested one (and the heads) for feature extraction."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head or max_index < 3:
            self.class_block = nn.Identity()
            self.norm = nn.Identity()
            self.head = nn.Identity()
            self.aux_head = None
            self.num_classes = 0
        return take_indices

    def _mix_tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
        """MixToken: paste a box (drawn on the last-stage grid) from the reversed batch into the stem output."""
        scale = TOTAL_STRIDE // 4  # stem resolution / last-stage resolution
        grid_h, grid_w = x.shape[2] // scale, x.shape[3] // scale
        lam = float(torch.distributions.Beta(self.mix_token_beta, self.mix_token_beta).sample())
        top, left, bottom, right = rand_box(grid_h, grid_w, lam)
        if bottom > top and right > left:
            mixed = x.clone()
            region = (slice(None), slice(None), slice(scale * top, scale * bottom), slice(scale * left, scale * right))
            mixed[region] = x.flip(0)[region]
            x = mixed
        return x, (top, left, bottom, right)

    def forward(self, x: Tensor) -> Union[Tensor, tuple[Tensor, Tensor, tuple[int, int, int, int]]]:
        """Eval (or ``token_label=False``): logits. Train with token labeling: (cls_logits, aux_logits, box).

        ``aux_logits`` is (B, h*w, classes) with the MixToken box already swapped back so that every token
        lines up with its own image's dense label; ``box`` = (top, left, bottom, right) on the h x w
        last-stage grid (all zeros when nothing was mixed), for mixing the targets.
        """
        if not (self.training and self.aux_head is not None):
            return self.forward_head(self.forward_features(x))
        self._check_input(x)
        x = self.stem(x)
        x, box = self._mix_tokens(x)
        for stage in self.stages:
            x = stage(x)
        grid_h, grid_w = x.shape[2:]
        tokens = self._tokens_with_class(x)
        cls_logits = self.head(tokens[:, 0])
        aux = self.aux_head(tokens[:, 1:])
        top, left, bottom, right = box
        if bottom > top and right > left:
            aux = aux.reshape(aux.shape[0], grid_h, grid_w, -1)
            restored = aux.clone()
            restored[:, top:bottom, left:right] = aux.flip(0)[:, top:bottom, left:right]
            aux = restored.reshape(aux.shape[0], grid_h * grid_w, -1)
        return cls_logits, aux, box


# --------------------------------------------------------------------------------------------------
# Loading weights saved by the original SiMBA code.
# --------------------------------------------------------------------------------------------------

_ORIGINAL_RULES = [
    (r"^patch_embed1\.", "stem."),
    (r"^patch_embed(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
    (r"^norm4\.", "norm."),
    (r"^norm(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.norm."),
    (r"^post_network\.0\.", "class_block."),
    (r"\.attn\.", ".token_mixer."),
    (r"\.mlp\.", ".channel_mixer."),
]


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: EMamba) -> dict[str, Tensor]:
    """Convert a state dict saved by the original SiMBA code (or by EMamba) to EMamba's key layout.

    Accepts the raw dict or one wrapped in ``model``/``state_dict``/``model_ema`` and strips DDP's
    ``module.`` prefix. Original keys: ``patch_embed{i}``, ``block{i}.{j}.{attn,mlp}``, ``norm{i}``,
    ``post_network.0``, ``head``, ``aux_head``; mamba_ssm's parameter names are kept as they are.
    """
    for wrapper in ("model", "state_dict", "model_ema"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    if not any(k.startswith(("patch_embed", "block", "post_network", "module.")) for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        for pattern, repl in _ORIGINAL_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------------------


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.96,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv.0",
        "classifier": ("head", "aux_head"),
        "license": "apache-2.0",
        "paper_ids": "arXiv:2403.15360",
        "paper_name": "SiMBA: Simplified Mamba-based Architecture for Vision and Multivariate Time series",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "emamba_tiny.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
        "emamba_s.untrained": _cfg(),
        "emamba_b.untrained": _cfg(),
        "emamba_l.untrained": _cfg(),
        "emamba_s_mlp.untrained": _cfg(),
        "emamba_b_mlp.untrained": _cfg(),
        "emamba_l_mlp.untrained": _cfg(),
    }
)

# The paper's three sizes; parameter counts (with the token-label head, 1000 classes) in the README.
MODEL_ARGS: dict[str, dict[str, Any]] = {
    "tiny": dict(stem_hidden_dim=16, embed_dims=(32, 64, 128, 160), depths=(1, 1, 2, 1), d_state=16,
                 drop_path_rate=0.0),
    "s": dict(stem_hidden_dim=32, embed_dims=(64, 128, 320, 448), depths=(3, 4, 6, 3), drop_path_rate=0.1),
    "b": dict(stem_hidden_dim=64, embed_dims=(64, 128, 320, 512), depths=(3, 4, 12, 3), drop_path_rate=0.1),
    "l": dict(stem_hidden_dim=64, embed_dims=(96, 192, 384, 512), depths=(3, 6, 18, 3), drop_path_rate=0.3),
}


def _create_emamba(variant: str, size: str, mixer: str, pretrained: bool = False, **kwargs: Any) -> EMamba:
    model_args = dict(MODEL_ARGS[size], mlp_ratios=(8, 8, 4, 4), mixer=mixer)
    model_args.update(kwargs)
    return build_model_with_cfg(
        EMamba,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **model_args,
    )


@register_model
def emamba_tiny(pretrained: bool = False, **kwargs: Any) -> EMamba:
    """A small EinFFT EMamba (~1M parameters, d_state 16) for CPU experiments; not from the paper."""
    return _create_emamba("emamba_tiny", "tiny", "einfft", pretrained, **kwargs)


@register_model
def emamba_s(pretrained: bool = False, **kwargs: Any) -> EMamba:
    """EMamba-S with EinFFT (paper: 15.3M parameters, 2.4 GMACs at 224)."""
    return _create_emamba("emamba_s", "s", "einfft", pretrained, **kwargs)


@register_model
def emamba_b(pretrained: bool = False, **kwargs: Any) -> EMamba:
    """EMamba-B with EinFFT (paper: 22.8M parameters, 4.2 GMACs at 224)."""
    return _create_emamba("emamba_b", "b", "einfft", pretrained, **kwargs)


@register_model
def emamba_l(pretrained: bool = False, **kwargs: Any) -> EMamba:
    """EMamba-L with EinFFT (paper: 36.6M parameters, 7.6 GMACs at 224)."""
    return _create_emamba("emamba_l", "l", "einfft", pretrained, **kwargs)


@register_model
def emamba_s_mlp(pretrained: bool = False, **kwargs: Any) -> EMamba:
    """EMamba-S with the conv-MLP channel mixer (the released code's default)."""
    return _create_emamba("emamba_s_mlp", "s", "mlp", pretrained, **kwargs)


@register_model
def emamba_b_mlp(pretrained: bool = False, **kwargs: Any) -> EMamba:
    """EMamba-B with the conv-MLP channel mixer."""
    return _create_emamba("emamba_b_mlp", "b", "mlp", pretrained, **kwargs)


@register_model
def emamba_l_mlp(pretrained: bool = False, **kwargs: Any) -> EMamba:
    """EMamba-L with the conv-MLP channel mixer."""
    return _create_emamba("emamba_l_mlp", "l", "mlp", pretrained, **kwargs)
