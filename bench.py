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


# ----------------------------------------------------------------------------- dispatch

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        sys.exit(f"usage: python bench.py {{{','.join(BENCHES)}}} [flags]")
    BENCHES[sys.argv[1]](sys.argv[2:])
