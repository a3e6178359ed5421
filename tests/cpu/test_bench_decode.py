"""CPU smoke test of `gqla-bench decode` (gqla_megatron.bench_decode): a tiny grid on CPU with the
torch peers only (the Triton kernels report why they cannot run here), checking the JSON fields,
the markdown table and the PNG, and the flag validation."""

import importlib.util
import json
import os

import pytest
import torch

from gqla_megatron import bench_decode
from gqla_megatron.cli import bench as cli_bench


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    argv = ["decode", "--device", "cpu", "--batch", "1,2", "--context", "48", "--s-q", "1,2",
            "--peers", "bmm,sdpa_flash", "--warmup", "0", "--iters", "1", "--copy-mib", "4",
            "--gemm-n", "64", "--out", str(out), *extra]
    assert cli_bench.main(argv) == 0
    return out


def test_decode_bench_cpu_grid_writes_json_markdown_png(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = _run(tmp_path)
    res = json.loads((out / "decode_bench.json").read_text())
    for key in ("device", "rates", "rows", "summary", "shapes", "dtype", "iters", "warmup"):
        assert key in res
    assert res["rates"]["copy_tbps"] > 0 and res["rates"]["gemm_tflops"] > 0
    cells = {(r["path"], r["B"], r["L"], r["s_q"]) for r in res["rows"]}
    assert cells == {(p, B, 48, S) for p in ("absorb", "gqa") for B in (1, 2) for S in (1, 2)}
    for r in res["rows"]:
        assert r["status"] in ("ok", "n/a", "skipped")
        if r["method"] == "triton":
            assert r["status"] == "n/a" and "TRITON_INTERPRET" in r["reason"]
        if r["method"] == "bmm":
            assert r["status"] == "ok"
        if r["status"] == "ok":
            for k in ("time_us", "bytes", "tbps", "tflops", "pct_copy", "pct_gemm"):
                assert r[k] > 0, (k, r)
        else:
            assert r["reason"]
    assert res["cuda_graphs"] is False          # graph replays are the CUDA default only
    for r in res["rows"]:
        if r["status"] == "ok":
            assert r["timing"] == "eager" and "timing_note" not in r
    for s in res["summary"]:
        assert s["best_peer"] in ("bmm", "sdpa_flash")
    md = (out / "decode_bench.md").read_text()
    assert "## absorb" in md and "## gqa" in md and "Methods that did not run" in md
    if importlib.util.find_spec("matplotlib"):
        assert (out / "decode_bench.png").stat().st_size > 0
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_decode_bench_bytes_and_flops_formulas():
    shp = bench_decode.Shapes(**bench_decode.SHAPES["llama3-8b"])
    # LLaMA-3-8B GQLA: absorb caches r + d_r = 576 values per token, gqa g(d_n + d_v) + d_r = 2112
    assert bench_decode.cache_bytes("absorb", shp, 2, 10, 2) == 2 * 10 * 576 * 2
    assert bench_decode.cache_bytes("gqa", shp, 2, 10, 2) == 2 * 10 * 2112 * 2
    assert bench_decode.cache_bytes("gqa", shp, 1, 1, 2, rope_per_group=True) == 8 * 320 * 2
    assert bench_decode.flops("absorb", shp, 1, 100, 1) == 2 * 32 * 100 * (512 + 64 + 512)
    assert bench_decode.flops("gqa", shp, 1, 100, 2) == 2 * 2 * 32 * 100 * (128 + 64 + 128)


@pytest.mark.parametrize("bad", [["--batch", "0"], ["--path", "mla"], ["--peers", "flashmla"],
                                 ["--context", "1x"], ["--s-q", "64"], ["--cuda-graphs"],
                                 ["--l2-flush", "evict"], ["--layers", "0"]])
def test_decode_bench_rejects_bad_flags(tmp_path, bad):
    with pytest.raises(SystemExit):
        _run(tmp_path, *bad)


def test_decode_bench_no_cuda_graphs_flag_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = _run(tmp_path, "--no-cuda-graphs", "--path", "gqa", "--batch", "1", "--s-q", "1")
    res = json.loads((out / "decode_bench.json").read_text())
    assert res["cuda_graphs"] is False and "eager launches" in (out / "decode_bench.md").read_text()


@pytest.mark.parametrize("path", ["absorb", "gqa"])
def test_decode_sweep_candidates_are_valid_configs(path):
    """Every --sweep candidate resolves (a bad field would waste the GPU sweep), defaults first."""
    import torch

    from gqla_megatron.kernels import triton_decode as td

    cands = bench_decode.sweep_configs(path)
    assert cands[0] == {} and len(cands) == len({tuple(sorted(c.items())) for c in cands})
    for c in cands:
        for rows in ((32, 64) if path == "absorb" else (4, 8)):
            td.resolve_config(path, rows, torch.bfloat16, td.DecodeKernelConfig(**c))


def test_l2_flush_modes():
    bd = bench_decode
    cpu = torch.device("cpu")
    w, r = bd.L2Flush(cpu, "write", mib=1), bd.L2Flush(cpu, "read", mib=1)
    w.buf.fill_(3)
    w()
    assert int(w.buf.abs().sum()) == 0          # write: the buffer is zeroed
    r.buf[5] = 7
    r()
    assert int(r.sink) == 7 and int(r.buf[5]) == 7    # read: only read (its max lands in sink)
    with pytest.raises(ValueError, match="l2_flush"):   # the CLI offers only the two modes
        bd.L2Flush(cpu, "evict")


def test_decode_bench_layers_times_distinct_layers_per_layer(tmp_path, monkeypatch):
    """--layers N: every method of a cell runs over N layers' own inputs (make_inputs with N seeds),
    rows and summary carry the layer count, the time is per layer, the markdown says so; the cap
    keeps a cell's inputs under LAYERS_MAX_BYTES."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    seeds = []
    real = bench_decode.make_inputs

    def spy(*a, seed=0, **k):
        seeds.append(seed)
        return real(*a, seed=seed, **k)

    monkeypatch.setattr(bench_decode, "make_inputs", spy)
    timed = []

    def fake_time(call, dev, **kw):   # one timed call = all 3 layers; pretend it took 3 ms
        outs = call()
        timed.append([o.data_ptr() for o in outs])
        return 3e-3, "eager", None

    monkeypatch.setattr(bench_decode, "time_method", fake_time)
    out = _run(tmp_path, "--layers", "3", "--path", "absorb", "--batch", "1", "--s-q", "1")
    assert seeds == [0, 1, 2]
    assert timed and all(len(set(ptrs)) == 3 for ptrs in timed)   # three distinct outputs
    res = json.loads((out / "decode_bench.json").read_text())
    assert res["layers"] == 3
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    assert ok and all(r["layers"] == 3 and abs(r["time_us"] - 1000.0) < 1e-6 for r in ok)
    assert res["summary"][0]["layers"] == 3
    md = (out / "decode_bench.md").read_text()
    assert "**per layer**" in md and "| layers |" in md
    # the cap: no more layers than fit LAYERS_MAX_BYTES / 40 % of free memory, and at least one
    cap = bench_decode.LAYERS_MAX_BYTES
    assert bench_decode.layers_for(cap // 4, 32, None) == 4
    assert bench_decode.layers_for(cap // 4, 2, None) == 2
    assert bench_decode.layers_for(2 * cap, 32, None) == 1
    assert bench_decode.layers_for(100, 32, free=1000) == 4


def test_decode_bench_layers_one_is_the_single_call(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = _run(tmp_path, "--path", "gqa", "--batch", "1", "--s-q", "1")
    res = json.loads((out / "decode_bench.json").read_text())
    assert res["layers"] == 1 and "**per layer**" not in (out / "decode_bench.md").read_text()
    assert all(r["layers"] == 1 for r in res["rows"] if r["status"] == "ok")


def _row(path, B, L, S, method, time_us, pct_copy=50.0, pct_gemm=10.0, layers=1):
    return {"path": path, "B": B, "L": L, "s_q": S, "method": method, "status": "ok", "time_us": time_us,
            "pct_copy": pct_copy, "pct_gemm": pct_gemm, "layers": layers}


def _result(rows, heads=32, floor=3.0, layers=1):
    rates = {"copy_tbps": 4.0, "gemm_tflops": 800.0}
    if floor is not None:
        rates.update(floor1_us=floor, floor1_layer_us=floor / 2)
    return {"rows": rows, "summary": bench_decode.summarize(rows), "rates": rates, "layers": layers,
            "shapes": dict(bench_decode.SHAPES["llama3-8b"], heads=heads), "shapes_name": "test"}


def test_targets_count_cells_and_report_ceilings():
    rows = [
        # memory-bound, B x L = 256k: tilelang (faster than triton) at 91 % meets the 90 % target
        _row("absorb", 8, 32768, 1, "triton", 100.0, 70.0), _row("absorb", 8, 32768, 1, "tilelang", 80.0, 91.0),
        _row("absorb", 8, 32768, 1, "bmm", 150.0),                      # 1.875x bmm: a miss of the 2.5x target
        # B = 1 x 8k at 20 % of copy in 10 us: 2 us of bytes, ceiling 2 / (2 + 3) = 40 % with a 3 us floor
        _row("absorb", 1, 8192, 1, "tilelang", 10.0, 20.0), _row("absorb", 1, 8192, 1, "bmm", 30.0),
        # gqa: 85 % in a memory-bound cell misses; the peer is faster: a peer-target miss
        _row("gqa", 32, 8192, 1, "triton", 100.0, 85.0), _row("gqa", 32, 8192, 1, "sdpa_cudnn", 90.0),
        # B x L < 256k: not a memory-target cell
        _row("gqa", 8, 1024, 1, "triton", 10.0, 30.0),
    ]
    got = {(t["target"], t["path"]): t for t in bench_decode.targets(_result(rows))}
    mem = got[("memory", "absorb")]
    assert (mem["cells"], mem["met"], mem["misses"]) == (1, 1, [])
    b1 = got[("b1", "absorb")]
    assert (b1["cells"], b1["met"]) == (1, 0)
    assert b1["misses"][0]["kernel"] == "tilelang" and b1["misses"][0]["ceiling"] == pytest.approx(40.0)
    bmm = got[("bmm", "absorb")]
    assert (bmm["cells"], bmm["met"]) == (2, 1) and bmm["misses"][0]["value"] == pytest.approx(1.875)
    assert got[("memory", "gqa")]["misses"][0]["value"] == 85.0
    peer = got[("peer", "gqa")]
    assert (peer["cells"], peer["met"]) == (1, 0) and peer["misses"][0]["value"] == pytest.approx(0.9)
    assert ("compute", "absorb") not in got                          # 32 heads x s_q 1 < 128 rows
    # a cell timed over several layers: the per-layer floor (1.5 us here) sets its ceiling; in the
    # same run a cell capped to one layer keeps the per-call floor
    layered = [dict(r, layers=32) for r in rows if r["B"] == 1] + [r for r in rows if r["B"] != 1]
    per_layer = {(t["target"], t["path"]): t for t in bench_decode.targets(_result(layered, layers=32))}
    assert per_layer[("b1", "absorb")]["misses"][0]["ceiling"] == pytest.approx(100 * 2 / 3.5)
    gqa_miss = per_layer[("memory", "gqa")]["misses"][0]                  # B=32: timed as one call
    assert gqa_miss["ceiling"] == pytest.approx(100 * 85 / 88)
    md = "\n".join(bench_decode.targets_markdown(_result(layered, layers=32)))
    assert "3.00 us per call, 1.50 us per layer" in md
    # no floor measured (eager timing): misses carry no ceiling
    eager = {(t["target"], t["path"]): t for t in bench_decode.targets(_result(rows, floor=None))}
    assert eager[("b1", "absorb")]["misses"][0]["ceiling"] is None


def test_targets_compute_bound_cells_at_128_heads():
    rows = [_row("absorb", 32, 32768, 1, "tilelang", 1000.0, 30.0, 72.0),   # compute-bound, meets 70 %
            _row("absorb", 8, 4096, 1, "tilelang", 50.0, 20.0, 35.0)]
    got = {(t["target"], t["path"]): t for t in bench_decode.targets(_result(rows, heads=128))}
    comp = got[("compute", "absorb")]
    assert (comp["cells"], comp["met"]) == (2, 1)
    # 35 % of the matmul rate over 50 us is 17.5 us of FLOPs: ceiling 17.5 / (17.5 + 3)
    assert comp["misses"][0]["ceiling"] == pytest.approx(100 * 17.5 / 20.5)
    assert ("memory", "absorb") not in got                          # compute-bound: % copy < % matmul
    md = "\n".join(bench_decode.targets_markdown(_result(rows, heads=128)))
    assert "| compute-bound absorb cells" in md and "1 of 2" in md and "B=8 L=4096 s_q=1 tilelang 35 % (85 %)" in md


def test_targets_cli_reads_saved_runs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [_row("absorb", 1, 8192, 1, "tilelang", 10.0, 20.0), _row("absorb", 1, 8192, 1, "bmm", 30.0)]
    (run / "decode_bench.json").write_text(json.dumps(_result(rows)))
    out = tmp_path / "targets.md"
    assert cli_bench.main(["targets", str(run), str(run / "decode_bench.json"), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("B = 1, L >= 8k") == 2 and "0 of 1" in text and "(40 %)" in text
    assert "B = 1, L >= 8k" in capsys.readouterr().out
    for bad in ([str(tmp_path / "nowhere")], [str(out)]):             # missing; not JSON
        with pytest.raises(SystemExit):
            cli_bench.main(["targets", *bad])
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit):
        cli_bench.main(["targets", str(tmp_path / "other.json")])


def test_allocator_setting_respects_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    assert bench_decode._set_allocator("expandable") == "max_split_size_mb:64" and calls == []
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert bench_decode._set_allocator("default") == "" and calls == []
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    assert bench_decode._set_allocator("expandable") == "expandable_segments:True"
    assert calls == ["expandable_segments:True"] and os.environ["PYTORCH_CUDA_ALLOC_CONF"] == calls[0]


def test_launch_floor_graphs_hold_one_or_two_kernels_per_layer(monkeypatch):
    """measure_launch_floor's replays: one (two) one-element kernels per layer, one layer or
    ``layers`` of them, per-layer figures divided by the layer count. Fake timing on CPU: each
    graph 'takes' 1 us per kernel launched by its step."""
    launched = []

    def fake_time_graph(fn, dev, *, warmup, iters, flush=None):
        out = fn()
        launched.append(len(out))
        return len(out) * 1e-6

    monkeypatch.setattr(bench_decode, "time_graph", fake_time_graph)
    got = bench_decode.measure_launch_floor(torch.device("cpu"), None, iters=3, layers=5)
    assert launched == [1, 2, 5, 10]
    assert got == pytest.approx({"floor1_us": 1.0, "floor2_us": 2.0, "floor1_layer_us": 1.0, "floor2_layer_us": 2.0})
    assert set(bench_decode.measure_launch_floor(torch.device("cpu"), None, iters=3)) == {"floor1_us", "floor2_us"}
