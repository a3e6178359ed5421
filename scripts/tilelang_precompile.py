"""Compile TileLang absorb kernels in parallel processes (GPU machine), filling TileLang's disk
cache so tests and benchmarks that follow find them compiled (~40 s each when compiled one by
one on a fresh machine, ~1 min for all of them this way).

    python3 scripts/tilelang_precompile.py      # what the GPU tests, the bench and the engine use
"""

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (dtype, lengths dtype, page): tests/gpu/test_tilelang_kernels.py's cases and the bench's inputs
DEFAULT = [("bfloat16", "int32", 0), ("bfloat16", "int32", 64), ("bfloat16", "int32", 128),
           ("float16", "int32", 0), ("bfloat16", "int64", 0)]


def _one(job):
    dtype, len_dtype, page, direct = job
    from gqla_megatron.kernels import tilelang_decode as tld

    t = time.time()
    tld.compile_absorb(r=512, dr=64, dtype=dtype, len_dtype=len_dtype, page=page, direct=direct)
    return job, time.time() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 4)
    args = p.parse_args(argv)
    jobs = [(d, ld, pg, direct) for d, ld, pg in DEFAULT for direct in (False, True)]
    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=min(args.workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
        for job, dt in ex.map(_one, jobs):
            print(f"compiled {job}: {dt:.0f} s", flush=True)
    print(f"{len(jobs)} kernels in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
