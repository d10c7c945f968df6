"""
Benchmarks, one subcommand each (timings are printed, never asserted):

    python bench.py scan      # selective scan: ref vs chunked (vs cuda on a GPU), time and peak memory
    python bench.py llm       # greedy generation tokens/s and checkpoint-loading peak RSS

Each subcommand is a function `bench_<name>(argv)` registered with @bench; `python bench.py NAME --help`
lists its flags.
"""
import sys

BENCHES = {}


def bench(fn):
    """Register `bench_<name>` as the subcommand `<name>`."""
    BENCHES[fn.__name__.removeprefix("bench_")] = fn
    return fn


# ----------------------------------------------------------------------------- benchmarks go below


@bench
def bench_llm(argv):
    """llm.py: (1) greedy generation tokens/s, ours vs transformers.LlamaForCausalLM when it is installed, same
    weights, KV cache on both, 64 new tokens after a 16-token prompt on a small config (hidden 256, 4 layers,
    8 heads, MLP 688, vocab 32000; the README's numbers were measured on it); (2) peak RSS while
    Llama.from_pretrained loads a ~300 MB checkpoint written to a temp dir, measured in a fresh subprocess per
    layout/dtype (the increase over the post-import RSS, as a fraction of the checkpoint's size)."""
    import argparse
    import dataclasses
    import json
    import os
    import statistics
    import subprocess
    import sys
    import tempfile
    import time

    import torch
    from safetensors.torch import save_file

    from llm import CONFIGS, LLMConfig, Llama

    ap = argparse.ArgumentParser(prog="bench.py llm", description=bench_llm.__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per model (median reported)")
    ap.add_argument("--ckpt-mb", type=float, default=300, help="approximate checkpoint size for the RSS test")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for the speed test (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")

    if not args.skip_speed:
        torch.manual_seed(0)
        cfg = dataclasses.replace(CONFIGS["toy"], hidden_size=256, intermediate_size=688, num_attention_heads=8,
                                  num_key_value_heads=8)
        ours = Llama(cfg).eval()
        prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len))
        runners = {"ours": lambda: ours.generate(prompt, max_new_tokens=args.new_tokens)}
        try:
            import transformers
            with tempfile.TemporaryDirectory() as d:  # hand HF exactly our weights through a HF-format directory
                with open(os.path.join(d, "config.json"), "w") as f:
                    json.dump(cfg.to_hf("5"), f)
                weights = {k: v.contiguous() for k, v in ours.state_dict().items()}
                save_file(weights, os.path.join(d, "model.safetensors"))
                hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            am = torch.ones_like(prompt)
            runners["transformers"] = lambda: hf.generate(
                prompt, attention_mask=am, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=0)[:, args.prompt_len:]
            print(f"transformers {transformers.__version__} (sdpa attention, DynamicCache)")
        except ImportError:
            print("transformers is not installed: timing ours only")
        times = {k: [] for k in runners}
        outs = {}
        with torch.inference_mode():
            for name, run in runners.items():
                outs[name] = run()  # warm-up (and the tokens to compare)
            for _ in range(args.repeats):  # interleaved, so a noisy neighbour hurts both alike
                for name, run in runners.items():
                    t = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t)
        rates = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}
        for k, r in rates.items():
            print(f"  {k:13s} {r:7.1f} tok/s (median of {args.repeats}; runs: "
                  + ", ".join(f"{args.new_tokens / t:.0f}" for t in times[k]) + ")")
        if "transformers" in rates:
            print(f"  ours / transformers = {rates['ours'] / rates['transformers']:.2f}x; greedy tokens equal: "
                  f"{torch.equal(outs['ours'], outs['transformers'])}")

    if not args.skip_memory:
        # hidden 768, MLP 2048, 12 heads, vocab 32000; layers chosen to reach the size in fp32
        D, Fd, V = 768, 2048, 32000
        per_layer, fixed = 4 * D * D + 3 * D * Fd + 2 * D, 2 * V * D + D
        layers = max(1, round((args.ckpt_mb * 1e6 / 4 - fixed) / per_layer))
        cfg = LLMConfig(vocab_size=V, hidden_size=D, intermediate_size=Fd, num_hidden_layers=layers,
                        num_attention_heads=12)
        probe = (  # runs in a fresh interpreter: RSS from /proc, peak reset after the imports
            "import json, sys, time, torch\n"
            "sys.path.insert(0, sys.argv[3])\n"
            "from llm import Llama\n"
            "def rss(f):\n"
            "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(f))\n"
            "open('/proc/self/clear_refs', 'w').write('5')  # reset VmHWM to the current RSS\n"
            "base = rss('VmRSS:')\n"
            "t = time.perf_counter()\n"
            "m = Llama.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))\n"
            "t = time.perf_counter() - t\n"
            "peak, after = rss('VmHWM:'), rss('VmRSS:')\n"
            "with torch.no_grad():\n"
            "    m(torch.zeros(1, 1, dtype=torch.long))  # touch every weight once\n"
            "print(json.dumps(dict(base=base, peak=peak, after=after, touched=rss('VmRSS:'), seconds=t)))\n")
        root = os.path.dirname(os.path.abspath(__file__))
        with tempfile.TemporaryDirectory() as d:
            torch.manual_seed(0)
            model = Llama(cfg)
            sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            for layout in ("safetensors", "bin"):
                os.makedirs(os.path.join(d, layout))
                with open(os.path.join(d, layout, "config.json"), "w") as f:
                    json.dump(cfg.to_hf("5"), f)
            save_file(sd, os.path.join(d, "safetensors", "model.safetensors"))
            torch.save(sd, os.path.join(d, "bin", "pytorch_model.bin"))
            del model, sd
            size = os.path.getsize(os.path.join(d, "safetensors", "model.safetensors"))
            print(f"checkpoint: {layers} layers, {size / 1e6:.0f} MB fp32")
            for layout, file in (("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")):
                for dtype in ("float32", "bfloat16"):
                    res = subprocess.run([sys.executable, "-c", probe, os.path.join(d, layout), dtype, root],
                                         capture_output=True, text=True)
                    if res.returncode:
                        print(res.stderr)
                        continue
                    r = json.loads(res.stdout)
                    grow = r["peak"] - r["base"]
                    print(f"  {file:18s} -> {dtype:8s}: peak RSS +{grow / 1e6:4.0f} MB = {grow / size:.2f}x the file"
                          f" ({r['seconds']:.1f} s); after load +{(r['after'] - r['base']) / 1e6:.0f} MB, after one"
                          f" forward +{(r['touched'] - r['base']) / 1e6:.0f} MB")


@bench
def bench_cuda(argv):
    """selective_scan.cu on a GPU: kernel fwd and fwd+bwd vs the chunked and ref PyTorch paths at the VMamba-T/S
    scan shapes (vmamba.md §7), the memory-bandwidth floor, and VMamba-T images/s with the cuda vs chunked scan."""
    import argparse
    import dataclasses
    import statistics

    import torch

    ap = argparse.ArgumentParser(prog="python bench.py cuda", description=bench_cuda.__doc__)
    ap.add_argument("--batch", type=int, default=32, help="batch of the scan shapes (vmamba.md §7: 32-128)")
    ap.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"],
                    help="u/delta/B/C dtype (VMamba trains with fp16 AMP: fp16 in, fp32 out)")
    ap.add_argument("--stages", default="1,2,3,4", help="comma list of VMamba-T/S stages to time")
    ap.add_argument("--versions", default="1,2", help="kernel versions to time (see selective_scan.cu header)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10, help="timed repeats; the median is reported")
    ap.add_argument("--ref-iters", type=int, default=2, help="repeats for the slow ref (loop over L) path; 0 skips")
    ap.add_argument("--model-batch", type=int, default=64, help="batch for the full VMamba-T throughput")
    ap.add_argument("--no-model", action="store_true", help="skip the full-model throughput")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench cuda: needs a CUDA GPU (torch.cuda.is_available() is False); on a GPU-less machine only "
                 "the build can be checked: python -m pytest tests/test_selective_scan_cuda.py")

    import vmamba
    ext = vmamba.load_kernel()
    dev = torch.device("cuda")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    isz = torch.tensor([], dtype=dtype).element_size()

    def timed(fn, iters):
        """Median milliseconds of fn() over `iters` runs (CUDA events), after args.warmup untimed runs."""
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        ms = []
        for _ in range(max(iters, 1)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
        return statistics.median(ms)

    # device-to-device copy bandwidth: 1 GiB read + 1 GiB written (far larger than L2, so no cache effects)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / (timed(lambda: dst.copy_(src), args.iters) * 1e-3) / 1e9
    del src, dst
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | D2D copy {copy_gbs:.0f} GB/s | "
          f"dtype {args.dtype} | batch {args.batch}")

    Bt, G, N = args.batch, 4, 1
    rows = []
    for s in (int(x) for x in args.stages.split(",")):
        side = 56 >> (s - 1)
        L, KD = side * side, 768 << (s - 1)                           # T/S: KD = 4 directions x 2C, C = 96*2^(s-1)
        u = torch.randn(Bt, KD, L, device=dev).to(dtype)              # (Bt, KD, L)
        delta = (0.5 * torch.rand(Bt, KD, L, device=dev) - 4).to(dtype)   # softplus(-4 + bias) ~ VMamba's dt
        A = -torch.rand(KD, N, device=dev) - 0.5                      # (KD, N)
        B = torch.randn(Bt, G, N, L, device=dev).to(dtype)            # (Bt, G, N, L)
        C = torch.randn(Bt, G, N, L, device=dev).to(dtype)
        D, bias = torch.randn(KD, device=dev), torch.rand(KD, device=dev)
        dy = torch.randn(Bt, KD, L, device=dev)
        # floor: bytes that must move once, at the measured copy bandwidth
        fwd_bytes = Bt * (2 * KD * L * isz + 2 * G * N * L * isz + KD * L * 4)
        bwd_bytes = Bt * (2 * KD * L * isz + 2 * G * N * L * isz + KD * L * 4 + 2 * KD * L * isz + 2 * G * N * L * isz)
        row = {"stage": s, "shape (Bt,KD,L)": f"({Bt},{KD},{L})",
               "floor fwd ms": fwd_bytes / (copy_gbs * 1e9) * 1e3,
               "floor fwd+bwd ms": (fwd_bytes + bwd_bytes) / (copy_gbs * 1e9) * 1e3}
        for v in (int(x) for x in args.versions.split(",")):
            _, saved = ext.fwd(u, delta, A, B, C, D, bias, True, version=v)
            row[f"v{v} fwd ms"] = timed(lambda: ext.fwd(u, delta, A, B, C, D, bias, True, version=v), args.iters)
            row[f"v{v} fwd+bwd ms"] = timed(lambda: (ext.fwd(u, delta, A, B, C, D, bias, True, version=v),
                                                     ext.bwd(u, delta, A, B, C, D, bias, dy, saved, True, version=v)),
                                            args.iters)
        leaves = [t.detach().clone().requires_grad_(True) for t in (u, delta, A, B, C, D, bias)]

        def torch_path(backend, backward):
            y = vmamba.selective_scan(*leaves[:5], D=leaves[5], delta_bias=leaves[6], delta_softplus=True,
                                      backend=backend)
            if backward:
                y.backward(dy)

        for backend, iters in (("chunked", args.iters), ("ref", args.ref_iters)):
            if iters == 0:
                continue
            with torch.no_grad():
                row[f"{backend} fwd ms"] = timed(lambda: torch_path(backend, False), iters)
            row[f"{backend} fwd+bwd ms"] = timed(lambda: torch_path(backend, True), iters)
        best = ext.DEFAULT_VERSION
        if f"v{best} fwd ms" in row:
            row[f"v{best} fwd / floor"] = row[f"v{best} fwd ms"] / row["floor fwd ms"]
            if "chunked fwd ms" in row:
                row[f"chunked / v{best} fwd"] = row["chunked fwd ms"] / row[f"v{best} fwd ms"]
                row[f"chunked / v{best} fwd+bwd"] = row["chunked fwd+bwd ms"] / row[f"v{best} fwd+bwd ms"]
        rows.append(row)
        del u, delta, B, C, dy, leaves
        torch.cuda.empty_cache()

    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")

    if not args.no_model:
        x = torch.randn(args.model_batch, 3, 224, 224, device=dev)
        print(f"\nVMamba-T (vmambav2_tiny_224, fp32) images/s at batch {args.model_batch}, 224x224:")
        for backend in ("cuda", "chunked"):
            cfg = dataclasses.replace(vmamba.CONFIGS["vmambav2_tiny_224"], scan_backend=backend)
            model = vmamba.VMamba(cfg).to(dev)
            model.eval()
            with torch.no_grad():
                infer_ms = timed(lambda: model(x), max(args.iters // 2, 1))
            model.train()
            train_ms = timed(lambda: model(x).float().sum().backward(), max(args.iters // 2, 1))
            print(f"  scan_backend={backend:8s} inference {args.model_batch / infer_ms * 1e3:8.1f} img/s | "
                  f"forward+backward {args.model_batch / train_ms * 1e3:8.1f} img/s")
            del model
            torch.cuda.empty_cache()


@bench
def bench_scan(argv):
    """vmamba.selective_scan: forward+backward time and peak memory of the backends (ref, chunked, and cuda with
    --device cuda) at VMamba-T's real scan shapes (vmamba.md §7: u (B, 4D, L), B/C (B, 4, 1, L), softplus, D and
    delta_bias on). CPU memory = peak RSS growth during the first fwd+bwd in a fresh subprocess (VmHWM reset via
    /proc/self/clear_refs after the inputs exist); CUDA memory = torch.cuda.max_memory_allocated growth.
    Inputs' gradients count, the inputs themselves do not."""
    import argparse
    import json
    import statistics
    import subprocess
    import time

    import torch

    import vmamba

    ap = argparse.ArgumentParser(prog="python bench.py scan", description=bench_scan.__doc__)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", default="1,2", help="comma list of batch sizes")
    ap.add_argument("--stages", default="1,2,3,4", help="comma list of VMamba-T (s2l5) stages")
    ap.add_argument("--backends", default=None, help="default: ref,chunked (+cuda with --device cuda)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads (0 = torch's default, all cores). Use 1 on a CPU shared with other "
                         "jobs: there extra threads mostly measure contention (OpenMP barriers spin)")
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal: "backend,stage,batch"
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench scan: --device cuda needs a GPU (torch.cuda.is_available() is False)")
    # VMamba-T s2l5 at 224x224: (C, L) per stage; D = 2C, K = 4 directions, N = d_state = 1
    stage_shapes = {1: (96, 3136), 2: (192, 784), 3: (384, 196), 4: (768, 49)}

    def make(stage, Bsz):
        C, L = stage_shapes[stage]
        KD, N, G = 4 * 2 * C, 1, 4
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(Bsz, KD, L, generator=g), torch.randn(Bsz, KD, L, generator=g) - 4.0,
                  -torch.exp(0.1 * torch.randn(KD, N, generator=g)),
                  torch.randn(Bsz, G, N, L, generator=g), torch.randn(Bsz, G, N, L, generator=g),
                  torch.ones(KD), torch.randn(KD, generator=g)]
        return [t.to(dev).requires_grad_() for t in inputs]

    def step(inputs, backend):
        for t in inputs:
            t.grad = None
        y = vmamba.selective_scan(*inputs, delta_softplus=True, backend=backend)
        y.backward(torch.ones_like(y))
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def rss(field):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

    if args.memory_of:  # child process: one fwd+bwd, print the peak growth in bytes
        be, s, b = args.memory_of.split(",")
        inputs = make(int(s), int(b))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        m0 = rss("VmRSS:")
        step(inputs, be)
        print(json.dumps({"peak": rss("VmHWM:") - m0}))
        return

    def peak_memory(be, s, Bsz):
        if dev.type == "cuda":
            inputs = make(s, Bsz)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            m0 = torch.cuda.memory_allocated()
            step(inputs, be)
            return torch.cuda.max_memory_allocated() - m0
        # a fresh process: glibc keeps freed memory resident, so in-process RSS peaks depend on what ran before
        out = subprocess.run([sys.executable, __file__, "scan", "--threads", str(args.threads),
                              "--memory-of", f"{be},{s},{Bsz}"], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak"]

    backends = (args.backends or ("ref,chunked,cuda" if dev.type == "cuda" else "ref,chunked")).split(",")
    print(f"torch {torch.__version__} | device {args.device} | {torch.get_num_threads()} threads | "
          f"SCAN_CHUNK {vmamba.SCAN_CHUNK}")
    print("| stage | B | u (B, KD, L) | backend | fwd+bwd ms (median) | peak MB | vs ref: speed-up | memory |")
    print("|---|---|---|---|---|---|---|---|")
    for Bsz in (int(b) for b in args.batch.split(",")):
        for s in (int(x) for x in args.stages.split(",")):
            inputs = make(s, Bsz)
            base = None
            for be in backends:
                peak = peak_memory(be, s, Bsz)
                step(inputs, be)  # warm-up
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    step(inputs, be)
                    times.append(time.perf_counter() - t0)
                ms = statistics.median(times) * 1e3
                if be == "ref":
                    base = (ms, peak)
                rel = f"{base[0] / ms:.1f}x | {peak / max(base[1], 1):.2f}x" if base and be != "ref" else " | "
                print(f"| {s} | {Bsz} | {tuple(inputs[0].shape)} | {be} | {ms:.1f} | {peak / 2**20:.0f} | {rel} |",
                      flush=True)


# ----------------------------------------------------------------------------- dispatch

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        sys.exit(f"usage: python bench.py {{{','.join(BENCHES)}}} [flags]")
    BENCHES[sys.argv[1]](sys.argv[2:])
