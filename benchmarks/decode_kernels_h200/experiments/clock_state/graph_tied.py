"""Is the slow first timing after a large free tied to the captured graph or transient? gqa B=32 x
32k: 4 input sets held, freed (torch.cuda.empty_cache), a new set made; then graph G1 captured and
timed, graph G2 captured on the same tensors and timed, G1 timed again, G2 again (each: median of
10 replays, write flush before each). Then the same sequence on a fresh set without the free."""

import statistics
import sys

import torch

sys.path.insert(0, ".")
from gqla_megatron import bench_decode as bd  # noqa: E402

dev = torch.device("cuda")
shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
flush = bd.L2Flush(dev, "write")


def capture(fn):
    # not ab_graphs.capture: that one replays the graph once after capturing, and here the first
    # timed replays must be the first after the free
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(dev).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize(dev)
    return g


def time_g(g, iters=10):
    ts = []
    for _ in range(iters):
        flush()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize(dev)
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def sequence(tag, x):
    fn = bd._method_triton("gqa", shp, x)[0]
    g1 = capture(fn)
    t1 = time_g(g1)
    g2 = capture(fn)
    t2 = time_g(g2)
    print(f"{tag}: G1 {t1:.0f} us, G2 {t2:.0f} us, G1 again {time_g(g1):.0f} us, G2 again {time_g(g2):.0f} us, "
          f"G1 third {time_g(g1):.0f} us", flush=True)


held = [bd.make_inputs("gqa", shp, 32, 32768, 1, torch.bfloat16, dev, 0, seed=i) for i in range(4)]
sequence("fresh process, first set", held[0])
del held
torch.cuda.empty_cache()
x = bd.make_inputs("gqa", shp, 32, 32768, 1, torch.bfloat16, dev, 0, seed=9)
sequence("after freeing 4 sets", x)
y = bd.make_inputs("gqa", shp, 32, 32768, 1, torch.bfloat16, dev, 0, seed=10)
sequence("next set, no free", y)
