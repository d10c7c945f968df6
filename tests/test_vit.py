"""Tests for vit.py: timm names/shapes/counts, strict checkpoint loading, the paper's feature tap, position-embedding
resampling, SDPA vs the reference attention, and input errors. Everything runs on CPU in a few seconds."""
import dataclasses
import math

import pytest
import torch
from safetensors.torch import save_file

import vit
from vit import CONFIGS, ViT, ViTConfig, load_checkpoint, resample_pos_embed

# timm's parameter counts (timm.create_model(name).parameters()), and the toy's, computed by hand:
# patch 128*3*16*16+128 + cls 128 + pos 65*128 + 6 * block 198,272 + norm 256 + head 128*32+32 = 1,300,896
PARAM_COUNTS = {"vit_small_patch16_224": 22_050_664, "vit_base_patch16_224": 86_567_656, "toy": 1_300_896}


def timm_layout(cfg):
    """The state-dict names and shapes of timm's VisionTransformer, written out independently of vit.py."""
    C, p = cfg.embed_dim, cfg.patch_size
    P, F = (cfg.img_size // p) ** 2, int(C * cfg.mlp_ratio)
    out = {"cls_token": (1, 1, C), "pos_embed": (1, 1 + P, C),
           "patch_embed.proj.weight": (C, cfg.in_chans, p, p), "patch_embed.proj.bias": (C,)}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        out.update({b + "norm1.weight": (C,), b + "norm1.bias": (C,),
                    b + "attn.qkv.weight": (3 * C, C), b + "attn.qkv.bias": (3 * C,),
                    b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
                    b + "norm2.weight": (C,), b + "norm2.bias": (C,),
                    b + "mlp.fc1.weight": (F, C), b + "mlp.fc1.bias": (F,),
                    b + "mlp.fc2.weight": (C, F), b + "mlp.fc2.bias": (C,)})
    out.update({"norm.weight": (C,), "norm.bias": (C,)})
    if cfg.num_classes > 0:
        out.update({"head.weight": (cfg.num_classes, C), "head.bias": (cfg.num_classes,)})
    return out


def random_timm_state_dict(cfg, seed=0):
    """A checkpoint 'written by timm': random tensors under timm's names. LayerNorm weights are random too, so a
    missing or misplaced norm shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * (0.5 if len(s) == 1 else 0.05) + (1.0 if k.endswith("norm1.weight")
            or k.endswith("norm2.weight") or k == "norm.weight" else 0.0) for k, s in timm_layout(cfg).items()}


def functional_vit(sd, cfg, x):
    """An independent ViT forward from the state dict (ViT paper Eq. 1-4): returns (per-block outputs, logits).
    Patches are cut with reshape/permute (not a conv), LayerNorm and GELU are written out, heads split by hand."""
    B, _, H, W = x.shape
    p, C, nh = cfg.patch_size, cfg.embed_dim, cfg.num_heads
    h, w = H // p, W // p
    patches = x.reshape(B, 3, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, 3 * p * p)
    t = patches @ sd["patch_embed.proj.weight"].reshape(C, -1).T + sd["patch_embed.proj.bias"]
    t = torch.cat([sd["cls_token"].expand(B, 1, C), t], 1) + sd["pos_embed"]

    def ln(z, name):
        mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-6) * sd[name + ".weight"] + sd[name + ".bias"]

    def lin(z, name):
        return z @ sd[name + ".weight"].T + sd[name + ".bias"]

    outs = []
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        q, k, v = lin(ln(t, b + "norm1"), b + "attn.qkv").split(C, dim=-1)
        heads = []
        for j in range(nh):
            sl = slice(j * C // nh, (j + 1) * C // nh)
            a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(C // nh), -1)
            heads.append(a @ v[..., sl])
        t = t + lin(torch.cat(heads, -1), b + "attn.proj")
        m = lin(ln(t, b + "norm2"), b + "mlp.fc1")
        t = t + lin(0.5 * m * (1 + torch.erf(m / math.sqrt(2))), b + "mlp.fc2")
        outs.append(t)
    return outs, lin(ln(t, "norm")[:, 0], "head")


@pytest.fixture
def toy():
    return dataclasses.replace(CONFIGS["toy"], depth=3)  # 3 blocks are enough to tell layer indices apart


# ----------------------------------------------------------------------------- names, shapes, counts


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_preset_names_shapes_and_param_counts(name):
    with torch.device("meta"):                         # the big presets cost no memory on the meta device
        model = ViT(CONFIGS[name])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = timm_layout(CONFIGS[name])
    assert got == want, f"{name}: extra {sorted(set(got) - set(want))[:5]}, missing {sorted(set(want) - set(got))[:5]}"
    n = sum(p.numel() for p in model.parameters())
    assert n == PARAM_COUNTS[name], f"{name}: {n:,} parameters, timm has {PARAM_COUNTS[name]:,}"
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def test_presets_and_config_errors():
    with pytest.raises(KeyError, match="toy"):        # the message lists the valid names
        CONFIGS["vit_huge"]
    with pytest.raises(KeyError):
        ViT("nope")
    with pytest.raises(ValueError, match="num_heads"):
        ViTConfig(embed_dim=100, num_heads=6)
    with pytest.raises(ValueError, match="attn_impl"):
        ViTConfig(attn_impl="flash")
    cfg = dataclasses.replace(CONFIGS["toy"], num_classes=0)   # timm's headless convention
    assert "head.weight" not in ViT(cfg).state_dict()
    assert ViTConfig(**dataclasses.asdict(CONFIGS["toy"])) == CONFIGS["toy"]  # config.json round trip


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("container", ["bare.pth", "model.pth", "state_dict.bin", "file.safetensors"])
def test_strict_round_trip_through_timm_checkpoint(tmp_path, toy, container):
    sd = random_timm_state_dict(toy)
    path = tmp_path / container
    if container.endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        key = container.split(".")[0]
        torch.save(sd if key == "bare" else {key: sd, "epoch": torch.tensor(3)}, path)
    model = ViT(toy)
    model.load_state_dict(load_checkpoint(path), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    m2 = ViT.from_checkpoint(path, toy)
    assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), model.state_dict().values()))


def test_matches_independent_functional_vit(toy):
    sd = random_timm_state_dict(toy, seed=1)
    model = ViT(toy).eval()
    model.load_state_dict(sd)
    x = torch.randn(2, 3, 128, 128)
    outs, logits = functional_vit(sd, toy, x)
    with torch.no_grad():
        assert torch.allclose(model(x), logits, atol=1e-4, rtol=1e-4), (model(x) - logits).abs().max()
        for layer, ref in [(-2, outs[-2]), (-1, outs[-1]), (0, outs[0]), (1, outs[1]), (-3, outs[0])]:
            got = model.forward_features(x, layer=layer)
            assert torch.allclose(got, ref[:, 1:], atol=1e-4, rtol=1e-4), (layer, (got - ref[:, 1:]).abs().max())


def test_checkpoint_key_errors_name_the_keys(toy):
    model = ViT(toy)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    good = random_timm_state_dict(toy)

    bad = dict(good)
    del bad["blocks.1.mlp.fc1.weight"]
    with pytest.raises(ValueError, match=r"1 missing: blocks\.1\.mlp\.fc1\.weight"):
        model.load_state_dict(bad)

    bad = dict(good, **{"blocks.7.attn.qkv.weight": torch.zeros(1), "dist_token": torch.zeros(1, 1, 128)})
    with pytest.raises(ValueError, match=r"2 unexpected: .*blocks\.7\.attn\.qkv\.weight"):
        model.load_state_dict(bad)

    bad = dict(good, pos_embed=torch.zeros(1, 197, 128))
    msg = r"1 mis-shaped: pos_embed: checkpoint \(1, 197, 128\) vs model \(1, 65, 128\)"
    with pytest.raises(ValueError, match=msg):
        model.load_state_dict(bad)

    # a DDP-style "module." prefix: every key is both missing and unexpected; the message shows counts and a cut
    bad = {"module." + k: v for k, v in good.items()}
    with pytest.raises(ValueError, match=rf"{len(good)} missing: .*\(\+{len(good) - 5} more\).*{len(good)} unexpected"):
        model.load_state_dict(bad)

    # the check runs before any copy, so a failed load leaves the model untouched (no silent partial load)
    bad = dict(good, **{"head.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="head.bias"):
        model.load_state_dict(bad)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_load_checkpoint_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_checkpoint(tmp_path / "nowhere.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown extension"):
        load_checkpoint(tmp_path / "w.npz")
    torch.save({"epoch": 3, "args": "x"}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match="state dict"):
        load_checkpoint(tmp_path / "meta.pth")


# ----------------------------------------------------------------------------- the feature tap


def test_toy_tap_shape_is_contract():
    model = ViT("toy")
    assert model.forward_features(torch.randn(2, 3, 128, 128)).shape == (2, 64, 128)
    assert model(torch.randn(2, 3, 128, 128)).shape == (2, 32)


def test_forward_features_layers_and_non_square(toy):
    model = ViT(toy).eval()
    x = torch.randn(2, 3, 96, 160)                                   # h=6, w=10: non-square grid
    with torch.no_grad():
        for layer in range(-3, 3):
            assert model.forward_features(x, layer=layer).shape == (2, 60, 128)
        assert torch.equal(model.forward_features(x, layer=-2), model.forward_features(x, layer=1))
        assert not torch.allclose(model.forward_features(x, layer=-2), model.forward_features(x, layer=-1))
        assert model(x).shape == (2, 32)
    for layer in (3, -4, 1.0):
        with pytest.raises(ValueError, match="layer"):
            model.forward_features(x, layer=layer)


def test_tap_ignores_later_blocks_and_final_norm(toy):
    model = ViT(toy).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        before = model.forward_features(x)                            # layer=-2: output of blocks[1]
        for p in list(model.blocks[-1].parameters()) + list(model.norm.parameters()):
            p.add_(1.0)
        assert torch.equal(model.forward_features(x), before)
        model.blocks[1].mlp.fc2.bias.add_(1.0)
        assert not torch.allclose(model.forward_features(x), before)


def test_tap_tokens_are_row_major():
    """Token r*w + c must come from the patch at grid row r, column c: zero every patch but one and the position
    embedding, and only that token (of the patch embedding output) is non-zero."""
    model = ViT(dataclasses.replace(CONFIGS["toy"], depth=1)).eval()
    with torch.no_grad():
        model.pos_embed.zero_()
        model.patch_embed.proj.bias.zero_()
        x = torch.zeros(1, 3, 64, 96)                                 # h=4, w=6
        x[:, :, 2 * 16:3 * 16, 5 * 16:6 * 16] = torch.randn(3, 16, 16)  # patch at row 2, column 5
        tokens = model.patch_embed(x)[0]                              # (P, C)
    nonzero = tokens.abs().sum(-1).nonzero().flatten().tolist()
    assert nonzero == [2 * 6 + 5], nonzero


# ----------------------------------------------------------------------------- position embedding


def test_pos_embed_identity_at_native_size(toy):
    pe = torch.randn(1, 65, 128)
    assert resample_pos_embed(pe, (8, 8)) is pe                       # no interpolation at all
    model = ViT(toy).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        tokens = model._embed(x)
        ref = torch.cat([model.cls_token, model.patch_embed(x)], 1) + model.pos_embed
    assert torch.equal(tokens, ref)


@pytest.mark.parametrize("hw", [(12, 8), (5, 8), (4, 6), (16, 16)])
def test_pos_embed_resample_behaviour(hw):
    h, w = hw
    g, C = 8, 4
    r = torch.arange(g, dtype=torch.float32)
    grid = torch.zeros(g, g, C)
    grid[..., 0] = 3.0                                                # constant channel
    grid[..., 1] = r[:, None].expand(g, g)                            # varies down the rows only
    grid[..., 2] = r[None, :].expand(g, g)                            # varies along the columns only
    grid[..., 3] = torch.randn(g, g)
    cls = torch.randn(1, 1, C)
    pe = torch.cat([cls, grid.reshape(1, g * g, C)], 1)               # (1, 1+64, C)
    out = resample_pos_embed(pe, (h, w))
    assert out.shape == (1, 1 + h * w, C)
    assert torch.equal(out[:, :1], cls)                               # CLS row kept as is
    new = out[0, 1:].reshape(h, w, C)                                 # row-major grid
    assert torch.allclose(new[..., 0], torch.full((h, w), 3.0), atol=1e-5)
    # a row-only pattern stays row-only (and monotone) after resampling to a non-square grid: catches h/w swaps
    assert torch.allclose(new[..., 1], new[:, :1, 1].expand(h, w), atol=1e-5)
    assert torch.allclose(new[..., 2], new[:1, :, 2].expand(h, w), atol=1e-5)
    assert (new[1:, 0, 1] >= new[:-1, 0, 1] - 1e-5).all() and (new[0, 1:, 2] >= new[0, :-1, 2] - 1e-5).all()
    # the ramp stays mirror-symmetric about the grid centre (bicubic overshoots a little at the clamped borders,
    # so the ends may leave [0, g-1]; that is expected and is what timm does too)
    col = new[:, 0, 1]
    assert torch.allclose(col + col.flip(0), torch.full((h,), g - 1.0), atol=1e-4)
    # align_corners=False: output row i samples source row (i + 0.5) * g / h - 0.5, and cubic reproduces a ramp
    # exactly away from the borders. (align_corners=True would sample i * (g - 1) / (h - 1) instead.)
    if h > g:
        src = (torch.arange(h) + 0.5) * g / h - 0.5
        inner = (src.floor() >= 1) & (src.floor() + 2 <= g - 1)
        assert inner.any()
        assert torch.allclose(col[inner], src[inner], atol=1e-4), (col[inner], src[inner])


def test_pos_embed_used_at_other_sizes(toy):
    """At a non-native size the model adds the resampled embedding, and keeps its dtype."""
    model = ViT(toy).eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        tokens = model._embed(x)
        ref = torch.cat([model.cls_token, model.patch_embed(x)], 1) + resample_pos_embed(model.pos_embed, (6, 10))
        assert torch.equal(tokens, ref)
        model16 = ViT(toy).to(torch.bfloat16)
        assert model16.forward_features(x).dtype == torch.bfloat16   # fp32 pixels are cast to the weights' dtype


# ----------------------------------------------------------------------------- attention paths


def test_sdpa_matches_reference_attention(toy):
    fast = ViT(dataclasses.replace(toy, attn_impl="sdpa")).eval()
    ref = ViT(dataclasses.replace(toy, attn_impl="math")).eval()
    sd = random_timm_state_dict(toy, seed=2)
    fast.load_state_dict(sd)
    ref.load_state_dict(sd)
    assert {m.impl for m in ref.modules() if isinstance(m, vit.Attention)} == {"math"}
    for shape in [(2, 3, 128, 128), (1, 3, 48, 80)]:
        x = torch.randn(shape)
        with torch.no_grad():
            a, b = fast.forward_features(x, layer=-1), ref.forward_features(x, layer=-1)
            diff = (a - b).abs().max().item()
            assert diff < 1e-4, f"sdpa vs math max diff {diff} at {shape}"
            assert (fast(x) - ref(x)).abs().max().item() < 1e-4
    # and the gradients agree (the toy VLM never backprops into the encoder, but a user fine-tuning might)
    x = torch.randn(1, 3, 32, 48)
    ga = torch.autograd.grad(fast(x).sum(), fast.blocks[0].attn.qkv.weight)[0]
    gb = torch.autograd.grad(ref(x).sum(), ref.blocks[0].attn.qkv.weight)[0]
    assert torch.allclose(ga, gb, atol=1e-4, rtol=1e-3), (ga - gb).abs().max()


# ----------------------------------------------------------------------------- bad input


def test_bad_input_shapes_raise_one_line_errors():
    model = ViT("toy")
    cases = [(torch.randn(3, 128, 128), "4-D"), (torch.randn(1, 1, 128, 128), "channels"),
             (torch.randn(1, 3, 100, 128), "multiples of the patch size"),
             (torch.randn(1, 3, 128, 120), "multiples of the patch size")]
    for x, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            model.forward_features(x)
        assert "\n" not in str(e.value) and str(tuple(x.shape)) in str(e.value)
        with pytest.raises(ValueError, match=msg):
            model(x)
