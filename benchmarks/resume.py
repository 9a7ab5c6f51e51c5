"""Resuming on an ActivationBuffer: the cost of getting back to step n by `skip(n)` (tokenize the
texts already used, replay the bookkeeping on row labels, rerun the model only for the rows still
held) against reading the n batches again (what a resume cost before: the model over all of them).

    python benchmarks/resume.py [--quick] [--threads 1] [--out results/resume.json]

Bundled tiny-pythia, its MLP 1 output, ctx_len 128, 32 texts per forward pass, a buffer of 256
contexts (32,768 rows) serving batches of 2,048. For each n: seconds until batch n + 1 is in hand
(buffer built, first batch after the skip served), the texts the model ran on, and whether batch
n + 1 is bit-identical both ways.
"""
from __future__ import annotations

import itertools
import time

import torch

import _common

SITE = "gpt_neox.layers.1.mlp"


def main() -> None:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="the steps n to resume at (default 64 256 1024)")
    args = parser.parse_args()
    _common.set_threads(args.threads)
    _common.import_library()
    from dictionary_learning import ActivationBuffer, bundled

    model = bundled.load_bundled_model()
    n_values = args.batches or ([8, 32] if args.quick else [64, 256, 1024])
    texts = list(itertools.islice(bundled.stdlib_text_stream(split="train"), 20000))

    class Counted:  # the buffer's site reader, counting the texts the model runs on
        def __init__(self, reader):
            self.reader, self.texts_run = reader, 0

        def __getattr__(self, name):
            return getattr(self.reader, name)

        def __call__(self, encoding):
            self.texts_run += len(encoding["input_ids"])
            return self.reader(encoding)

    def buffer():
        built = ActivationBuffer(iter(texts), model, SITE, n_ctxs=256, ctx_len=128, refresh_batch_size=32,
                                 out_batch_size=2048, seed=args.seed, progress=False)
        built.reader = Counted(built.reader)
        return built

    rows = []
    for n in n_values:
        start = time.perf_counter()
        replayed = buffer()
        for _ in range(n):
            next(replayed)
        by_reading = next(replayed)
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        skipped = buffer()
        skipped.skip(n)
        by_skipping = next(skipped)
        skip_s = time.perf_counter() - start
        rows.append({"n": n, "rows": n * 2048, "read s": read_s, "skip s": skip_s, "read / skip": read_s / skip_s,
                     "texts run, read": replayed.reader.texts_run, "texts run, skip": skipped.reader.texts_run,
                     "same batch": bool(torch.equal(by_reading, by_skipping))})
        print(f"n={n}: read {read_s:.1f} s, skip {skip_s:.1f} s", flush=True)
    text = _common.print_table(rows, list(rows[0]), title=(
        f"resuming an ActivationBuffer at batch n ({args.threads} threads, wall clock; bundled model, {SITE}, "
        "buffer 32,768 rows, batches of 2,048)"))
    _common.write_json(args.out, {"benchmark": "resume", "machine": _common.machine_info(args.threads, "wall"),
                                  "rows": rows, "table_text": text})


if __name__ == "__main__":
    main()
