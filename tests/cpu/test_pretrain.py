"""CPU tier: the pretraining CLI end to end (subprocesses; torchrun for the multi-rank runs).

Loss trajectories are compared through --metrics-file (JSON lines, exact float round trip)."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "pretrain", "pretrain_gqla.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
BASE = ["--recipe", "tiny_cpu", "--mock-data", "--train-iters", "6", "--init-layout-invariant"]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, WANDB_MODE="offline", WANDB_SILENT="true")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run(args, nproc=1, timeout=600, extra_launch=()):
    if nproc == 1 and not extra_launch:
        cmd = [sys.executable, SCRIPT, *args]
    else:
        cmd = [TORCHRUN, *extra_launch, "--nproc-per-node", str(nproc), SCRIPT, *args]
        if not extra_launch:
            cmd.insert(1, "--standalone")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())


def losses(path):
    with open(path) as f:
        return [(m["iteration"], m["lm loss"]) for m in map(json.loads, f)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "m.jsonl"
    r = run(BASE + ["--metrics-file", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    return losses(out)


def test_single_process_trains(single):
    assert [i for i, _ in single] == list(range(1, 7))
    assert single[-1][1] < single[0][1] - 0.3  # mock data is learnable


def test_tp2_pp2_dp2_distributed_optimizer_matches_single_process(single, tmp_path):
    out = tmp_path / "m.jsonl"
    r = run(BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                    "--use-distributed-optimizer", "--metrics-file", str(out)], nproc=8)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = losses(out)
    assert [i for i, _ in got] == [i for i, _ in single]
    for (_, a), (_, b) in zip(got, single):
        assert abs(a - b) <= 1e-5 * abs(b), (got, single)


def test_two_torchrun_nodes_on_localhost_train_together(single, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "m.jsonl"
    procs = []
    for node in (0, 1):
        launch = ["--nnodes", "2", "--node-rank", str(node), "--master-addr", "127.0.0.1",
                  "--master-port", str(port)]
        cmd = [TORCHRUN, *launch, "--nproc-per-node", "1", SCRIPT, *BASE, "--metrics-file", str(out)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env()))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert "DP 2" in "".join(outs)
    got = losses(out)
    for (_, a), (_, b) in zip(got, single):
        assert abs(a - b) <= 1e-5 * abs(b)


def test_resume_continues_bit_for_bit(single, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "m.jsonl"
    common = BASE + ["--save", str(ckpt), "--save-interval", "3", "--metrics-file", str(out)]
    r = run(common + ["--exit-interval", "4"])  # saved at 3, "killed" after 4
    assert r.returncode == 0, r.stderr[-3000:]
    assert open(ckpt / "latest_checkpointed_iteration.txt").read() == "3"
    r = run(common + ["--load", str(ckpt)])
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(out)
    assert [i for i, _ in got] == [1, 2, 3, 4, 4, 5, 6]
    resumed = dict(got[4:])
    assert resumed == {i: l for i, l in single if i >= 4}  # exact equality


DRIVER = """
import sys
sys.path.insert(0, {root!r})
import gqla_megatron.megatron
from megatron.core import dist_checkpointing
real_save, calls = dist_checkpointing.save, []
def save(sharded, path, *a, **k):
    calls.append(path)
    if len(calls) == 2:  # die in the middle of the second save, after writing part of it
        open(path + "/__0_0.distcp", "wb").write(b"partial")
        import os; os._exit(17)
    return real_save(sharded, path, *a, **k)
dist_checkpointing.save = save
from gqla_megatron.training.cli import main
if __name__ == "__main__":  # dist_checkpointing spawns helper processes
    sys.exit(main(sys.argv[1:]))
"""


def test_process_killed_during_save_leaves_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    args = BASE + ["--save", str(ckpt), "--save-interval", "2"]
    log = tmp_path / "driver.log"
    with open(log, "w") as f:  # a file, not a pipe: orphaned checkpoint helpers may keep a pipe open
        p = subprocess.Popen([sys.executable, str(driver), *args], stdout=f, stderr=subprocess.STDOUT,
                             env=env(), start_new_session=True)
        try:
            code = p.wait(timeout=300)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the helpers the "killed" process left behind
            except ProcessLookupError:
                pass
    assert code == 17, log.read_text()[-2000:]
    assert open(ckpt / "latest_checkpointed_iteration.txt").read() == "2"
    assert (ckpt / "iter_0000004.tmp").is_dir() and not (ckpt / "iter_0000004").exists()
    r = run(BASE + ["--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "start iteration 2" in r.stdout
    assert open(ckpt / "latest_checkpointed_iteration.txt").read() == "6"


def test_wandb_offline_and_tensorboard_contain_the_scalars(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = run(BASE + ["--wandb-project", "gqla-test", "--wandb-exp-name", "tiny",
                    "--wandb-save-dir", str(tmp_path / "wb"), "--tensorboard-dir", str(tmp_path / "tb"),
                    "--metrics-file", str(tmp_path / "m.jsonl")])
    assert r.returncode == 0, r.stderr[-3000:]
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"lm loss", "lr", "grad norm", "tokens per s", "TFLOP/s per GPU", "MFU", "memory GiB"} <= tags
    tb_loss = [e.value for e in ea.Scalars("lm loss")]
    assert tb_loss == pytest.approx([l for _, l in losses(tmp_path / "m.jsonl")], rel=1e-6)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = read_wandb_history(runs[0])
    assert [round(h["lm loss"], 5) for h in history] == [round(l, 5) for _, l in losses(tmp_path / "m.jsonl")]


def read_wandb_history(path):
    """History rows of an offline .wandb file. wandb 0.31 ships no Python reader, so this parses
    the framing: a 7-byte header (':W&B', magic, version), then LevelDB-log records in 32 KiB
    blocks (crc32c u32, length u16 LE, type u8: 1 full, 2 first, 3 middle, 4 last), each record a
    wandb_internal_pb2.Record."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B", raw[:8]
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", raw, pos + 4)
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = data if kind in (1, 2) else pending + data
        if kind not in (1, 4):
            continue
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(pending)
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


@pytest.mark.parametrize("args,message", [
    (["--recipe", "tiny_cpu", "--data-path", "/nonexistent/corpus"], "does not exist"),
    (["--recipe", "tiny_cpu", "--mock-data", "--num-query-groups", "4", "--tensor-model-parallel-size", "8"],
     "must divide the world size"),
    (["--recipe", "tiny_cpu", "--mock-data", "--global-batch-size", "7"],
     "--global-batch-size (7) must be divisible by --micro-batch-size (2)"),
    (["--recipe", "tiny_cpu", "--mock-data", "--fp8-format", "hybrid"], "--fp8-format needs"),
    (["--recipe", "tiny_cpu"], "give exactly one of --data-path and --mock-data"),
    (["--recipe", "tiny_cpu", "--mock-data", "--train-iters", "2"], "--lr-warmup-iters (2) must be"),
])
def test_bad_input_fails_before_any_step_and_writes_nothing(tmp_path, args, message):
    save = tmp_path / "ckpt"
    r = run(args + ["--save", str(save)])
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert not save.exists()
    assert "iter " not in r.stdout


def test_tp_not_dividing_groups_and_empty_data_and_unknown_recipe(tmp_path):
    empty = tmp_path / "empty"
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "empty.idx").write_bytes(b"")
    r = run(["--recipe", "tiny_cpu", "--data-path", str(empty)])
    assert r.returncode == 2 and "empty.bin is empty" in r.stderr
    r = run(["--recipe", "nope", "--mock-data"])
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr
    r = run(["--recipe", "tiny_cpu", "--mock-data", "--tensor-model-parallel-size", "2",
             "--num-query-groups", "1", "--num-attention-heads", "8"], nproc=2)
    assert r.returncode != 0 and "--tensor-model-parallel-size (2) must divide --num-query-groups (1)" in (r.stderr + r.stdout)


def test_preprocess_then_train_on_indexed_data(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    text = ("Megatron-Core trains GQLA models with tensor and pipeline parallelism. "
            "The latent cache stores r plus d_r values per token. ") * 40
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(f"Document {i}. " + text)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(p) for p in docs.iterdir()],
              trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    prefix = tmp_path / "data" / "corpus_text_document"
    cmd = [sys.executable, os.path.join(ROOT, "pretrain", "preprocess_data.py"), "--input", str(docs),
           "--tokenizer", str(tmp_path / "tokenizer.json"), "--output-prefix", str(prefix)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "6 documents" in r.stdout
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
    assert r2.returncode != 0 and "exists" in r2.stderr  # never overwrites silently
    out = tmp_path / "m.jsonl"
    r = run(["--recipe", "tiny_cpu", "--data-path", str(prefix), "--split", "100,0,0", "--train-iters", "4",
             "--seq-length", "32", "--data-cache-path", str(tmp_path / "cache"), "--metrics-file", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(losses(out)) == 4


def test_deepspeed_zero2_close_to_megatron_optimizer(single, tmp_path):
    pytest.importorskip("deepspeed")
    out, ckpt = tmp_path / "m.jsonl", tmp_path / "ds"
    r = run(BASE + ["--engine", "deepspeed", "--zero-stage", "2", "--metrics-file", str(out),
                    "--save", str(ckpt), "--save-interval", "3"], nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "DeepSpeed ZeRO-2" in r.stdout and "DP 2" in r.stdout
    got = losses(out)
    assert [i for i, _ in got] == [i for i, _ in single]
    # same init, data order and schedule; torch AdamW + DeepSpeed clipping vs Megatron's Adam:
    # identical first two steps, then <= 1e-3 relative
    for (i, a), (_, b) in zip(got, single):
        assert abs(a - b) <= (1e-6 if i <= 2 else 1e-3) * abs(b), (got, single)
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    r = run(BASE + ["--engine", "deepspeed", "--load", str(ckpt), "--train-iters", "7"], nproc=2)
    assert r.returncode == 0 and "start iteration 6" in r.stdout, r.stderr[-3000:]


def test_mtp_loss_is_logged_with_pipeline_parallel(tmp_path):
    out = tmp_path / "m.jsonl"
    r = run(BASE + ["--mtp-num-layers", "1", "--pipeline-model-parallel-size", "2", "--train-iters", "3",
                    "--metrics-file", str(out)], nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(l) for l in open(out)]
    assert len(rows) == 3 and all(row["mtp_1 loss"] > 0 for row in rows)
    assert rows[-1]["mtp_1 loss"] < rows[0]["mtp_1 loss"]


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_same_shape_baselines_train(attention, tmp_path):
    out = tmp_path / "m.jsonl"
    r = run(["--recipe", "tiny_cpu", "--mock-data", "--train-iters", "4", "--attention", attention,
             "--metrics-file", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"gqla-pretrain: {attention} tiny_cpu" in r.stdout
    rows = losses(out)
    assert len(rows) == 4 and rows[-1][1] < rows[0][1]


def test_finetune_a_converted_checkpoint_with_checkpoint_args(tmp_path):
    """gqla-pretrain --attention gqa -> gqla-convert (lossless: r = all, d_r = head dim) ->
    gqla-pretrain --use-checkpoint-args --load <converted>: the model-only checkpoint loads (fresh
    optimizer, iteration 0), the shape/RoPE/norm settings come from the checkpoint, and the first
    loss equals the GQA source's on the same batch (--finetune of the source, lr 0)."""
    src, conv = tmp_path / "gqa", tmp_path / "gqla"
    r = run(["--recipe", "tiny_cpu", "--mock-data", "--attention", "gqa", "--train-iters", "4",
             "--save", str(src), "--save-interval", "4"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    calib = str(tmp_path / "calib_text_document")
    b = IndexedDatasetBuilder(calib + ".bin", dtype=np.int32)
    for doc in np.random.default_rng(0).integers(0, 256, (4, 40)).astype(np.int32):
        b.add_document(torch.from_numpy(doc), [40])
    b.finalize(calib + ".idx")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "convert_gqla.py"), "gqa-to-gqla", "--load",
                        str(src), "--save", str(conv), "--kv-lora-rank", "none", "--qk-pos-emb-head-dim", "16",
                        "--calib-data", calib, "--calib-samples", "2", "--calib-seq-length", "16", "--no-progress"],
                       capture_output=True, text=True, timeout=600, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    first = {}
    for name, extra in (("source", ["--attention", "gqa", "--load", str(src), "--finetune"]),
                        ("converted", ["--use-checkpoint-args", "--load", str(conv)])):
        m = tmp_path / f"{name}.jsonl"
        r = run(["--recipe", "tiny_cpu", "--mock-data", "--train-iters", "2", "--lr", "0", "--min-lr", "0",
                 "--lr-warmup-iters", "0", "--metrics-file", str(m), *extra])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert "start fresh at iteration 0" in r.stdout
        first[name] = losses(m)[0]
    assert first["source"][0] == first["converted"][0] == 1
    assert abs(first["source"][1] - first["converted"][1]) < 1e-4 * abs(first["source"][1]), first
