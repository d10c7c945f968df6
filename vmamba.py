"""
VMamba (visual state-space model, "SS2D") from scratch, with parameter names and shapes equal to the official
ImageNet-1K checkpoints, and the selective scan behind one switch: a readable loop, a fast pure-PyTorch
chunked scan, and a CUDA kernel (selective_scan.cu, built on first use).

References
    VMamba paper:        Liu et al. 2024, "VMamba: Visual State Space Model", https://arxiv.org/abs/2401.10166
    Official code:       https://github.com/MzeroMiko/VMamba  (classification/models/vmamba.py: VSSM, SS2D)
    Selective scan:      Gu & Dao 2023, "Mamba", https://arxiv.org/abs/2312.00752 (Alg. 2, S6), and
                         https://github.com/state-spaces/mamba (selective_scan_ref / csrc/selective_scan)
    Facts used here:     ../shared/reference/vmamba.md (configs §1.5, key names §2, SS2D math §3, scan §4, shapes §7)

Glossary (shape letters used in every comment below)
    B      batch size (also the input-dependent SSM matrix "B" -- which one is meant is clear from context:
           the matrix is always written Bs / B_t, the batch size appears in shapes)
    C      channels of the token grid at a stage (the model width, C_s = dims[s-1]); also the SSM matrix C_t
    H, W   height and width of the token grid at a stage; L = H*W tokens per scan
    D      d_inner = ssm_ratio * C, channels inside SS2D (paper: the expanded dimension E*D)
    K      number of scan directions, always 4 (row-major, column-major, and both reversed)
    KD     K*D, the channels the scan sees after the 4 directions are stacked (k-major: row k*D + d)
    N      d_state, the SSM state size per channel (1 for all v2 releases, 16 for v0)
    R      dt_rank = ceil(C / 16), the rank of the low-rank projection that produces delta
    G      groups of B_t / C_t in the scan: channel d uses group d // (KD // G); in VMamba G = K = 4,
           i.e. each direction has its own input-dependent B_t and C_t shared by its D channels
    delta  the per-token, per-channel step size (paper: Delta); A the (negative) state matrix, diagonal

The selective scan (what all three backends compute, per batch b, channel d, state n):
    delta_t = softplus(delta_t + delta_bias_d)                 (if delta_softplus)
    h_t     = exp(delta_t * A_dn) * h_{t-1} + delta_t * B_{g(d),n,t} * u_t       h_{-1} = 0
    y_t     = sum_n C_{g(d),n,t} * h_t,n + D_d * u_t
"""
import math
import os
import shutil
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ============================================================================= selective scan

SCAN_BACKENDS = ("auto", "ref", "chunked", "cuda")
_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t):
    return tuple(t.shape)


def _check_scan_args(u, delta, A, B, C, D, delta_bias, backend):
    """Validate the selective_scan arguments; raise one ValueError line naming the bad argument."""
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"selective_scan: backend={backend!r}, expected one of {SCAN_BACKENDS}")
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"selective_scan: {name} is {type(t).__name__}, expected a torch.Tensor")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u has shape {_shape(u)}, expected (B, KD, L)")
    Bsz, KD, L = u.shape
    if u.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"selective_scan: u has dtype {u.dtype}, expected float32, float16 or bfloat16")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta has shape {_shape(delta)}, expected {_shape(u)} (same as u)")
    if delta.dtype != u.dtype:
        raise ValueError(f"selective_scan: delta has dtype {delta.dtype}, expected {u.dtype} (same as u)")
    # A, D and delta_bias are fp32 in every VMamba/Mamba kernel; float64 is accepted only for gradcheck.
    wdt = (torch.float64,) if u.dtype == torch.float64 else (torch.float32,)
    if A.dim() != 2 or A.shape[0] != KD:
        raise ValueError(f"selective_scan: A has shape {_shape(A)}, expected ({KD}, N) (KD from u)")
    N = A.shape[1]
    if A.dtype not in wdt:
        raise ValueError(f"selective_scan: A has dtype {A.dtype}, expected {wdt[0]}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != Bsz or t.shape[2] != N or t.shape[3] != L:
            raise ValueError(f"selective_scan: {name} has shape {_shape(t)}, expected ({Bsz}, G, {N}, {L}) "
                             f"with G dividing KD={KD}")
        if t.shape[1] == 0 or KD % t.shape[1] != 0:
            raise ValueError(f"selective_scan: {name} has shape {_shape(t)}, its group count G={t.shape[1]} "
                             f"must divide KD={KD}")
        if t.dtype != u.dtype:
            raise ValueError(f"selective_scan: {name} has dtype {t.dtype}, expected {u.dtype} (same as u)")
    if B.shape != C.shape:
        raise ValueError(f"selective_scan: C has shape {_shape(C)}, expected {_shape(B)} (same as B)")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (KD,):
            raise ValueError(f"selective_scan: {name} has shape {_shape(t) if isinstance(t, torch.Tensor) else t}"
                             f", expected ({KD},)")
        if t.dtype not in wdt:
            raise ValueError(f"selective_scan: {name} has dtype {t.dtype}, expected {wdt[0]}")
    devices = {t.device for t in (u, delta, A, B, C, D, delta_bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"selective_scan: arguments are on different devices {sorted(map(str, devices))}, "
                         f"expected one device")


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend="auto"):
    """The selective scan (S6) with grouped, input-dependent B and C.

    Args:
        u:      (B, KD, L) float32/float16/bfloat16 -- the input sequence of every channel
        delta:  (B, KD, L) same dtype as u -- step sizes before the optional bias + softplus
        A:      (KD, N) float32 -- the diagonal state matrix (negative for a stable scan)
        B, C:   (B, G, N, L) same dtype as u -- channel d reads group d // (KD // G)
        D:      (KD,) float32 or None -- skip connection D * u
        delta_bias: (KD,) float32 or None -- added to delta before the softplus
        delta_softplus: apply softplus to delta (+ bias)
        backend: "ref" (loop over L), "chunked" (fast PyTorch), "cuda" (selective_scan.cu),
                 "auto" (cuda for CUDA tensors when the kernel builds, else chunked)
    Returns:
        y: (B, KD, L) float32 (float64 for float64 inputs), differentiable w.r.t. every tensor argument
    """
    _check_scan_args(u, delta, A, B, C, D, delta_bias, backend)
    if backend == "auto":
        backend = "cuda" if (u.is_cuda and _kernel_available()) else "chunked"
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if backend == "chunked":
        return _ChunkedScan.apply(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))
    if not u.is_cuda:
        raise ValueError(f"selective_scan: backend='cuda' needs CUDA tensors, got u on {u.device}")
    return _CudaScan.apply(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))


def selective_scan_ref(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """The readable reference: one step of the recurrence per token, state kept in fp32.

    Read it next to the three lines in the module docstring; autograd differentiates through the loop.
    (No argument checks here: call `selective_scan(..., backend="ref")` for those.)
    """
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32  # compute dtype: fp32 state always
    Bsz, KD, L = u.shape
    N = A.shape[1]
    G = B.shape[1]
    u, delta, B, C = u.to(cdt), delta.to(cdt), B.to(cdt), C.to(cdt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[None, :, None]             # (B, KD, L)
    if delta_softplus:
        delta = F.softplus(delta)                                     # (B, KD, L), threshold 20 like the kernels
    # group g serves channels g*(KD//G) ... (g+1)*(KD//G)-1, so repeat each group KD//G times along channels
    B = B.repeat_interleave(KD // G, dim=1)                           # (B, G, N, L) -> (B, KD, N, L)
    C = C.repeat_interleave(KD // G, dim=1)                           # (B, G, N, L) -> (B, KD, N, L)
    A = A.to(cdt)                                                     # (KD, N)
    h = u.new_zeros(Bsz, KD, N)                                       # (B, KD, N) the state h_{-1} = 0
    # Split the sequences into per-step views once. (Indexing x[..., t] inside the loop reads the same, but
    # its backward writes a full-size zero tensor per step: O(L^2) work, 100x slower at L = 3136.)
    u_t, dt_t, B_t, C_t = u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1)  # L x (B, KD[, N])
    ys = []
    for t in range(L):
        dt = dt_t[t][:, :, None]                                      # (B, KD, 1)
        decay = torch.exp(dt * A)                                     # (B, KD, N)  exp(delta_t A), in (0, 1]
        h = decay * h + dt * B_t[t] * u_t[t][:, :, None]              # (B, KD, N)  h_t
        ys.append((h * C_t[t]).sum(-1))                               # (B, KD)     y_t = C_t . h_t
    y = torch.stack(ys, dim=-1)                                       # (B, KD, L)
    if D is not None:
        y = y + D.to(cdt)[None, :, None] * u                          # (B, KD, L)
    return y


# ----------------------------------------------------------------------------- chunked scan (pure PyTorch)
# Why not just a cumsum? The closed form h_t = exp(S_t) * cumsum_s(exp(-S_s) x_s), with S the cumulative
# log-decay, needs exp(-S_s), which overflows to inf as soon as sum(delta*|A|) passes ~88 (fp32) -- easy at
# L = 3136 or with a large delta -- and then inf * 0 = NaN. Instead we combine affine maps h -> a*h + x
# (a = exp(delta*A) in (0, 1]) with a parallel (Hillis-Steele) scan inside chunks of SCAN_CHUNK tokens: it
# only ever multiplies decays together, and a product of numbers in [0, 1] can underflow to 0 (correctly) but
# never overflow. The chunk ends are then combined by the same scan, recursively, on a sequence SCAN_CHUNK
# times shorter, and each chunk is corrected with its incoming state. Work is O(L log SCAN_CHUNK), a
# handful of full-size tensor passes, so it is fast in PyTorch on CPU and GPU.
# Memory: the autograd.Function below saves its inputs plus the states h and the softplus'ed delta (fp32), so
# backward skips a second forward scan; the gradient is the same kind of scan run backwards in time (the
# adjoint recurrence), so no per-step autograd graph is ever stored.

SCAN_CHUNK = 16  # tokens per chunk; 8..64 are within noise of each other on CPU at L = 3136


def _hillis_steele(a, x, reverse=False, inplace=False):
    """Inclusive scan of affine maps along the last axis: returns (prod_{s<=t} a_s, h_t from h_{-1} = 0).

    reverse=True runs right to left instead: h_t = a_t * h_{t+1} + x_t, products over s >= t.
    inplace=True overwrites a and x (the caller owns them), saving two full-size copies.
    """
    if not inplace:
        a, x = a.clone(), x.clone()
    T = a.shape[-1]
    step = 1
    while step < T:
        # compose with the map `step` positions earlier (both right-hand sides read the old values)
        if reverse:
            x[..., :-step] += a[..., :-step] * x[..., step:]          # (..., T - step)
            a[..., :-step] = a[..., :-step] * a[..., step:]           # (..., T - step)
        else:
            x[..., step:] += a[..., step:] * x[..., :-step]           # (..., T - step)
            a[..., step:] = a[..., step:] * a[..., :-step]            # (..., T - step)
        step *= 2
    return a, x


def _linear_scan(a, x, reverse=False, chunk=SCAN_CHUNK, inplace=False):
    """h_t = a_t * h_{t-1} + x_t along the last axis with h_{-1} = 0; a, x (..., L) -> h (..., L).

    reverse=True: h_t = a_t * h_{t+1} + x_t with h_L = 0 (the adjoint recurrence of backward).
    inplace=True: a and x are temporaries of the caller's and may be overwritten (no defensive copies).
    """
    L = a.shape[-1]
    if L <= chunk:
        return _hillis_steele(a, x, reverse, inplace)[1]
    nc = -(-L // chunk)                                               # number of chunks
    pad = nc * chunk - L
    if pad:  # padding maps (a = 1, x = 0) at the end change no earlier state (and give 0 in reverse)
        a = F.pad(a, (0, pad), value=1.0)                             # (..., nc*chunk)
        x = F.pad(x, (0, pad))                                        # (..., nc*chunk)
        inplace = True                                                # F.pad made fresh tensors we own
    a = a.reshape(*a.shape[:-1], nc, chunk)                           # (..., nc, chunk)
    x = x.reshape(*x.shape[:-1], nc, chunk)                           # (..., nc, chunk)
    decay, h_local = _hillis_steele(a, x, reverse, inplace)           # (..., nc, chunk) each, from zero state
    # the true state at each chunk's last step: the same recurrence over chunk ends, nc times shorter
    last = 0 if reverse else -1  # in reverse the "last" step of a chunk is its first position
    h_end = _linear_scan(decay[..., last], h_local[..., last], reverse, chunk)  # (..., nc)
    # state entering each chunk = the end state of the previous chunk (next chunk in reverse), 0 at the edge
    h_in = F.pad(h_end[..., 1:], (0, 1)) if reverse else F.pad(h_end[..., :-1], (1, 0))  # (..., nc)
    h = h_local + decay * h_in[..., None]                             # (..., nc, chunk)
    return h.reshape(*h.shape[:-2], nc * chunk)[..., :L]              # (..., L)


def _scan_dt(delta, delta_bias, delta_softplus):
    """delta after the optional bias and softplus, in the compute dtype: (B, KD, L)."""
    dt = delta.to(torch.float64 if delta.dtype == torch.float64 else torch.float32)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[None, :, None]              # (B, KD, L)
    if delta_softplus:
        dt = F.softplus(dt)                                           # (B, KD, L)
    return dt


def _scan_inputs(u, dt, A, B, G):
    """Shared math of the chunked scan, viewing channels as (G, H) so B/C broadcast and are never copied.

    Returns dt, u as (B, G, H, 1, L), A as (1, G, H, N, 1), B as (B, G, 1, N, L), and the decay a and the
    input x of the recurrence, (B, G, H, N, L). (Here H = KD // G, channels per group, not image height.)
    """
    Bsz, KD, L = u.shape
    dt = dt.view(Bsz, G, KD // G, 1, L)                               # (B, G, H, 1, L)
    u5 = u.to(dt.dtype).view(Bsz, G, KD // G, 1, L)                   # (B, G, H, 1, L)
    A5 = A.to(dt.dtype).view(1, G, KD // G, -1, 1)                    # (1, G, H, N, 1)
    B5 = B.to(dt.dtype)[:, :, None]                                   # (B, G, 1, N, L)
    a = torch.exp(dt * A5)                                            # (B, G, H, N, L) decay in (0, 1]
    x = (dt * u5) * B5                                                # (B, G, H, N, L) delta_t B_t u_t
    return dt, u5, A5, B5, a, x


class _ChunkedScan(torch.autograd.Function):
    """selective_scan backend "chunked": parallel-in-chunks forward, adjoint scan backward (hand-written)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        Bsz, KD, L = u.shape
        G = B.shape[1]
        with torch.no_grad():
            dt = _scan_dt(delta, delta_bias, delta_softplus)          # (B, KD, L)
            _, u5, A5, B5, a, x = _scan_inputs(u, dt, A, B, G)
            h = _linear_scan(a, x, inplace=True)  # (B, G, H, N, L) the states h_t (a, x are ours to overwrite)
            y = (h * C.to(h.dtype)[:, :, None]).sum(3)                # (B, G, H, L)   C_t . h_t
            y = y.reshape(Bsz, KD, L)                                 # (B, KD, L)
            if D is not None:
                y = y + D.to(y.dtype)[None, :, None] * u.to(y.dtype)  # (B, KD, L)
        # Saving the states h (B, KD, N, L) and dt (B, KD, L) in fp32 costs memory but spares backward a
        # whole forward scan and the softplus.
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, h, dt)
        ctx.delta_softplus = delta_softplus
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, delta_bias, h, dt_flat = ctx.saved_tensors  # h (B, G, H, N, L), dt (B, KD, L)
        Bsz, KD, L = u.shape
        G, N = B.shape[1], A.shape[1]
        with torch.no_grad():
            dt, u5, A5, B5, a, x = _scan_inputs(u, dt_flat, A, B, G)
            cdt = h.dtype
            dy = dy.to(cdt)                                           # (B, KD, L)
            dy5 = dy.view(Bsz, G, KD // G, 1, L)                      # (B, G, H, 1, L)
            C5 = C.to(cdt)[:, :, None]                                # (B, G, 1, N, L)
            dC = (dy5 * h).sum(2)                                     # (B, G, N, L) summed over the group
            # adjoint g_t = dLoss/dh_t obeys g_t = C_t dy_t + a_{t+1} g_{t+1}: the same scan, backwards in time
            a_next = F.pad(a[..., 1:], (0, 1))                        # (B, G, H, N, L) a_{t+1}, 0 past the end
            g = _linear_scan(a_next, dy5 * C5, reverse=True, inplace=True)  # (B, G, H, N, L)
            del a_next
            # h_t = a_t h_{t-1} + x_t, so dLoss/d(delta_t A) = g_t * a_t h_{t-1} = g_t * (h_t - x_t)
            dz = g * (h - x)                                          # (B, G, H, N, L)
            del h, x, a
            gB = (g * B5).sum(3, keepdim=True)                        # (B, G, H, 1, L) dLoss/dx summed . B
            du = (gB * dt).reshape(Bsz, KD, L)                        # (B, KD, L)
            ddt = gB * u5 + (dz * A5).sum(3, keepdim=True)            # (B, G, H, 1, L)
            dA = (dz * dt).sum((0, 4)).reshape(KD, N)                 # (KD, N)
            dB = (g * (dt * u5)).sum(2)                               # (B, G, N, L)
            del g, dz
            ddt = ddt.reshape(Bsz, KD, L)                             # (B, KD, L)
            dD = None
            if D is not None:
                du = du + D.to(cdt)[None, :, None] * dy               # (B, KD, L)
                dD = (dy * u.to(cdt)).sum((0, 2)).to(D.dtype)         # (KD,)
            if ctx.delta_softplus:  # d softplus(z)/dz = sigmoid(z) = 1 - exp(-softplus(z)), from the saved dt
                ddt = ddt * -torch.expm1(-dt_flat)                    # (B, KD, L)
            ddb = ddt.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
        return (du.to(u.dtype), ddt.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                dD, ddb, None)


# ----------------------------------------------------------------------------- CUDA kernel (selective_scan.cu)

_KERNEL = None          # the compiled extension, once built
_KERNEL_ERROR = None    # the build error, so "auto" does not retry a failing build on every call


def load_kernel(verbose=False):
    """Build (once) and return the selective_scan.cu extension; needs nvcc and a CUDA build of torch, no GPU.

    Raises RuntimeError with one sentence when torch has no CUDA or nvcc is missing.
    """
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    if torch.version.cuda is None:
        raise RuntimeError(f"load_kernel: this torch build ({torch.__version__}) has no CUDA support, so the "
                           f"selective_scan.cu extension cannot be built; install a CUDA build of torch")
    from torch.utils import cpp_extension
    cuda_home = cpp_extension.CUDA_HOME
    if not ((cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))) or shutil.which("nvcc")):
        raise RuntimeError("load_kernel: nvcc was not found (CUDA_HOME is unset or has no bin/nvcc, and nvcc is "
                           "not on PATH); install the CUDA toolkit matching torch.version.cuda="
                           f"{torch.version.cuda}")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "selective_scan.cu")
    if not os.path.exists(src):
        raise RuntimeError(f"load_kernel: the kernel source {src} does not exist")
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # no GPU to query: compile for A100 (8.0) and H100 (9.0) so the build still works on a CPU machine
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    _KERNEL = cpp_extension.load(name="selective_scan_cuda", sources=[src], verbose=verbose,
                                 extra_cuda_cflags=["-O3", "--use_fast_math", "--expt-relaxed-constexpr"])
    return _KERNEL


def _kernel_available():
    """True when the extension builds; a failure is warned about once and "auto" falls back to chunked."""
    global _KERNEL_ERROR
    if _KERNEL is not None:
        return True
    if _KERNEL_ERROR is not None:
        return False
    try:
        load_kernel()
        return True
    except Exception as e:  # noqa: BLE001 -- any build failure means: use the PyTorch path
        _KERNEL_ERROR = e
        warnings.warn(f"selective_scan: CUDA kernel unavailable ({str(e).splitlines()[0]}); using 'chunked'")
        return False


class _CudaScan(torch.autograd.Function):
    """selective_scan backend "cuda": ext.fwd / ext.bwd from selective_scan.cu (contract in contracts.md)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        ext = load_kernel()
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        y, saved = ext.fwd(u, delta, A, B, C, D, delta_bias, delta_softplus)   # y (B, KD, L) fp32
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, saved)
        ctx.delta_softplus = delta_softplus
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, delta_bias, saved = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddb = load_kernel().bwd(
            u, delta, A, B, C, D, delta_bias, dy.float().contiguous(), saved, ctx.delta_softplus)
        return du, ddelta, dA, dB, dC, dD, ddb, None


# ============================================================================= model config

@dataclass
class VMambaConfig:
    """One VMamba (VSSM) model. Field names follow the official yaml keys (vmamba.md §1.4)."""
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    depths: tuple = (2, 2, 5, 2)          # blocks per stage
    dims: tuple = (96, 192, 384, 768)     # channels per stage; an int d means (d, 2d, 4d, 8d)
    d_state: int = 1                      # N
    ssm_ratio: float = 2.0                # D = int(ssm_ratio * C)
    dt_rank: object = "auto"              # R; "auto" = ceil(C / 16)
    d_conv: int = 3                       # depthwise conv kernel inside SS2D
    conv_bias: bool = False
    forward_type: str = "v05_noz"         # "v05_noz" (all v2 releases) or "v0" (z gating, fp32 scan)
    mlp_ratio: float = 4.0                # 0 = no MLP branch (v0)
    patchembed_version: str = "v2"        # "v1": one 4x4 conv; "v2": two 3x3 stride-2 convs
    downsample_version: str = "v3"        # "v1": patch merging; "v2": 2x2 conv; "v3": 3x3 stride-2 conv
    drop_path_rate: float = 0.2           # training only
    scan_backend: str = "auto"            # see selective_scan

    def __post_init__(self):
        if isinstance(self.dims, int):
            self.dims = tuple(self.dims * 2 ** i for i in range(len(self.depths)))
        self.dims, self.depths = tuple(self.dims), tuple(self.depths)
        if len(self.dims) != len(self.depths):
            raise ValueError(f"VMambaConfig: dims {self.dims} and depths {self.depths} must have the same length")
        if self.forward_type not in ("v05_noz", "v0"):
            raise ValueError(f"VMambaConfig: forward_type={self.forward_type!r}, expected 'v05_noz' or 'v0'")
        if self.patchembed_version not in ("v1", "v2"):
            raise ValueError(f"VMambaConfig: patchembed_version={self.patchembed_version!r}, expected v1 or v2")
        if self.downsample_version not in ("v1", "v2", "v3"):
            raise ValueError(f"VMambaConfig: downsample_version={self.downsample_version!r}, expected v1/v2/v3")
        if self.scan_backend not in SCAN_BACKENDS:
            raise ValueError(f"VMambaConfig: scan_backend={self.scan_backend!r}, expected one of {SCAN_BACKENDS}")


def _v2(dims, depths, ratio, dp):
    return VMambaConfig(dims=dims, depths=depths, ssm_ratio=ratio, drop_path_rate=dp)


class _Presets(dict):
    """A dict whose unknown-key error lists the valid preset names."""

    def __missing__(self, name):
        raise KeyError(f"unknown VMamba preset {name!r}; valid: {sorted(self)}")


# Presets named after the official config files (vmamba.md §1.5). v2: d_state 1, v05_noz, ln2d, pe v2, ds v3.
CONFIGS = _Presets({
    "vmambav2_tiny_224": _v2(96, (2, 2, 5, 2), 2.0, 0.2),
    "vmambav2_small_224": _v2(96, (2, 2, 15, 2), 2.0, 0.3),
    "vmambav2_base_224": _v2(128, (2, 2, 15, 2), 2.0, 0.6),
    "vmambav2v_tiny_224": _v2(96, (2, 2, 8, 2), 1.0, 0.2),
    "vmambav2v_small_224": _v2(96, (2, 2, 20, 2), 1.0, 0.3),
    "vmambav2v_base_224": _v2(128, (2, 2, 20, 2), 1.0, 0.5),
    "vmambav0_tiny_224": VMambaConfig(dims=96, depths=(2, 2, 9, 2), d_state=16, ssm_ratio=2.0, conv_bias=True,
                                      forward_type="v0", mlp_ratio=0.0, patchembed_version="v1",
                                      downsample_version="v1", drop_path_rate=0.2),
    # CPU default of the project: v2v-style (ssm_ratio 1.0), 128x128 images, stride 16 at stage 3 -> 8x8 = 64
    # tokens of 128 channels. Three stages, not four: the VLM taps stage 3, and a fourth 256-wide stage would add
    # ~1.1M parameters that nothing uses. One block in each high-resolution stage and six at stride 16: the scan
    # over 32x32 tokens is what costs on a CPU, and this layout trains 3x faster than (2, 2, 5) at ratio 2.0.
    # 1.22M parameters with 32 classes, against ViT toy's 1.30M.
    "toy": VMambaConfig(img_size=128, num_classes=32, dims=(32, 64, 128), depths=(1, 1, 6), ssm_ratio=1.0,
                        drop_path_rate=0.0),
})


def get_config(name):
    """CONFIGS[name]; an unknown name raises a KeyError that lists the valid names."""
    return CONFIGS[name]


# ============================================================================= model

class Permute(nn.Module):
    """A parameter-free slot that keeps the official nn.Sequential indices (patch_embed.2, downsample.3, ...)."""

    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training (no parameters)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class PatchMerging2D(nn.Module):
    """Downsample "v1" (Swin): concat the 4 pixels of each 2x2 cell -> LayerNorm(4C) -> Linear(4C -> C')."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):                                             # x (B, H, W, C)
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))                  # (B, H+H%2, W+W%2, C)
        x0 = x[:, 0::2, 0::2]                                         # (B, H/2, W/2, C) even row, even col
        x1 = x[:, 1::2, 0::2]                                         # (B, H/2, W/2, C) odd row, even col
        x2 = x[:, 0::2, 1::2]                                         # (B, H/2, W/2, C) even row, odd col
        x3 = x[:, 1::2, 1::2]                                         # (B, H/2, W/2, C) odd row, odd col
        x = torch.cat([x0, x1, x2, x3], dim=-1)                       # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))                           # (B, H/2, W/2, C')


def _downsample(version, dim, out_dim):
    """The stage-to-stage downsample; input and output channel-last (B, H, W, C)."""
    if version == "v1":
        return PatchMerging2D(dim, out_dim)
    k, p = (2, 0) if version == "v2" else (3, 1)
    return nn.Sequential(Permute(0, 3, 1, 2),                         # (B, C, H, W)
                         nn.Conv2d(dim, out_dim, kernel_size=k, stride=2, padding=p),  # (B, C', H/2, W/2)
                         Permute(0, 2, 3, 1),                         # (B, H/2, W/2, C')
                         nn.LayerNorm(out_dim))


def _patch_embed(version, in_chans, dim, patch_size):
    """Image (B, 3, H, W) -> tokens (B, H/4, W/4, C0), channel-last; indices match the official Sequential."""
    if version == "v1":
        return nn.Sequential(nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
                             Permute(0, 2, 3, 1),                     # (B, H/4, W/4, C0)
                             nn.LayerNorm(dim))
    s = patch_size // 2  # two stride-2 convs give the same total stride 4
    return nn.Sequential(nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=s, padding=1),  # (B, C0/2, H/2, W/2)
                         Permute(0, 2, 3, 1), nn.LayerNorm(dim // 2), Permute(0, 3, 1, 2),
                         nn.GELU(),
                         nn.Conv2d(dim // 2, dim, kernel_size=3, stride=s, padding=1),  # (B, C0, H/4, W/4)
                         Permute(0, 2, 3, 1),                         # (B, H/4, W/4, C0)
                         nn.LayerNorm(dim))


def cross_scan(x):
    """Unroll a feature map into the 4 scan orders that SS2D runs its 1-D scan along.

    Think of the H x W grid as a page of text. Direction 0 reads it like English (row by row, left to right:
    token index h*W + w); direction 1 reads it column by column, top to bottom (index w*H + h, i.e. the
    transposed grid read row-major); directions 2 and 3 read those same two orders backwards. After the 4
    scans, every pixel has "seen" (through the state) everything before it in 4 different orders, which
    together cover the whole image -- the 2-D receptive field that a single causal 1-D scan lacks.

    x: (B, D, H, W) -> xs: (B, K=4, D, L=H*W)
    """
    row = x.flatten(2)                                                # (B, D, L) index h*W + w
    col = x.transpose(2, 3).flatten(2)                                # (B, D, L) index w*H + h
    return torch.stack([row, col, row.flip(-1), col.flip(-1)], dim=1)  # (B, 4, D, L)


def cross_merge(ys, H, W):
    """Undo cross_scan and sum: pixel (h, w) gets ys0[h*W+w] + ys2[L-1-(h*W+w)] + ys1[w*H+h] + ys3[L-1-(w*H+h)].

    ys: (B, K=4, D, L) -> y: (B, D, H, W)
    """
    Bsz, K, D, L = ys.shape
    row = ys[:, 0] + ys[:, 2].flip(-1)                                # (B, D, L) both in row-major order
    col = ys[:, 1] + ys[:, 3].flip(-1)                                # (B, D, L) both in column-major order
    return row.view(Bsz, D, H, W) + col.view(Bsz, D, W, H).transpose(2, 3)   # (B, D, H, W)


class SS2D(nn.Module):
    """2-D selective scan: project, depthwise conv, scan the grid in 4 directions, merge, norm, project back.

    Parameters are stored as in the official checkpoints: the 4 directions' projections stacked in one tensor
    (x_proj_weight (K, R+2N, D), dt_projs_weight (K, D, R)), A_logs/Ds/dt bias flattened k-major (KD).
    """

    def __init__(self, d_model, d_state, ssm_ratio, dt_rank, d_conv, conv_bias, forward_type, scan_backend):
        super().__init__()
        C, N, K = d_model, d_state, 4
        D = int(ssm_ratio * C)
        R = math.ceil(C / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_inner, self.d_state, self.dt_rank, self.K = D, N, R, K
        self.gated = forward_type == "v0"  # v0: in_proj also produces z, and y is multiplied by silu(z)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(C, 2 * D if self.gated else D, bias=False)
        self.conv2d = nn.Conv2d(D, D, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=D, bias=conv_bias)
        self.act = nn.SiLU()
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, D))   # per direction: D -> [dt | B | C]
        self.dt_projs_weight = nn.Parameter(torch.empty(K, D, R))         # per direction: R -> D
        self.dt_projs_bias = nn.Parameter(torch.empty(K, D))              # the scan's delta_bias
        self.A_logs = nn.Parameter(torch.empty(K * D, N))                 # A = -exp(A_logs)
        self.Ds = nn.Parameter(torch.empty(K * D))
        self.out_norm = nn.LayerNorm(D)
        self.out_proj = nn.Linear(D, C, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
        """Mamba's S6 init ("v0"): dt ~ logUniform[dt_min, dt_max] through inverse softplus, A = -(1..N), D = 1."""
        K, D, R, N = self.K, self.d_inner, self.dt_rank, self.d_state
        nn.init.uniform_(self.x_proj_weight, -D ** -0.5, D ** -0.5)       # nn.Linear's default bound 1/sqrt(in)
        nn.init.uniform_(self.dt_projs_weight, -R ** -0.5, R ** -0.5)
        dt = torch.exp(torch.rand(K, D, device=self.Ds.device) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))       # softplus(bias) = dt
        self.A_logs.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32, device=self.Ds.device))
                          .repeat(K * D, 1))
        self.Ds.fill_(1.0)

    def forward(self, x):                                             # x (B, H, W, C)
        Bsz, H, W, _ = x.shape
        K, D, R, N, L = self.K, self.d_inner, self.dt_rank, self.d_state, H * W
        x = self.in_proj(x)                                           # (B, H, W, D) or (B, H, W, 2D)
        if self.gated:
            x, z = x.chunk(2, dim=-1)                                 # (B, H, W, D) each
            z = self.act(z)                                           # (B, H, W, D)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2)))              # (B, D, H, W) depthwise 3x3 conv
        xs = cross_scan(x)                                            # (B, K, D, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)  # (B, K, R+2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)            # (B, K, R, L), (B, K, N, L), (B, K, N, L)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (B, K, D, L)
        xs, dts = xs.reshape(Bsz, K * D, L), dts.reshape(Bsz, K * D, L)  # (B, KD, L) each, k-major channels
        if self.gated:  # v0 forces the scan into fp32 (v05 lets u/delta/B/C stay in the autocast dtype)
            xs, dts, Bs, Cs = xs.float(), dts.float(), Bs.float(), Cs.float()
        As = -torch.exp(self.A_logs.float())                          # (KD, N) negative: a decaying state
        ys = selective_scan(xs, dts, As, Bs.contiguous(), Cs.contiguous(), self.Ds.float(),
                            self.dt_projs_bias.float().reshape(K * D), delta_softplus=True,
                            backend=self.scan_backend)                # (B, KD, L) fp32
        y = cross_merge(ys.view(Bsz, K, D, L), H, W)                  # (B, D, H, W)
        y = self.out_norm(y.permute(0, 2, 3, 1))                      # (B, H, W, D) LayerNorm in fp32
        if self.gated:
            y = y * z                                                 # (B, H, W, D)
        return self.out_proj(y.to(x.dtype))                           # (B, H, W, C)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):                                             # x (B, H, W, C)
        return self.fc2(self.act(self.fc1(x)))                        # (B, H, W, 4C) -> (B, H, W, C)


class VSSBlock(nn.Module):
    """Pre-norm residual block: x + SS2D(norm(x)), then x + MLP(norm2(x)) when mlp_ratio > 0."""

    def __init__(self, cfg, dim, drop_path):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, cfg.d_state, cfg.ssm_ratio, cfg.dt_rank, cfg.d_conv, cfg.conv_bias,
                       cfg.forward_type, cfg.scan_backend)
        self.drop_path = DropPath(drop_path)
        self.has_mlp = cfg.mlp_ratio > 0
        if self.has_mlp:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x):                                             # x (B, H, W, C)
        x = x + self.drop_path(self.op(self.norm(x)))                 # (B, H, W, C)
        if self.has_mlp:
            x = x + self.drop_path(self.mlp(self.norm2(x)))           # (B, H, W, C)
        return x


class Classifier(nn.Module):
    """classifier.norm -> global average pool -> classifier.head (the official Sequential's named slots)."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):                                             # x (B, H, W, C)
        return self.head(self.norm(x).mean(dim=(1, 2)))               # (B, num_classes)


class VMamba(nn.Module):
    """VSSM: patch embed -> stages of VSSBlocks (downsample between stages) -> classifier.

    Runs channel-last (B, H, W, C) throughout. The official v2 models run channel-first ("ln2d", 1x1 convs
    for the Linears) for speed on A100, but the parameters and the math are identical (vmamba.md §1.2).
    """

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        dims = cfg.dims
        self.patch_embed = _patch_embed(cfg.patchembed_version, cfg.in_chans, dims[0], cfg.patch_size)
        n_blocks = sum(cfg.depths)  # stochastic depth grows linearly from 0 to drop_path_rate over the blocks
        dpr = [cfg.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            blocks = nn.Sequential(*[VSSBlock(cfg, dims[i], dpr[sum(cfg.depths[:i]) + j]) for j in range(depth)])
            last = i == len(cfg.depths) - 1
            down = nn.Identity() if last else _downsample(cfg.downsample_version, dims[i], dims[i + 1])
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=down)))
        self.classifier = Classifier(dims[-1], cfg.num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # official VSSM._init_weights: only nn.Linear and nn.LayerNorm (SS2D's own tensors keep the S6 init)
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.config.in_chans:
            shape = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"VMamba: x has shape {shape}, expected (B, {self.config.in_chans}, H, W)")

    def forward_features(self, x, stage=3):
        """Tokens after the last block of `stage` (1-based), before its downsample.

        x: (B, 3, H, W) -> (B, H_s * W_s, C_s), row-major, H_s = H / (4 * 2^(stage-1)) (rounded up).
        """
        self._check_input(x)
        n = len(self.config.depths)
        if not (isinstance(stage, int) and 1 <= stage <= n):
            raise ValueError(f"VMamba.forward_features: stage={stage!r}, expected an int in 1..{n}")
        x = self.patch_embed(x)                                       # (B, H/4, W/4, C0)
        for i in range(stage):
            x = self.layers[i].blocks(x)                              # (B, H_s, W_s, C_s)
            if i < stage - 1:
                x = self.layers[i].downsample(x)                      # (B, H_s/2, W_s/2, C_{s+1})
        return x.flatten(1, 2)                                        # (B, H_s*W_s, C_s)

    def forward(self, x):
        """x: (B, 3, H, W) -> logits (B, num_classes)."""
        self._check_input(x)
        x = self.patch_embed(x)                                       # (B, H/4, W/4, C0)
        for layer in self.layers:
            x = layer(x)                                              # (B, H_s, W_s, C_s), then downsampled
        return self.classifier(x)                                     # (B, num_classes)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Strict by default, with a readable listing of missing / unexpected / mis-shaped keys."""
        if strict:
            _check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# ============================================================================= checkpoints

def _check_state_dict(model, sd, show=5):
    """Raise one ValueError listing the first few missing / unexpected / mis-shaped keys (with counts)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shaped = [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in want if k in have and have[k] != want[k]]
    if missing or unexpected or shaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
            if items:
                more = f", ... (+{len(items) - show} more)" if len(items) > show else ""
                parts.append(f"{len(items)} {title}: " + ", ".join(items[:show]) + more)
        raise ValueError("state dict does not match the model: " + "; ".join(parts))


# Jan-2024 code that wrote the v0 release files used older names (vmamba.md §2.4); the official model renames
# them on load, so do we. Prefix -> new prefix ([UNCERTAIN] which files still use them).
_LEGACY_PREFIXES = [("patch_embed.proj.", "patch_embed.0."), ("patch_embed.norm.", "patch_embed.2."),
                    ("norm.", "classifier.norm."), ("head.", "classifier.head.")]
_LEGACY_INFIXES = [(".ln_1.", ".norm."), (".self_attention.", ".op.")]


def load_checkpoint(path):
    """Read a state dict from an official .pth ({"model": sd}, weights_only) or a .safetensors file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: no such file {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]
    if not isinstance(sd, dict):
        raise ValueError(f"load_checkpoint: {path!r} holds a {type(sd).__name__}, expected a state dict")
    out = {}
    for k, v in sd.items():
        for old, new in _LEGACY_PREFIXES:
            if k.startswith(old):
                k = new + k[len(old):]
        for old, new in _LEGACY_INFIXES:
            k = k.replace(old, new)
        # Linear2d weights may be saved 4-D (out, in, 1, 1); our nn.Linear wants (out, in)
        if v.dim() == 4 and v.shape[2:] == (1, 1) and k.rsplit(".", 2)[-2] in ("in_proj", "out_proj", "fc1",
                                                                              "fc2", "reduction"):
            v = v[:, :, 0, 0]
        out[k] = v
    return out


def build(name, **overrides):
    """VMamba from a preset name, with dataclass fields replaced, e.g. build("toy", num_classes=10)."""
    import dataclasses
    return VMamba(dataclasses.replace(get_config(name), **overrides))
