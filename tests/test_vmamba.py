"""VMamba: parameter names, shapes and counts of every preset (vmamba.md §1.5, §2), strict checkpoint round trips,
SS2D direction bookkeeping against an explicit per-direction computation, ref vs chunked model outputs."""
import dataclasses
import re

import pytest
import torch

import vmamba
from vmamba import CONFIGS, VMamba, cross_merge, cross_scan, get_config, load_checkpoint

# preset -> (parameter count, number of state-dict tensors), vmamba.md §1.5 / §2.1 (counted from the official code)
OFFICIAL = {
    "vmambav2_tiny_224": (30_705_832, 222),
    "vmambav2_small_224": (50_147_752, 402),
    "vmambav2_base_224": (88_557_800, 402),
    "vmambav2v_tiny_224": (30_249_064, 276),
    "vmambav2v_small_224": (49_012_840, 492),
    "vmambav2v_base_224": (86_614_504, 492),
    "vmambav0_tiny_224": (22_893_448, 212),
}


def meta_model(name):
    with torch.device("meta"):  # no memory, no init cost: shapes only
        return VMamba(CONFIGS[name])


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_param_count_and_tensor_count(name):
    sd = meta_model(name).state_dict()
    assert sum(v.numel() for v in sd.values()) == OFFICIAL[name][0]
    assert len(sd) == OFFICIAL[name][1]


def test_v2_tiny_names_and_shapes():
    sd = {k: tuple(v.shape) for k, v in meta_model("vmambav2_tiny_224").state_dict().items()}
    expect = {
        "patch_embed.0.weight": (48, 3, 3, 3), "patch_embed.0.bias": (48,), "patch_embed.2.weight": (48,),
        "patch_embed.5.weight": (96, 48, 3, 3), "patch_embed.7.bias": (96,),
        "classifier.norm.weight": (768,), "classifier.head.weight": (1000, 768), "classifier.head.bias": (1000,),
    }
    for i, (C, R) in enumerate([(96, 6), (192, 12), (384, 24), (768, 48)]):
        D, p = 2 * C, f"layers.{i}.blocks.0."
        expect.update({
            p + "norm.weight": (C,), p + "op.in_proj.weight": (D, C), p + "op.conv2d.weight": (D, 1, 3, 3),
            p + "op.x_proj_weight": (4, R + 2, D), p + "op.dt_projs_weight": (4, D, R),
            p + "op.dt_projs_bias": (4, D), p + "op.A_logs": (4 * D, 1), p + "op.Ds": (4 * D,),
            p + "op.out_norm.weight": (D,), p + "op.out_proj.weight": (C, D), p + "norm2.bias": (C,),
            p + "mlp.fc1.weight": (4 * C, C), p + "mlp.fc1.bias": (4 * C,), p + "mlp.fc2.weight": (C, 4 * C),
        })
        if i < 3:
            expect[f"layers.{i}.downsample.1.weight"] = (2 * C, C, 3, 3)
            expect[f"layers.{i}.downsample.3.weight"] = (2 * C,)
    for k, shape in expect.items():
        assert sd.get(k) == shape, f"{k}: {sd.get(k)} != {shape}"
    assert "layers.0.blocks.0.op.conv2d.bias" not in sd and "layers.3.downsample.1.weight" not in sd
    assert "layers.2.blocks.4.mlp.fc2.bias" in sd and "layers.2.blocks.5.norm.weight" not in sd   # 5 blocks


def test_v2v_and_base_shapes():
    sd = {k: tuple(v.shape) for k, v in meta_model("vmambav2v_tiny_224").state_dict().items()}
    assert sd["layers.0.blocks.0.op.x_proj_weight"] == (4, 8, 96)
    assert sd["layers.0.blocks.0.op.A_logs"] == (384, 1)
    assert sd["layers.2.blocks.5.op.in_proj.weight"] == (384, 384)
    assert sd["layers.0.blocks.0.op.dt_projs_weight"] == (4, 96, 6)
    sd = {k: tuple(v.shape) for k, v in meta_model("vmambav2_base_224").state_dict().items()}
    assert sd["patch_embed.0.weight"] == (64, 3, 3, 3) and sd["patch_embed.5.weight"] == (128, 64, 3, 3)
    assert sd["layers.0.blocks.0.op.x_proj_weight"] == (4, 10, 256)
    assert sd["layers.3.blocks.0.op.x_proj_weight"] == (4, 66, 2048)


def test_v0_tiny_names_and_shapes():
    sd = {k: tuple(v.shape) for k, v in meta_model("vmambav0_tiny_224").state_dict().items()}
    p = "layers.0.blocks.0."
    assert sd["patch_embed.0.weight"] == (96, 3, 4, 4) and sd["patch_embed.2.weight"] == (96,)
    assert sd[p + "op.in_proj.weight"] == (384, 96)            # x and z halves
    assert sd[p + "op.conv2d.bias"] == (192,)
    assert sd[p + "op.x_proj_weight"] == (4, 6 + 32, 192)
    assert sd[p + "op.A_logs"] == (768, 16)
    assert sd["layers.0.downsample.reduction.weight"] == (192, 384)
    assert sd["layers.0.downsample.norm.weight"] == (384,)
    assert not any(".mlp." in k or ".norm2." in k for k in sd)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(KeyError, match="vmambav2_tiny_224"):
        get_config("vmamba_huge")
    with pytest.raises(KeyError, match="'toy'"):
        CONFIGS["vmamba_huge"]


def test_toy_shapes_and_size_vs_vit_toy():
    model = VMamba(CONFIGS["toy"]).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert model.forward_features(x, stage=3).shape == (2, 64, 128)
        assert model.forward_features(x, stage=1).shape == (2, 32 * 32, 32)
        assert model(x).shape == (2, 32)
        assert model.forward_features(torch.randn(1, 3, 128, 96)).shape == (1, 8 * 6, 128)   # non-square
    n = sum(p.numel() for p in model.parameters())
    vit = pytest.importorskip("vit")
    n_vit = sum(p.numel() for p in vit.ViT(vit.CONFIGS["toy"]).parameters())
    assert abs(n - n_vit) <= 0.2 * n_vit, f"toy VMamba {n} vs toy ViT {n_vit} params"


def test_forward_features_is_row_major_and_before_downsample():
    model = VMamba(CONFIGS["toy"]).eval()
    perturb(model)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        tokens = model.forward_features(x, stage=2)                     # (1, 8*12, 64)
        grid = model.layers[1].blocks(model.layers[0](model.patch_embed(x)))   # (1, 8, 12, 64)
    assert tokens.shape == (1, 8 * 12, 64)
    assert torch.equal(tokens[0, 1 * 12 + 5], grid[0, 1, 5])           # token h*W + w is pixel (h, w)
    with pytest.raises(ValueError, match="stage=4"):
        model.forward_features(x, stage=4)
    with pytest.raises(ValueError, match=r"x has shape \(1, 1, 64, 96\)"):
        model(torch.randn(1, 1, 64, 96))


def perturb(model, scale=0.05, seed=0):
    """Break the symmetric init (identical A_logs/Ds/norms across directions) so permutation bugs show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_cross_scan_and_merge_indexing():
    B, D, H, W = 1, 2, 3, 5                                            # non-square so an H/W swap shows
    x = torch.randn(B, D, H, W)
    xs = cross_scan(x)
    L = H * W
    for h in range(H):
        for w in range(W):
            assert torch.equal(xs[0, 0, :, h * W + w], x[0, :, h, w])
            assert torch.equal(xs[0, 1, :, w * H + h], x[0, :, h, w])
            assert torch.equal(xs[0, 2, :, L - 1 - (h * W + w)], x[0, :, h, w])
            assert torch.equal(xs[0, 3, :, L - 1 - (w * H + h)], x[0, :, h, w])
    ys = torch.randn(B, 4, D, L)
    y = cross_merge(ys, H, W)
    for h in range(H):
        for w in range(W):
            want = ys[0, 0, :, h * W + w] + ys[0, 2, :, L - 1 - (h * W + w)] \
                + ys[0, 1, :, w * H + h] + ys[0, 3, :, L - 1 - (w * H + h)]
            assert torch.allclose(y[0, :, h, w], want)


@pytest.mark.parametrize("forward_type", ["v05_noz", "v0"])
def test_ss2d_matches_explicit_per_direction_scans(forward_type):
    """SS2D vs a slow rewrite that scans each direction on its own, with its own slice of every parameter."""
    torch.manual_seed(0)
    C, N = 8, 3
    op = vmamba.SS2D(C, N, 2.0, "auto", 3, forward_type == "v0", forward_type, "ref")
    perturb(op, 0.3)
    H, W = 3, 4
    x = torch.randn(2, H, W, C)
    with torch.no_grad():
        got = op(x)
        D, R, L = op.d_inner, op.dt_rank, H * W
        xz = op.in_proj(x)
        xi, z = (xz.chunk(2, -1) if op.gated else (xz, None))
        xi = op.act(op.conv2d(xi.permute(0, 3, 1, 2)))                 # (B, D, H, W)
        orders = [[h * W + w for h in range(H) for w in range(W)],     # row-major
                  [h * W + w for w in range(W) for h in range(H)]]     # column-major
        orders += [o[::-1] for o in orders]
        flat = xi.flatten(2)                                           # (B, D, L) row-major
        y = torch.zeros(2, D, L)
        for k, order in enumerate(orders):
            seq = flat[:, :, order]                                    # (B, D, L) in scan order
            proj = torch.einsum("bdl,cd->bcl", seq, op.x_proj_weight[k])
            dt, Bk, Ck = proj.split([R, N, N], dim=1)
            dt = torch.einsum("brl,dr->bdl", dt, op.dt_projs_weight[k])
            rows = slice(k * D, (k + 1) * D)
            yk = vmamba.selective_scan_ref(seq, dt, -torch.exp(op.A_logs[rows]), Bk[:, None], Ck[:, None],
                                           op.Ds[rows], op.dt_projs_bias[k], True)
            y[:, :, order] += yk                                       # back to row-major positions
        y = op.out_norm(y.view(2, D, H, W).permute(0, 2, 3, 1))
        if op.gated:
            y = y * torch.nn.functional.silu(z)                        # v0 gate: y * silu(z)
        want = op.out_proj(y)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("name", ["toy", "v0_small"])
def test_ref_and_chunked_models_agree(name):
    cfg = CONFIGS["toy"] if name == "toy" else dataclasses.replace(
        CONFIGS["vmambav0_tiny_224"], dims=(16, 32), depths=(1, 1), num_classes=5)
    torch.manual_seed(0)
    model = VMamba(cfg).eval()
    perturb(model)
    x = torch.randn(2, 3, 64, 32)                                      # non-square
    outs = {}
    for backend in ("ref", "chunked"):
        for m in model.modules():
            if isinstance(m, vmamba.SS2D):
                m.scan_backend = backend
        with torch.no_grad():
            outs[backend] = (model(x), model.forward_features(x, stage=2))
    for a, b in zip(outs["ref"], outs["chunked"]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_backward_through_model():
    model = VMamba(CONFIGS["toy"])
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_checkpoint_round_trip_official_container(tmp_path):
    torch.manual_seed(0)
    src = VMamba(CONFIGS["toy"]).eval()
    perturb(src)
    path = tmp_path / "vssm_toy.pth"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)          # the official container
    dst = VMamba(CONFIGS["toy"]).eval()
    dst.load_state_dict(load_checkpoint(str(path)), strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    from safetensors.torch import save_file
    save_file(src.state_dict(), str(tmp_path / "m.safetensors"))
    dst2 = VMamba(CONFIGS["toy"]).eval()
    dst2.load_state_dict(load_checkpoint(str(tmp_path / "m.safetensors")))
    with torch.no_grad():
        assert torch.equal(src(x), dst2(x))


def test_legacy_and_4d_linear_keys_are_converted(tmp_path):
    cfg = dataclasses.replace(CONFIGS["vmambav0_tiny_224"], dims=(16, 32), depths=(1, 1), num_classes=5)
    src = VMamba(cfg)
    old = {}
    for k, v in src.state_dict().items():   # Jan-2024 names (vmamba.md §2.4) and Linear2d-style 4-D weights
        k = re.sub(r"^patch_embed\.0\.", "patch_embed.proj.", k)
        k = re.sub(r"^patch_embed\.2\.", "patch_embed.norm.", k)
        k = re.sub(r"^classifier\.", "", k)
        k = re.sub(r"(blocks\.\d+)\.norm\.", r"\1.ln_1.", k)
        k = k.replace(".op.", ".self_attention.")
        old[k] = v[:, :, None, None] if k.endswith("out_proj.weight") else v
    assert "layers.0.blocks.0.ln_1.weight" in old and "head.weight" in old and "patch_embed.proj.weight" in old
    torch.save({"model": old}, tmp_path / "old.pth")
    dst = VMamba(cfg)
    dst.load_state_dict(load_checkpoint(str(tmp_path / "old.pth")))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_bad_state_dict_lists_missing_unexpected_misshaped():
    model = VMamba(CONFIGS["toy"])
    sd = model.state_dict()
    sd.pop("layers.0.blocks.0.op.Ds")
    sd.pop("classifier.head.bias")
    sd["layers.0.blocks.0.op.conv2d.bias"] = torch.zeros(64)
    sd["layers.1.blocks.0.op.A_logs"] = torch.zeros(512, 2)
    with pytest.raises(ValueError) as e:
        model.load_state_dict(sd)
    msg = str(e.value)
    assert "2 missing: layers.0.blocks.0.op.Ds, classifier.head.bias" in msg
    assert "1 unexpected: layers.0.blocks.0.op.conv2d.bias" in msg
    assert "1 mis-shaped: layers.1.blocks.0.op.A_logs: checkpoint (512, 2) vs model (256, 1)" in msg
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        load_checkpoint("no_such.pth")
