"""gqla-preprocess: tokenize raw text or jsonl into a Megatron indexed dataset (.bin + .idx).

    gqla-preprocess --input /usr/share/doc/python3.11/html/_sources --pattern '*.rst.txt' \\
        --tokenizer tokenizer.json --output-prefix data/pydocs_text_document
    gqla-preprocess --input corpus.jsonl --json-key text --tokenizer tokenizer.json --output-prefix data/corpus

Every document is followed by the end-of-document token (``--eod-token``, default the
tokenizer's ``<|endoftext|>`` or ``</s>``). Files are written to temporary names and renamed
when complete; an existing output is never overwritten unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Iterator, List

import numpy


def iter_documents(paths: List[str], json_key: str) -> Iterator[str]:
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            text = json.loads(line)[json_key]
                        except (json.JSONDecodeError, KeyError) as e:
                            raise ValueError(f"{path}:{n}: not a JSON object with key {json_key!r} ({e})")
                        yield text
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


def resolve_inputs(inputs: List[str], pattern: str) -> List[str]:
    files = []
    for item in inputs:
        if os.path.isdir(item):
            files += sorted(glob.glob(os.path.join(item, "**", pattern), recursive=True))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise ValueError(f"--input {item}: no such file or directory")
    if not files:
        raise ValueError(f"--input {inputs}: no files matching {pattern!r}")
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gqla-preprocess", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files or directories")
    p.add_argument("--pattern", default="*.txt", help="glob for files inside --input directories")
    p.add_argument("--json-key", default="text", help="key of the text in .jsonl inputs")
    p.add_argument("--tokenizer", required=True, help="HF tokenizers tokenizer.json")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--eod-token", default=None, help="end-of-document token (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer
    from tqdm import tqdm

    files = resolve_inputs(args.input, args.pattern)
    if not os.path.isfile(args.tokenizer):
        raise ValueError(f"--tokenizer {args.tokenizer}: no such file")
    tok = Tokenizer.from_file(args.tokenizer)
    eod_name = args.eod_token
    if eod_name is None:
        eod_name = next((t for t in ("<|endoftext|>", "</s>", "<eos>") if tok.token_to_id(t) is not None), None)
    eod = tok.token_to_id(eod_name) if eod_name else None
    if eod is None:
        raise ValueError(f"--eod-token: {eod_name!r} is not in the tokenizer's vocabulary")
    out_bin, out_idx = args.output_prefix + ".bin", args.output_prefix + ".idx"
    for path in (out_bin, out_idx):
        if os.path.exists(path) and not args.overwrite:
            raise ValueError(f"--output-prefix: {path} exists (pass --overwrite to replace it)")
    os.makedirs(os.path.dirname(os.path.abspath(out_bin)), exist_ok=True)
    dtype = numpy.uint16 if tok.get_vocab_size() <= 65536 else numpy.int32
    tmp_bin, tmp_idx = out_bin + ".tmp", out_idx + ".tmp"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    n_docs = n_tokens = 0
    for text in tqdm(iter_documents(files, args.json_key), desc="tokenizing", unit="doc",
                     total=len(files) if not files[0].endswith(".jsonl") else None):
        ids = tok.encode(text).ids + [eod]
        builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
        n_docs += 1
        n_tokens += len(ids)
    builder.finalize(tmp_idx)
    os.replace(tmp_bin, out_bin)
    os.replace(tmp_idx, out_idx)
    print(f"wrote {out_bin} / .idx: {n_docs} documents, {n_tokens} tokens, vocab {tok.get_vocab_size()}, "
          f"eod {eod_name}={eod}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
