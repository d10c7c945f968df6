"""
ViT: the Vision Transformer the paper compares VMamba against, written so timm checkpoints load 1:1.

The module tree, parameter names and shapes equal timm's `VisionTransformer` (class token, learned absolute
position embedding, pre-norm blocks, qkv bias, exact GELU, LayerNorm eps 1e-6, 'token' pooling), so a timm /
DeiT / AugReg state dict (e.g. `vit_small_patch16_224.augreg_in1k`) loads with strict=True. What the VLM uses is
`forward_features(x, layer=-2)`: the patch tokens of the second-to-last block, CLS dropped, no final norm, which
is what the paper's code takes with timm's `get_intermediate_layers(n={len(blocks) - 2})` (paper.md §1.2).

References
- Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929 (§3.1, Eq. 1-4)
- Touvron et al. 2021, DeiT, https://arxiv.org/abs/2012.12877 (same architecture, the checkpoints timm ships)
- Steiner et al. 2022, AugReg "How to train your ViT?", https://arxiv.org/abs/2106.10270 (augreg_in1k weights)
- Official implementation of the names we mirror: timm `timm/models/vision_transformer.py`,
  https://github.com/huggingface/pytorch-image-models (and `timm/layers/pos_embed.py` for the resampling)

Glossary (shape letters used in every comment below)
    B   batch size
    H W input image height and width in pixels (multiples of p; need not be equal)
    p   patch size (16)                               paper: P in "16x16 words"
    h w patch grid height and width, h = H / p, w = W / p
    P   number of patch tokens, P = h * w             (196 for 224x224, 64 for the 128x128 toy)
    T   sequence length with the class token, T = 1 + P
    C   embedding width (embed_dim)                   paper: D
    nh  number of attention heads; hd = C / nh the head width
    F   MLP hidden width, F = mlp_ratio * C
    K   number of classes of the head

What is deliberately left out: dropout, drop-path, layer-scale, register tokens and the other timm switches.
The presets here (and the paper's frozen encoder) use none of them, so they would only be dead code.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config


@dataclass
class ViTConfig:
    img_size: int = 224          # the size the position embedding was trained at (square, like every timm preset)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384         # C
    depth: int = 12              # number of blocks
    num_heads: int = 6           # nh
    mlp_ratio: float = 4.0
    num_classes: int = 1000      # K; 0 means no head (timm's convention: head = Identity, no parameters)
    qkv_bias: bool = True
    ln_eps: float = 1e-6         # timm's ViTs use partial(nn.LayerNorm, eps=1e-6), not the 1e-5 default
    attn_impl: str = "sdpa"      # "sdpa" (F.scaled_dot_product_attention) or "math" (the readable reference)

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTConfig: embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"ViTConfig: img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.attn_impl not in ("sdpa", "math"):
            raise ValueError(f"ViTConfig: attn_impl must be 'sdpa' or 'math', got {self.attn_impl!r}")

    # Derived sizes are properties, not init=False fields, so that ViTConfig(**dataclasses.asdict(cfg)) (what a
    # run's config.json round-trips through) keeps working.
    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size           # h = w at the native size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2                        # P at the native size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads           # hd

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)       # F (timm truncates with int() the same way)


class _Presets(dict):
    """A dict whose unknown keys raise a KeyError that lists the valid names."""

    def __missing__(self, key):
        raise KeyError(f"unknown ViT preset {key!r}; valid presets: {', '.join(sorted(self))}")


CONFIGS = _Presets(
    # timm vit_small_patch16_224 (AugReg / DeiT-S): 22,050,664 parameters with the 1000-class head.
    vit_small_patch16_224=ViTConfig(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    # timm vit_base_patch16_224 (AugReg / DeiT-B): 86,567,656 parameters.
    vit_base_patch16_224=ViTConfig(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    # The project's CPU default: 128x128 -> 8x8 = 64 tokens of width 128, 1,300,896 parameters with 32 classes.
    toy=ViTConfig(img_size=128, patch_size=16, embed_dim=128, depth=6, num_heads=4, num_classes=32),
)

# ----------------------------------------------------------------------------- position embedding


def resample_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a learned (1, n + g*g, C) position embedding to a (h, w) patch grid: (1, n + h*w, C).

    The n prefix (CLS) rows are kept as they are; the grid part is treated as a (C, g, g) image and resized with
    bicubic interpolation, align_corners=False, antialias=True. Those are timm's `resample_abs_pos_embed`
    defaults, chosen so the tokens we produce at a new size match what timm's dynamic-size ViT produces.
    align_corners=False treats each embedding as the value at the centre of its patch (the patches tile the image,
    their centres do not sit on its edges); antialias only acts when shrinking the grid, where it low-passes
    instead of skipping rows. At the native size this returns the input unchanged (no interpolation at all).
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]  # (1, n, C), (1, g*g, C)
    g = math.isqrt(grid.shape[1])
    if g * g != grid.shape[1]:
        raise ValueError(f"resample_pos_embed: the grid part has {grid.shape[1]} rows, not a square number")
    h, w = grid_hw
    if (h, w) == (g, g):
        return pos_embed
    C = grid.shape[-1]
    dtype = grid.dtype
    # bicubic is computed in fp32: bf16/fp16 interpolation is not available everywhere and loses precision
    grid = grid.float().reshape(1, g, g, C).permute(0, 3, 1, 2)                         # (1, C, g, g)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)  # (1, C, h, w)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, C).to(dtype)                      # (1, h*w, C) row-major
    return torch.cat([prefix, grid], dim=1)                                             # (1, n + h*w, C)


# ----------------------------------------------------------------------------- modules


class PatchEmbed(nn.Module):
    """Cut the image into p x p patches and project each to C channels: one strided conv (paper Eq. 1, E)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        x = self.proj(x)                                  # (B, 3, H, W) -> (B, C, h, w)
        return x.flatten(2).transpose(1, 2)               # (B, C, h*w) -> (B, P, C), row-major over the grid


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's layout: q, k, v stacked along rows)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        self.impl = cfg.attn_impl                         # the one switch: "sdpa" fast path, "math" reference
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x)                                                   # (B, T, 3C)
        # timm's weight order is [q; k; v], each split into nh heads of hd: the reshape must follow that order
        qkv = qkv.reshape(B, T, 3, self.num_heads, self.head_dim)           # (B, T, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # 3 x (B, nh, T, hd)
        if self.impl == "sdpa":
            # SDPA picks a fused kernel (flash / memory-efficient) when it can; same math as below
            y = F.scaled_dot_product_attention(q, k, v)                     # (B, nh, T, hd)
        else:
            att = (q * self.scale) @ k.transpose(-2, -1)                    # (B, nh, T, T)
            att = att.softmax(dim=-1)                                       # no mask: every token sees every token
            y = att @ v                                                     # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)                              # (B, T, nh*hd) = (B, T, C)
        return self.proj(y)                                                 # (B, T, C)


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden)
        self.act = nn.GELU()                              # exact erf GELU, as timm (not the tanh approximation)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))            # (B, T, C) -> (B, T, F) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block (paper Eq. 2-3): x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))                  # (B, T, C)
        x = x + self.mlp(self.norm2(x))                   # (B, T, C)
        return x


class ViT(nn.Module):
    """timm-compatible ViT. `ViT(config)` takes a ViTConfig or a preset name from CONFIGS."""

    def __init__(self, config):
        super().__init__()
        cfg = CONFIGS[config] if isinstance(config, str) else config
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))                    # (1, 1, C)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.embed_dim))  # (1, 1+P, C)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        # A simplified version of timm's default init: truncated normal(0.02) for the embeddings and every Linear,
        # zero biases, LayerNorm at (1, 0). It only matters for training from scratch (the toy runs); pretrained
        # checkpoints overwrite all of it.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --------------------------------------------------------------------- forward

    def _check_input(self, x):
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ViT: x must be a 4-D tensor (B, {cfg.in_chans}, H, W), got {got}")
        B, Cin, H, W = x.shape
        if Cin != cfg.in_chans:
            raise ValueError(f"ViT: x has {Cin} channels, expected {cfg.in_chans}; shape {tuple(x.shape)}")
        if H % cfg.patch_size or W % cfg.patch_size or H == 0 or W == 0:
            raise ValueError(f"ViT: x height and width must be positive multiples of the patch size "
                             f"{cfg.patch_size}, got shape {tuple(x.shape)}")

    def _embed(self, x):
        """Image -> token sequence with CLS first and position embeddings added (paper Eq. 1)."""
        self._check_input(x)
        B, _, H, W = x.shape
        h, w = H // self.config.patch_size, W // self.config.patch_size
        # cast the pixels to the weights' dtype so a bf16 encoder can take fp32 images
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))                # (B, P, C)
        cls = self.cls_token.expand(B, -1, -1)                                        # (B, 1, C)
        x = torch.cat([cls, x], dim=1)                                                # (B, T, C)
        return x + resample_pos_embed(self.pos_embed, (h, w))                         # (B, T, C)

    def forward_features(self, x, layer: int = -2):
        """Patch tokens after block `layer`, CLS dropped, no final norm: the paper's ViT tap.

        x: (B, 3, H, W), H and W multiples of the patch size (any size; the position embedding is resampled).
        layer: block index, negative counts from the end like Python (-2 = second-to-last = timm's
            get_intermediate_layers(n={depth-2}), -1 = the last block's output before `norm`).
        Returns (B, P, C) with P = (H/p)*(W/p), tokens in row-major grid order.
        """
        depth = self.config.depth
        if not isinstance(layer, int) or not -depth <= layer < depth:
            raise ValueError(f"ViT.forward_features: layer must be an int in [-{depth}, {depth - 1}], got {layer!r}")
        last = layer % depth                                                          # 0-based block index
        x = self._embed(x)                                                            # (B, T, C)
        for blk in self.blocks[: last + 1]:                                           # later blocks are not run
            x = blk(x)                                                                # (B, T, C)
        return x[:, 1:]                                                               # (B, P, C): drop CLS

    def forward(self, x):
        """Logits (B, K) from the CLS token after the final norm (timm's global_pool='token')."""
        x = self._embed(x)                                                            # (B, T, C)
        for blk in self.blocks:
            x = blk(x)                                                                # (B, T, C)
        x = self.norm(x)                                                              # (B, T, C)
        return self.head(x[:, 0])                                                     # (B, C) -> (B, K)

    # --------------------------------------------------------------------- loading

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict, but a strict load first checks names and shapes and raises one readable
        error (first few missing / unexpected / mis-shaped keys, with counts) instead of torch's wall of text."""
        if strict:
            _check_state_dict(self.state_dict(), state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_checkpoint(cls, path, config="vit_small_patch16_224"):
        """Build ViT(config) and load a timm-format checkpoint into it strictly."""
        model = cls(config)
        model.load_state_dict(load_checkpoint(path), strict=True)
        return model


# ----------------------------------------------------------------------------- checkpoints


def _check_state_dict(expected: dict, got: dict, show: int = 5):
    """Raise ValueError listing the first `show` missing / unexpected / mis-shaped keys (with counts)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    misshaped = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            more = f", ... (+{len(items) - show} more)" if len(items) > show else ""
            parts.append(f"{len(items)} {name}: {', '.join(items[:show])}{more}")
    raise ValueError("ViT checkpoint does not match the model: " + "; ".join(parts))


def load_checkpoint(path) -> dict:
    """Read a timm/DeiT ViT checkpoint into a state dict (CPU tensors).

    .pth/.pt/.bin: torch.load(weights_only=True); a bare state dict, or one under "model" (DeiT) or
    "state_dict". .safetensors: safetensors.torch.load_file (what timm on the Hugging Face Hub ships).
    The keys are returned untouched: strict loading is the model's job (ViT.load_state_dict).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ViT checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    if not path.endswith((".pth", ".pt", ".bin")):
        raise ValueError(f"ViT checkpoint {path}: unknown extension, expected .pth, .pt, .bin or .safetensors")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"ViT checkpoint {path}: expected a state dict of tensors (bare, or under 'model' / "
                         f"'state_dict'), got {keys}")
    return obj
