/*
selective_scan.cu -- the selective scan (Mamba S6 / VMamba SS2D core), forward and backward, one file.

References: Gu & Dao, "Mamba" (2023) Alg. 2; mamba_ssm csrc/selective_scan (the kernel design this follows:
one block per (batch, channel) row, chunks of kNThreads*kNItems steps, a block-wide scan over (a, b) pairs,
recompute-in-backward); VMamba kernels/selective_scan (grouped B/C, fp16/bf16 in -> fp32 out, d_state 1).
Facts used are collected in shared/reference/vmamba.md sections 4, 5 and 7. The code is written from scratch.

Shape letters (as in vmamba.py):
    Bt  batch                      KD  channels (K directions x D inner channels, all scanned independently)
    L   sequence length            N   state size per channel (d_state; 1 in every VMamba v2 release)
    G   groups of B/C; channel d uses group g(d) = d / (KD / G)   (VMamba: G = K = 4 directions)

The math, per batch b, channel d, state n (all arithmetic in fp32, whatever the input dtype):
    dt_t   = softplus(delta_t + delta_bias_d)  if delta_softplus  else  delta_t + delta_bias_d
    a_t    = exp(dt_t * A_dn)                  (zero-order hold of A; A < 0 so 0 < a_t <= 1)
    b_t    = dt_t * B_gnt * u_t                (Euler step for B)
    h_t    = a_t * h_{t-1} + b_t,   h_{-1} = 0
    y_t    = sum_n C_gnt * h_t  +  D_d * u_t
Backward (adjoint state g_t = dLoss/dh_t, running backwards in time, dy = dLoss/dy):
    g_t    = dy_t * C_gnt + a_{t+1} * g_{t+1},   g_L = 0
    du_t  += g_t * dt_t * B_gnt  (+ D_d * dy_t once)     dB_gnt += g_t * dt_t * u_t   (summed over d in group g)
    ddt_t += g_t * (A_dn * a_t * h_{t-1} + B_gnt * u_t)  dC_gnt += dy_t * h_t         (summed over d in group g)
    dA_dn += g_t * dt_t * a_t * h_{t-1}                   (summed over b, t)
    ddelta_t = ddt_t * sigmoid(delta_t + delta_bias_d) if softplus else ddt_t;  ddelta_bias_d = sum_{b,t} ddelta
    dD_d   = sum_{b,t} dy_t * u_t

Why a scan works: each step is an affine map h -> a*h + b, and affine maps compose associatively,
    (a1, b1) after (a0, b0) = (a1*a0, a1*b0 + b1),
so the L sequential steps can be combined as a parallel prefix scan (log depth) over the pairs. The backward
adjoint is the same kind of recurrence run from the right, so it uses the same scan in reverse.

Build (no GPU needed, only nvcc + a CUDA build of torch; this exact command was run on a GPU-less box, from the
repository root, with torch 2.15.0+cu132 and nvcc 13.0: no warnings, ~4-5 min on 2 shared cores, then cached):
    CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST="8.0;9.0" /opt/cuda-venv/bin/python -c \
        "import vmamba; print(vmamba.load_kernel(verbose=True).VERSIONS)"
vmamba.load_kernel() is torch.utils.cpp_extension.load(name="selective_scan_cuda", sources=["selective_scan.cu"],
extra_cuda_cflags=["-O3", "--use_fast_math", "--expt-relaxed-constexpr"]); add "-Xptxas=-v" to see registers and
spills (at -O3: fwd v2 <= 128 regs, bwd v2 <= 238 regs, no spills except 12 bytes in the 32x4 fp16/bf16 bwd on sm_90).
The validation harness is tests/test_selective_scan_cuda.py (every version, forward and all gradients, vs
vmamba.selective_scan(backend="ref") in float64) and the timing harness is `python bench.py cuda`.

Versions (the `version` argument of fwd/bwd; keyword, default = the production version below):
    v1: one thread per (b, d, n) walks the sequence one step at a time; y, du, ddelta, dB, dC summed with atomics.
    v2: one block per (b, d); each thread owns kNItems consecutive steps of a chunk, the block combines them with a parallel (a, b)-pair scan (warp shuffles, then across warps), chunks carry the running state.

Production default: v2 (chosen by design, NOT yet by measurement: no GPU was available when this file was
written, so neither version has run; v1 exists to be obviously correct and to cross-check v2 -- each of its
threads walks all L steps serially, so it is far slower).

Layout: every tensor is contiguous, time (L) is the fastest axis, so a (b, d) row is one contiguous run of L values.
`saved` (Bt, KD, n_chunks, N) fp32 holds h at the START of each chunk (chunk 0 starts at 0); the backward
re-runs the forward scan of one chunk at a time from it instead of storing every h_t (L times less memory).
The chunk length is a function of L only (chunk_len below) and is shared by both versions, so a `saved` made
by either version feeds either backward.
*/

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>   // (not ATen/cuda/CUDAContext.h: that pulls in cuBLAS/cuSPARSE headers)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

// ----------------------------------------------------------------------------- small helpers

constexpr int kMaxDState = 256;        // N limit: bounds the per-block shared state slots
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(at::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(at::BFloat16 x) { return static_cast<float>(x); }

template <typename T> __device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }

// dt = softplus(raw) with the same threshold (20) as F.softplus and the upstream kernels
__device__ __forceinline__ float softplus_f(float x) { return x <= 20.f ? log1pf(expf(x)) : x; }
// d softplus / dx = sigmoid(x); 1 above the threshold, exactly like F.softplus's backward
__device__ __forceinline__ float softplus_grad(float x) { return x <= 20.f ? 1.f / (1.f + expf(-x)) : 1.f; }

// Everything a kernel needs, passed by value. Pointers to optional tensors are nullptr when absent.
struct ScanParams {
    int64_t Bt, KD, L, N, G, n_chunks, chunk;
    bool softplus;
    const void* u;            // (Bt, KD, L) input_t
    const void* delta;        // (Bt, KD, L) input_t
    const float* A;           // (KD, N)
    const void* Bm;           // (Bt, G, N, L) input_t
    const void* Cm;           // (Bt, G, N, L) input_t
    const float* D;           // (KD,) or nullptr
    const float* delta_bias;  // (KD,) or nullptr
    float* y;                 // (Bt, KD, L) fp32                       [fwd out]
    float* saved;             // (Bt, KD, n_chunks, N) fp32            [fwd out, bwd in]
    const float* dy;          // (Bt, KD, L) fp32                       [bwd in]
    void* du;                 // (Bt, KD, L) input_t (v2) or fp32 scratch (v1)
    void* ddelta;             // (Bt, KD, L) input_t (v2) or fp32 scratch (v1)
    float* dA;                // (KD, N) fp32, zero-initialised, accumulated with atomics
    float* dB;                // (Bt, G, N, L) fp32, zero-initialised, accumulated with atomics
    float* dC;                // (Bt, G, N, L) fp32, zero-initialised, accumulated with atomics
    float* dD;                // (KD,) fp32 zero-initialised, or nullptr
    float* ddelta_bias;       // (KD,) fp32 zero-initialised, or nullptr
};

// The chunk length (steps per block pass) as a function of L. Both versions use it, so `saved` is interchangeable.
// Same table as mamba_ssm: short sequences get small blocks so few threads idle on padding.
//   L <= 128: 32 threads x 4 items | <= 256: 32 x 8 | <= 512: 32 x 16 | <= 1024: 64 x 16 | else 128 x 16 (2048)
inline int64_t chunk_len(int64_t L) {
    if (L <= 128) return 128;
    if (L <= 256) return 256;
    if (L <= 512) return 512;
    if (L <= 1024) return 1024;
    return 2048;
}

// ----------------------------------------------------------------------------- v1: one thread per (b, d, n)
// The obviously-correct version: a thread owns one scalar state h_{b,d,n} and walks t = 0..L-1 exactly like the
// math above. Channels' outputs sum over n, so y (and in the backward du, ddelta, and dB/dC over the group)
// are accumulated with atomicAdd into zero-initialised fp32 buffers.

template <typename input_t>
__global__ void selective_scan_fwd_v1(ScanParams p) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= p.Bt * p.KD * p.N) return;
    const int64_t n = idx % p.N, d = (idx / p.N) % p.KD, b = idx / (p.N * p.KD);
    const int64_t g = d / (p.KD / p.G);
    const int64_t row = b * p.KD + d;                                   // the (b, d) row of u, delta, y
    const input_t* u = static_cast<const input_t*>(p.u) + row * p.L;
    const input_t* delta = static_cast<const input_t*>(p.delta) + row * p.L;
    const input_t* Bn = static_cast<const input_t*>(p.Bm) + ((b * p.G + g) * p.N + n) * p.L;
    const input_t* Cn = static_cast<const input_t*>(p.Cm) + ((b * p.G + g) * p.N + n) * p.L;
    const float A = p.A[d * p.N + n];
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    const float Dd = (p.D && n == 0) ? p.D[d] : 0.f;                    // D*u is added once, by the n == 0 thread
    float* y = p.y + row * p.L;
    float h = 0.f;                                                      // h_{-1} = 0
    for (int64_t t = 0; t < p.L; ++t) {
        if (t % p.chunk == 0) p.saved[(row * p.n_chunks + t / p.chunk) * p.N + n] = h;   // chunk-start state
        float dt = to_float(delta[t]) + bias;
        if (p.softplus) dt = softplus_f(dt);
        const float ut = to_float(u[t]);
        h = expf(dt * A) * h + dt * to_float(Bn[t]) * ut;               // h_t = a_t h_{t-1} + b_t
        atomicAdd(&y[t], to_float(Cn[t]) * h + Dd * ut);                // y_t += C_t h_t (+ D u_t)
    }
}

// Backward v1. The reverse walk needs h_{t-1} at every t, going right to left. Dividing h_t by a_t to step back
// is unstable (a_t can underflow), so we recompute: per chunk (start state from `saved`), one forward pass keeps
// a checkpoint every kSeg steps, then each segment is replayed into a kSeg-long local array and walked backwards.
template <typename input_t>
__global__ void selective_scan_bwd_v1(ScanParams p) {
    constexpr int kSeg = 32;
    constexpr int kMaxSegs = 2048 / kSeg;                               // chunk_len() <= 2048
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= p.Bt * p.KD * p.N) return;
    const int64_t n = idx % p.N, d = (idx / p.N) % p.KD, b = idx / (p.N * p.KD);
    const int64_t g = d / (p.KD / p.G);
    const int64_t row = b * p.KD + d;
    const int64_t bcrow = ((b * p.G + g) * p.N + n) * p.L;             // offset of the (b, g, n) row of B, C
    const input_t* u = static_cast<const input_t*>(p.u) + row * p.L;
    const input_t* delta = static_cast<const input_t*>(p.delta) + row * p.L;
    const input_t* Bn = static_cast<const input_t*>(p.Bm) + bcrow;
    const input_t* Cn = static_cast<const input_t*>(p.Cm) + bcrow;
    const float* dy = p.dy + row * p.L;
    float* du = static_cast<float*>(p.du) + row * p.L;                  // fp32 scratch, zeroed by the host
    float* ddelta = static_cast<float*>(p.ddelta) + row * p.L;          // fp32 scratch, zeroed by the host
    const float A = p.A[d * p.N + n];
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    const float Dd = (p.D && n == 0) ? p.D[d] : 0.f;
    auto dt_at = [&](int64_t t) {
        const float raw = to_float(delta[t]) + bias;
        return p.softplus ? softplus_f(raw) : raw;
    };

    float ck[kMaxSegs];                                                 // h at each segment start (local memory)
    float hprev[kSeg];                                                  // h_{t-1} for the segment being walked
    float s = 0.f;                                                      // a_{t+1} g_{t+1}: 0 past the end
    float dA_acc = 0.f, dD_acc = 0.f, ddb_acc = 0.f;
    for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * p.chunk, t_end = min(p.L, t0 + p.chunk);
        const int n_seg = (int)((t_end - t0 + kSeg - 1) / kSeg);
        float h = p.saved[(row * p.n_chunks + c) * p.N + n];
        for (int j = 0; j < n_seg; ++j) {                               // forward pass, keep segment starts
            ck[j] = h;
            for (int64_t t = t0 + (int64_t)j * kSeg; t < min(t_end, t0 + (int64_t)(j + 1) * kSeg); ++t) {
                const float dt = dt_at(t);
                h = expf(dt * A) * h + dt * to_float(Bn[t]) * to_float(u[t]);
            }
        }
        for (int j = n_seg - 1; j >= 0; --j) {
            const int64_t ts = t0 + (int64_t)j * kSeg, te = min(t_end, ts + kSeg);
            h = ck[j];
            for (int64_t t = ts; t < te; ++t) {                         // replay: hprev[i] = h_{t-1}
                hprev[t - ts] = h;
                const float dt = dt_at(t);
                h = expf(dt * A) * h + dt * to_float(Bn[t]) * to_float(u[t]);
            }
            for (int64_t t = te - 1; t >= ts; --t) {                    // walk right to left
                const float raw = to_float(delta[t]) + bias;
                const float dt = p.softplus ? softplus_f(raw) : raw;
                const float a = expf(dt * A), ut = to_float(u[t]), Bt = to_float(Bn[t]), dyt = dy[t];
                const float hp = hprev[t - ts], ht = a * hp + dt * Bt * ut;
                const float gt = dyt * to_float(Cn[t]) + s;             // g_t = dy_t C_t + a_{t+1} g_{t+1}
                atomicAdd(&p.dB[bcrow + t], gt * dt * ut);
                atomicAdd(&p.dC[bcrow + t], dyt * ht);
                atomicAdd(&du[t], gt * dt * Bt + Dd * dyt);
                float ddt = gt * (A * a * hp + Bt * ut);
                if (p.softplus) ddt *= softplus_grad(raw);
                atomicAdd(&ddelta[t], ddt);
                dA_acc += gt * dt * a * hp;
                ddb_acc += ddt;
                dD_acc += dyt * ut;                                     // only used by the n == 0 thread
                s = a * gt;
            }
        }
    }
    atomicAdd(&p.dA[d * p.N + n], dA_acc);
    if (p.ddelta_bias) atomicAdd(&p.ddelta_bias[d], ddb_acc);
    if (p.dD && n == 0) atomicAdd(&p.dD[d], dD_acc);
}

// ----------------------------------------------------------------------------- v2: block-parallel pair scan
// One block per (b, d) row. A chunk of kChunk = kNThreads * kNItems steps is split "blocked": thread i owns steps
// i*kNItems .. i*kNItems + kNItems-1 of the chunk. Per state n, each thread first composes its own kNItems pairs
// sequentially (cheap, in registers), then block_scan_state() combines the per-thread pairs across the block in
// log2 depth, which tells every thread the state entering its first step; it then replays its items to get each
// h_t. The state after the chunk's last step is carried to the next chunk in shared memory (one slot per n).

// Shared-memory staging index: one pad float every 32 so that the blocked read pattern (thread i reads element
// i*kNItems + k) hits 32 different banks for kNItems in {4, 8, 16}; the striped global loads stay coalesced.
__device__ __forceinline__ int stage_idx(int j) { return j + (j >> 5); }

// Load one chunk of a row (global, striped => coalesced) into registers (blocked). Steps past `valid` read as 0.
template <int kNThreads, int kNItems, typename T>
__device__ __forceinline__ void load_chunk(const T* src, int valid, float* stage, float (&dst)[kNItems]) {
    __syncthreads();                                                    // earlier readers of `stage` are done
    #pragma unroll
    for (int j = threadIdx.x; j < kNThreads * kNItems; j += kNThreads)
        stage[stage_idx(j)] = j < valid ? to_float(src[j]) : 0.f;
    __syncthreads();
    #pragma unroll
    for (int k = 0; k < kNItems; ++k) dst[k] = stage[stage_idx(threadIdx.x * kNItems + k)];
}

// The reverse of load_chunk: registers (blocked) -> shared -> global (striped). kAtomic adds into fp32 instead
// of storing (dB, dC: every channel of a group adds into the same B/C gradient row).
template <int kNThreads, int kNItems, bool kAtomic, typename T>
__device__ __forceinline__ void store_chunk(T* dst, int valid, float* stage, const float (&src)[kNItems]) {
    __syncthreads();
    #pragma unroll
    for (int k = 0; k < kNItems; ++k) stage[stage_idx(threadIdx.x * kNItems + k)] = src[k];
    __syncthreads();
    #pragma unroll
    for (int j = threadIdx.x; j < kNThreads * kNItems; j += kNThreads) {
        if (j < valid) {
            if constexpr (kAtomic) atomicAdd(&dst[j], stage[stage_idx(j)]);
            else dst[j] = from_float<T>(stage[stage_idx(j)]);
        }
    }
}

// THE PARALLEL SCAN. Each thread brings the pair p = (a, b) that maps the state entering its items to the state
// leaving them (its kNItems steps composed). Returns the state ENTERING this thread's items, i.e. the composition
// of all threads before it (in scan order) applied to x_in, the state entering the chunk.
// Composition, "first (a0, b0), then (a1, b1)":  h -> a1*(a0*h + b0) + b1  =  (a1*a0, a1*b0 + b1).
// kReverse: scan order runs from the last thread to the first (the backward's right-to-left adjoint recurrence).
//   1. Within a warp, Hillis-Steele inclusive scan with shuffles: after the step with offset `off`, lane i holds
//      the composition of lanes i-2*off+1 .. i (clamped at 0); 5 steps cover 32 lanes.
//   2. The exclusive prefix of lane i is the inclusive prefix of lane i-1 (one more shuffle; lane 0 = identity).
//   3. The last lane of each warp writes the warp's total pair to shared memory; each thread applies the totals
//      of the warps before its own to x_in (at most 4 warps, so a short serial loop beats another scan level),
//      then its lane's exclusive prefix.
template <int kNThreads, bool kReverse>
__device__ __forceinline__ float block_scan_state(float2 p, float x_in, float2* warp_tot) {
    constexpr int kNWarps = kNThreads / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const float a_o = kReverse ? __shfl_down_sync(kFullMask, p.x, off) : __shfl_up_sync(kFullMask, p.x, off);
        const float b_o = kReverse ? __shfl_down_sync(kFullMask, p.y, off) : __shfl_up_sync(kFullMask, p.y, off);
        const bool has = kReverse ? (lane + off < 32) : (lane >= off);
        if (has) {                                                      // (a_o, b_o) is earlier in scan order
            p.y = p.x * b_o + p.y;
            p.x = p.x * a_o;
        }
    }
    float ea = kReverse ? __shfl_down_sync(kFullMask, p.x, 1) : __shfl_up_sync(kFullMask, p.x, 1);
    float eb = kReverse ? __shfl_down_sync(kFullMask, p.y, 1) : __shfl_up_sync(kFullMask, p.y, 1);
    if (lane == (kReverse ? 31 : 0)) { ea = 1.f; eb = 0.f; }            // first lane in scan order: identity
    __syncthreads();                                                    // earlier readers of warp_tot are done
    if (lane == (kReverse ? 0 : 31)) warp_tot[warp] = p;                // last lane in scan order: warp total
    __syncthreads();
    float x = x_in;
    if constexpr (!kReverse) {
        for (int w = 0; w < warp; ++w) x = warp_tot[w].x * x + warp_tot[w].y;
    } else {
        for (int w = kNWarps - 1; w > warp; --w) x = warp_tot[w].x * x + warp_tot[w].y;
    }
    return ea * x + eb;
}

// Sum of one float over the block (warp shuffles, then the warp sums). The result is valid in thread 0.
template <int kNThreads>
__device__ __forceinline__ float block_sum(float v, float* red) {
    constexpr int kNWarps = kNThreads / 32;
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0.f;
    if (threadIdx.x == 0) for (int w = 0; w < kNWarps; ++w) total += red[w];
    return total;
}

// N is a runtime loop around the whole per-state body (load B_n, C_n -> pairs -> scan -> accumulate), with no
// per-state register arrays, so N = 1 (every VMamba v2 model) runs exactly the single-state kernel: no template
// on N is needed for it to be at full speed, and any N up to kMaxDState works from the same code.
template <int kNThreads, int kNItems, typename input_t>
__global__ void __launch_bounds__(kNThreads) selective_scan_fwd_v2(ScanParams p) {
    constexpr int kChunk = kNThreads * kNItems;
    __shared__ float stage[kChunk + kChunk / 32];
    __shared__ float2 warp_tot[kNThreads / 32];
    extern __shared__ float h_run[];                                    // (N,) state carried across chunks
    const int64_t b = blockIdx.x, d = blockIdx.y;
    const int64_t g = d / (p.KD / p.G);
    const int64_t row = b * p.KD + d;
    const input_t* u_row = static_cast<const input_t*>(p.u) + row * p.L;          // (L,)
    const input_t* delta_row = static_cast<const input_t*>(p.delta) + row * p.L;  // (L,)
    const input_t* B_bg = static_cast<const input_t*>(p.Bm) + (b * p.G + g) * p.N * p.L;  // (N, L)
    const input_t* C_bg = static_cast<const input_t*>(p.Cm) + (b * p.G + g) * p.N * p.L;  // (N, L)
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    const float Dd = p.D ? p.D[d] : 0.f;
    for (int n = threadIdx.x; n < p.N; n += kNThreads) h_run[n] = 0.f;  // h_{-1} = 0 (load_chunk syncs first)

    for (int64_t c = 0; c < p.n_chunks; ++c) {
        const int64_t t0 = c * kChunk;
        const int valid = (int)min((int64_t)kChunk, p.L - t0);
        float u[kNItems], dt[kNItems], out[kNItems], Bv[kNItems], Cv[kNItems];
        load_chunk<kNThreads, kNItems>(u_row + t0, valid, stage, u);
        load_chunk<kNThreads, kNItems>(delta_row + t0, valid, stage, dt);
        #pragma unroll
        for (int k = 0; k < kNItems; ++k) {
            dt[k] += bias;
            if (p.softplus) dt[k] = softplus_f(dt[k]);
            if (threadIdx.x * kNItems + k >= valid) dt[k] = 0.f;        // padding: a = 1, b = 0, the identity pair
            out[k] = Dd * u[k];
        }
        for (int n = 0; n < p.N; ++n) {
            load_chunk<kNThreads, kNItems>(B_bg + n * p.L + t0, valid, stage, Bv);
            load_chunk<kNThreads, kNItems>(C_bg + n * p.L + t0, valid, stage, Cv);
            const float A = p.A[d * p.N + n];
            const float h0 = h_run[n];                                  // read before the scan's barrier
            if (threadIdx.x == 0) p.saved[(row * p.n_chunks + c) * p.N + n] = h0;
            float a[kNItems];
            float2 pair = make_float2(1.f, 0.f);                        // identity
            #pragma unroll
            for (int k = 0; k < kNItems; ++k) {                         // compose this thread's steps in order
                a[k] = expf(dt[k] * A);
                pair.y = a[k] * pair.y + dt[k] * Bv[k] * u[k];
                pair.x = a[k] * pair.x;
            }
            float h = block_scan_state<kNThreads, false>(pair, h0, warp_tot);   // h entering my first step
            #pragma unroll
            for (int k = 0; k < kNItems; ++k) {
                h = a[k] * h + dt[k] * Bv[k] * u[k];                    // h_t
                out[k] += Cv[k] * h;                                    // y_t += C_t h_t
            }
            // the last thread's final h is the state after the chunk (padding steps are identities)
            if (threadIdx.x == kNThreads - 1) h_run[n] = h;
        }
        store_chunk<kNThreads, kNItems, false>(p.y + row * p.L + t0, valid, stage, out);
    }
}

// Backward v2, chunks right to left. Per chunk and state n:
//   1. recompute the chunk's forward states from saved[c, n] with the forward scan (we keep h_{t-1} per item);
//   2. run the adjoint right to left with the same scan reversed. With s_t = a_t * g_t (what step t passes to
//      step t-1), g_t = dy_t C_t + s_{t+1} and s_t = a_t * s_{t+1} + a_t * dy_t * C_t: again an affine map,
//      the pair (a_t, a_t dy_t C_t), composed from the right. s entering a chunk from the right is carried in
//      shared memory (s_carry[n]); past the end of the sequence it is 0.
//   3. accumulate the gradients per item; dB, dC are added atomically (all KD/G channels of a group share them),
//      dA is block-summed per chunk and added atomically (all batches share it).
template <int kNThreads, int kNItems, typename input_t>
__global__ void __launch_bounds__(kNThreads) selective_scan_bwd_v2(ScanParams p) {
    constexpr int kChunk = kNThreads * kNItems;
    __shared__ float stage[kChunk + kChunk / 32];
    __shared__ float2 warp_tot[kNThreads / 32];
    __shared__ float red[kNThreads / 32];
    extern __shared__ float s_carry[];                                  // (N,) adjoint carried across chunks
    const int64_t b = blockIdx.x, d = blockIdx.y;
    const int64_t g = d / (p.KD / p.G);
    const int64_t row = b * p.KD + d;
    const input_t* u_row = static_cast<const input_t*>(p.u) + row * p.L;
    const input_t* delta_row = static_cast<const input_t*>(p.delta) + row * p.L;
    const float* dy_row = p.dy + row * p.L;
    const int64_t bc_off = (b * p.G + g) * p.N * p.L;                   // (b, g) block of B, C, dB, dC: (N, L)
    const input_t* B_bg = static_cast<const input_t*>(p.Bm) + bc_off;
    const input_t* C_bg = static_cast<const input_t*>(p.Cm) + bc_off;
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    const float Dd = p.D ? p.D[d] : 0.f;
    for (int n = threadIdx.x; n < p.N; n += kNThreads) s_carry[n] = 0.f;
    float dD_acc = 0.f, ddb_acc = 0.f;

    for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * kChunk;
        const int valid = (int)min((int64_t)kChunk, p.L - t0);
        float u[kNItems], raw[kNItems], dt[kNItems], dy[kNItems];
        float du[kNItems], ddt[kNItems];
        load_chunk<kNThreads, kNItems>(u_row + t0, valid, stage, u);
        load_chunk<kNThreads, kNItems>(delta_row + t0, valid, stage, raw);
        load_chunk<kNThreads, kNItems>(dy_row + t0, valid, stage, dy);
        #pragma unroll
        for (int k = 0; k < kNItems; ++k) {
            raw[k] += bias;
            dt[k] = p.softplus ? softplus_f(raw[k]) : raw[k];
            if (threadIdx.x * kNItems + k >= valid) dt[k] = 0.f;        // padding = identity pair; u, dy are 0
            du[k] = Dd * dy[k];
            ddt[k] = 0.f;
            dD_acc += dy[k] * u[k];
        }
        for (int n = 0; n < p.N; ++n) {
            float Bv[kNItems], Cv[kNItems], a[kNItems], hprev[kNItems];
            load_chunk<kNThreads, kNItems>(B_bg + n * p.L + t0, valid, stage, Bv);
            load_chunk<kNThreads, kNItems>(C_bg + n * p.L + t0, valid, stage, Cv);
            const float A = p.A[d * p.N + n];
            const float h0 = p.saved[(row * p.n_chunks + c) * p.N + n];
            const float s_in = s_carry[n];                              // read before the scans' barriers
            // 1. forward recompute of this chunk's states
            float2 pair = make_float2(1.f, 0.f);
            #pragma unroll
            for (int k = 0; k < kNItems; ++k) {
                a[k] = expf(dt[k] * A);
                pair.y = a[k] * pair.y + dt[k] * Bv[k] * u[k];
                pair.x = a[k] * pair.x;
            }
            float h = block_scan_state<kNThreads, false>(pair, h0, warp_tot);
            #pragma unroll
            for (int k = 0; k < kNItems; ++k) {
                hprev[k] = h;                                           // h_{t-1}
                h = a[k] * h + dt[k] * Bv[k] * u[k];
            }
            // 2. adjoint: compose this thread's maps s_{t+1} -> s_t from its last item to its first
            float2 rpair = make_float2(1.f, 0.f);
            #pragma unroll
            for (int k = kNItems - 1; k >= 0; --k) {
                rpair.y = a[k] * rpair.y + a[k] * dy[k] * Cv[k];
                rpair.x = a[k] * rpair.x;
            }
            float s = block_scan_state<kNThreads, true>(rpair, s_in, warp_tot);  // s_{t+1} after my last step
            // 3. gradients, right to left through my items
            float dA_part = 0.f, dBv[kNItems], dCv[kNItems];
            #pragma unroll
            for (int k = kNItems - 1; k >= 0; --k) {
                const float gt = dy[k] * Cv[k] + s;                     // g_t = dL/dh_t
                const float ht = a[k] * hprev[k] + dt[k] * Bv[k] * u[k];
                dBv[k] = gt * dt[k] * u[k];
                dCv[k] = dy[k] * ht;
                du[k] += gt * dt[k] * Bv[k];
                ddt[k] += gt * (A * a[k] * hprev[k] + Bv[k] * u[k]);
                dA_part += gt * dt[k] * a[k] * hprev[k];
                s = a[k] * gt;                                          // s_t, passed to step t-1
            }
            if (threadIdx.x == 0) s_carry[n] = s;                       // s at the chunk's first step
            store_chunk<kNThreads, kNItems, true>(p.dB + bc_off + n * p.L + t0, valid, stage, dBv);
            store_chunk<kNThreads, kNItems, true>(p.dC + bc_off + n * p.L + t0, valid, stage, dCv);
            const float dA_chunk = block_sum<kNThreads>(dA_part, red);
            if (threadIdx.x == 0) atomicAdd(&p.dA[d * p.N + n], dA_chunk);
        }
        #pragma unroll
        for (int k = 0; k < kNItems; ++k) {
            if (p.softplus) ddt[k] *= softplus_grad(raw[k]);           // chain through softplus
            if (threadIdx.x * kNItems + k < valid) ddb_acc += ddt[k];
        }
        store_chunk<kNThreads, kNItems, false>(static_cast<input_t*>(p.du) + row * p.L + t0, valid, stage, du);
        store_chunk<kNThreads, kNItems, false>(static_cast<input_t*>(p.ddelta) + row * p.L + t0, valid, stage, ddt);
    }
    const float dD_tot = block_sum<kNThreads>(dD_acc, red);
    const float ddb_tot = block_sum<kNThreads>(ddb_acc, red);
    if (threadIdx.x == 0) {
        if (p.dD) atomicAdd(&p.dD[d], dD_tot);
        if (p.ddelta_bias) atomicAdd(&p.ddelta_bias[d], ddb_tot);
    }
}

// ----------------------------------------------------------------------------- launchers

template <typename input_t>
void launch_fwd_v1(const ScanParams& p, cudaStream_t stream) {
    constexpr int kThreads = 256;
    const int64_t total = p.Bt * p.KD * p.N;
    selective_scan_fwd_v1<input_t><<<(unsigned)((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename input_t>
void launch_bwd_v1(const ScanParams& p, cudaStream_t stream) {
    constexpr int kThreads = 128;
    const int64_t total = p.Bt * p.KD * p.N;
    selective_scan_bwd_v1<input_t><<<(unsigned)((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f(integral_constant<kNThreads>, integral_constant<kNItems>) for the block shape that chunk_len(L) chose.
template <typename F>
void with_block_shape(int64_t L, F&& f) {
    switch (chunk_len(L)) {
        case 128: f(std::integral_constant<int, 32>{}, std::integral_constant<int, 4>{}); break;
        case 256: f(std::integral_constant<int, 32>{}, std::integral_constant<int, 8>{}); break;
        case 512: f(std::integral_constant<int, 32>{}, std::integral_constant<int, 16>{}); break;
        case 1024: f(std::integral_constant<int, 64>{}, std::integral_constant<int, 16>{}); break;
        default: f(std::integral_constant<int, 128>{}, std::integral_constant<int, 16>{}); break;
    }
}

template <typename input_t>
void launch_fwd_v2(const ScanParams& p, cudaStream_t stream) {
    with_block_shape(p.L, [&](auto threads, auto items) {
        constexpr int kNThreads = decltype(threads)::value, kNItems = decltype(items)::value;
        const dim3 grid((unsigned)p.Bt, (unsigned)p.KD);
        selective_scan_fwd_v2<kNThreads, kNItems, input_t><<<grid, kNThreads, p.N * sizeof(float), stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
}

template <typename input_t>
void launch_bwd_v2(const ScanParams& p, cudaStream_t stream) {
    with_block_shape(p.L, [&](auto threads, auto items) {
        constexpr int kNThreads = decltype(threads)::value, kNItems = decltype(items)::value;
        const dim3 grid((unsigned)p.Bt, (unsigned)p.KD);
        selective_scan_bwd_v2<kNThreads, kNItems, input_t><<<grid, kNThreads, p.N * sizeof(float), stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
}

// ----------------------------------------------------------------------------- dispatch on version

constexpr int64_t kDefaultVersion = 2;   // the production binding: the winner

template <typename input_t>
void dispatch_fwd(int64_t version, const ScanParams& p, cudaStream_t stream) {
    switch (version) {
        case 1: launch_fwd_v1<input_t>(p, stream); break;
        case 2: launch_fwd_v2<input_t>(p, stream); break;
        default: TORCH_CHECK(false, "selective_scan_cuda: unknown version ", version, " (valid: 1, 2)");
    }
}

template <typename input_t>
void dispatch_bwd(int64_t version, const ScanParams& p, cudaStream_t stream) {
    switch (version) {
        case 1: launch_bwd_v1<input_t>(p, stream); break;
        case 2: launch_bwd_v2<input_t>(p, stream); break;
        default: TORCH_CHECK(false, "selective_scan_cuda: unknown version ", version, " (valid: 1, 2)");
    }
}

// calls f(input_t{}) for u's dtype
template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
    switch (t) {
        case at::kFloat: f(float{}); break;
        case at::kHalf: f(at::Half{}); break;
        case at::kBFloat16: f(at::BFloat16{}); break;
        default: TORCH_CHECK(false, "selective_scan_cuda: u must be float32, float16 or bfloat16, got ", t);
    }
}

// ----------------------------------------------------------------------------- input checks

static void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& u) {
    TORCH_CHECK(t.is_cuda(), "selective_scan_cuda: ", name, " must be a CUDA tensor, got device ", t.device());
    TORCH_CHECK(t.device() == u.device(), "selective_scan_cuda: ", name, " is on ", t.device(),
                " but u is on ", u.device());
    TORCH_CHECK(t.is_contiguous(), "selective_scan_cuda: ", name, " must be contiguous (call .contiguous()), "
                "got shape ", t.sizes(), " strides ", t.strides());
}

static void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* letters) {
    TORCH_CHECK(t.sizes() == expected, "selective_scan_cuda: ", name, " must have shape ", letters, " = ",
                expected, ", got ", t.sizes());
}

static void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
    TORCH_CHECK(t.scalar_type() == expected, "selective_scan_cuda: ", name, " must be ", expected, ", got ",
                t.scalar_type());
}

// Checks everything fwd and bwd share and fills the shape fields of p.
static ScanParams check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                               const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                               const c10::optional<at::Tensor>& delta_bias, bool delta_softplus) {
    TORCH_CHECK(u.dim() == 3, "selective_scan_cuda: u must be 3-D (Bt, KD, L), got shape ", u.sizes());
    TORCH_CHECK(A.dim() == 2, "selective_scan_cuda: A must be 2-D (KD, N), got shape ", A.sizes());
    TORCH_CHECK(B.dim() == 4, "selective_scan_cuda: B must be 4-D (Bt, G, N, L), got shape ", B.sizes());
    const int64_t Bt = u.size(0), KD = u.size(1), L = u.size(2), N = A.size(1), G = B.size(1);
    check_tensor(u, "u", u);
    check_tensor(delta, "delta", u);
    check_tensor(A, "A", u);
    check_tensor(B, "B", u);
    check_tensor(C, "C", u);
    check_dtype(delta, "delta (same dtype as u)", u.scalar_type());
    check_dtype(B, "B (same dtype as u)", u.scalar_type());
    check_dtype(C, "C (same dtype as u)", u.scalar_type());
    check_dtype(A, "A", at::kFloat);
    check_shape(delta, "delta", {Bt, KD, L}, "(Bt, KD, L)");
    check_shape(A, "A", {KD, N}, "(KD, N)");
    TORCH_CHECK(N >= 1 && N <= kMaxDState, "selective_scan_cuda: N = A.size(1) must be in [1, ", kMaxDState,
                "], got ", N);
    TORCH_CHECK(G >= 1 && KD % G == 0, "selective_scan_cuda: the group count G = B.size(1) = ", G,
                " must divide KD = ", KD);
    check_shape(B, "B", {Bt, G, N, L}, "(Bt, G, N, L)");
    check_shape(C, "C", {Bt, G, N, L}, "(Bt, G, N, L)");
    TORCH_CHECK(Bt <= 2147483647 && KD <= 65535, "selective_scan_cuda: grid limits exceeded (Bt = ", Bt,
                ", KD = ", KD, "; KD must be <= 65535)");
    const char* opt_names[2] = {"D", "delta_bias"};
    const c10::optional<at::Tensor>* opts[2] = {&D, &delta_bias};
    for (int i = 0; i < 2; ++i) {
        if (!opts[i]->has_value()) continue;
        const at::Tensor& t = opts[i]->value();
        check_tensor(t, opt_names[i], u);
        check_dtype(t, opt_names[i], at::kFloat);
        check_shape(t, opt_names[i], {KD}, "(KD,)");
    }
    ScanParams p{};
    p.Bt = Bt; p.KD = KD; p.L = L; p.N = N; p.G = G;
    p.chunk = chunk_len(L);
    p.n_chunks = (L + p.chunk - 1) / p.chunk;
    p.softplus = delta_softplus;
    p.u = u.data_ptr(); p.delta = delta.data_ptr(); p.A = A.data_ptr<float>();
    p.Bm = B.data_ptr(); p.Cm = C.data_ptr();
    p.D = D.has_value() ? D->data_ptr<float>() : nullptr;
    p.delta_bias = delta_bias.has_value() ? delta_bias->data_ptr<float>() : nullptr;
    return p;
}

// ----------------------------------------------------------------------------- bindings

// y (Bt, KD, L) fp32, saved (Bt, KD, n_chunks, N) fp32.
// poison=true fills outputs that are written by plain stores with NaN first (tests: unwritten elements show up).
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                       const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                       const c10::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                       int64_t version, bool poison) {
    ScanParams p = check_inputs(u, delta, A, B, C, D, delta_bias, delta_softplus);
    const at::cuda::CUDAGuard guard(u.device());
    const auto f32 = u.options().dtype(at::kFloat);
    auto alloc = [&](at::IntArrayRef shape, bool needs_zero) {
        if (needs_zero) return at::zeros(shape, f32);
        return poison ? at::full(shape, NAN, f32) : at::empty(shape, f32);
    };
    at::Tensor y = alloc({p.Bt, p.KD, p.L}, version == 1);              // v1 accumulates y with atomics
    at::Tensor saved = alloc({p.Bt, p.KD, p.n_chunks, p.N}, false);
    if (u.numel() == 0) return {y.zero_(), saved.zero_()};
    p.y = y.data_ptr<float>();
    p.saved = saved.data_ptr<float>();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    dispatch_dtype(u.scalar_type(), [&](auto tag) { dispatch_fwd<decltype(tag)>(version, p, stream); });
    return {y, saved};
}

// du, ddelta, dB, dC in u's dtype; dA, dD, ddelta_bias fp32; dD / ddelta_bias are None when D / delta_bias are.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>,
           c10::optional<at::Tensor>>
bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& delta_bias, const at::Tensor& dy,
    const at::Tensor& saved, bool delta_softplus, int64_t version, bool poison) {
    ScanParams p = check_inputs(u, delta, A, B, C, D, delta_bias, delta_softplus);
    check_tensor(dy, "dy", u);
    check_dtype(dy, "dy (the gradient of the fp32 output y)", at::kFloat);
    check_shape(dy, "dy", {p.Bt, p.KD, p.L}, "(Bt, KD, L)");
    check_tensor(saved, "saved", u);
    check_dtype(saved, "saved", at::kFloat);
    TORCH_CHECK(saved.sizes() == at::IntArrayRef({p.Bt, p.KD, p.n_chunks, p.N}),
                "selective_scan_cuda: saved must be the tensor fwd returned for these shapes, (Bt, KD, n_chunks, N) = ",
                at::IntArrayRef({p.Bt, p.KD, p.n_chunks, p.N}), ", got ", saved.sizes());
    const at::cuda::CUDAGuard guard(u.device());
    const auto f32 = u.options().dtype(at::kFloat);
    // v1 adds du/ddelta over n with atomics (fp32 scratch); v2 stores each element once, in u's dtype
    at::Tensor du, ddelta;
    if (version == 1) {
        du = at::zeros(u.sizes(), f32);
        ddelta = at::zeros(u.sizes(), f32);
    } else {
        du = poison ? at::full(u.sizes(), NAN, u.options()) : at::empty_like(u);
        ddelta = poison ? at::full(u.sizes(), NAN, u.options()) : at::empty_like(u);
    }
    at::Tensor dA = at::zeros({p.KD, p.N}, f32);
    at::Tensor dB = at::zeros(B.sizes(), f32);
    at::Tensor dC = at::zeros(C.sizes(), f32);
    c10::optional<at::Tensor> dD, ddelta_bias;
    if (D.has_value()) dD = at::zeros({p.KD}, f32);
    if (delta_bias.has_value()) ddelta_bias = at::zeros({p.KD}, f32);
    if (u.numel() > 0) {
        p.dy = dy.data_ptr<float>();
        p.saved = const_cast<float*>(saved.data_ptr<float>());
        p.du = du.data_ptr();
        p.ddelta = ddelta.data_ptr();
        p.dA = dA.data_ptr<float>();
        p.dB = dB.data_ptr<float>();
        p.dC = dC.data_ptr<float>();
        p.dD = dD.has_value() ? dD->data_ptr<float>() : nullptr;
        p.ddelta_bias = ddelta_bias.has_value() ? ddelta_bias->data_ptr<float>() : nullptr;
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
        dispatch_dtype(u.scalar_type(), [&](auto tag) { dispatch_bwd<decltype(tag)>(version, p, stream); });
    } else {
        du.zero_();
        ddelta.zero_();
    }
    const auto dt = u.scalar_type();
    return {du.to(dt), ddelta.to(dt), dA, dB.to(dt), dC.to(dt), dD, ddelta_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "Selective scan (Mamba S6 / VMamba) forward and backward; see the header of selective_scan.cu";
    m.attr("DEFAULT_VERSION") = kDefaultVersion;
    m.attr("VERSIONS") = pybind11::make_tuple(1, 2);
    m.def("chunk_len", &chunk_len, "steps per chunk for a sequence of length L (saved has ceil(L / chunk_len) chunks)",
          pybind11::arg("L"));
    m.def("fwd", &fwd, "y (Bt,KD,L) fp32, saved = fwd(u, delta, A, B, C, D, delta_bias, delta_softplus)",
          pybind11::arg("u"), pybind11::arg("delta"), pybind11::arg("A"), pybind11::arg("B"), pybind11::arg("C"),
          pybind11::arg("D"), pybind11::arg("delta_bias"), pybind11::arg("delta_softplus"),
          pybind11::arg("version") = kDefaultVersion, pybind11::arg("poison") = false);
    m.def("bwd", &bwd,
          "du, ddelta, dA, dB, dC, dD, ddelta_bias = bwd(u, delta, A, B, C, D, delta_bias, dy, saved, delta_softplus)",
          pybind11::arg("u"), pybind11::arg("delta"), pybind11::arg("A"), pybind11::arg("B"), pybind11::arg("C"),
          pybind11::arg("D"), pybind11::arg("delta_bias"), pybind11::arg("dy"), pybind11::arg("saved"),
          pybind11::arg("delta_softplus"), pybind11::arg("version") = kDefaultVersion,
          pybind11::arg("poison") = false);
}
