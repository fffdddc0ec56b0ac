"""Bucketing: examples padded to a few sequence lengths, so training compiles a bounded set of shapes.

A micro-batch holds `batch_size` rows of one bucket (T = a power of two from 16 up to max_seq_len, or
max_seq_len itself), and R loss positions per row, R being the longest response of the whole data set
rounded up to a multiple of 8: the shapes compiled are at most one per bucket. Rows a bucket lacks are
padding with no loss weight. The order of micro-batches is a function of the seed and the epoch only,
so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np

from jalora.train.data import Example
from jalora.train.forward import Batch

MIN_BUCKET = 16


def bucket_lengths(max_seq_len: int) -> list[int]:
    out, t = [], MIN_BUCKET
    while t < max_seq_len:
        out.append(t)
        t *= 2
    return out + [max_seq_len]


def bucket_of(length: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= length)


def response_slots(examples: list[Example]) -> int:
    longest = max(len(e.ids) - e.response_start for e in examples)
    return 8 * math.ceil(longest / 8)


def epoch_batches(examples: list[Example], buckets: list[int], batch_size: int, seed: int, epoch: int):
    """[(bucket T, example indices)] of one epoch: shuffled within buckets, batches shuffled."""
    rng = np.random.default_rng([seed, epoch])
    by_bucket: dict[int, list[int]] = {}
    for i in rng.permutation(len(examples)):
        by_bucket.setdefault(bucket_of(len(examples[i].ids), buckets), []).append(int(i))
    batches = [(t, idx[k : k + batch_size]) for t, idx in sorted(by_bucket.items())
               for k in range(0, len(idx), batch_size)]  # fmt: skip
    return [batches[j] for j in rng.permutation(len(batches))]


def eval_batches(examples: list[Example], buckets: list[int], batch_size: int):
    """[(bucket T, example indices)] in data order within each bucket."""
    by_bucket: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_bucket.setdefault(bucket_of(len(e.ids), buckets), []).append(i)
    return [(t, idx[k : k + batch_size]) for t, idx in sorted(by_bucket.items())
            for k in range(0, len(idx), batch_size)]  # fmt: skip


def make_batch(examples: list[Example], indices: list[int], t: int, rows: int, r: int) -> Batch:
    """Numpy arrays of one micro-batch: `indices` padded to `rows` rows of `t` tokens, `r` loss slots."""
    ids = np.zeros((rows, t), np.int32)
    pos = np.zeros((rows, t), np.int32)
    adapted = np.zeros((rows, t), bool)
    label_pos = np.zeros((rows, r), np.int32)
    labels = np.zeros((rows, r), np.int32)
    weights = np.zeros((rows, r), np.float32)
    content = np.zeros((rows, r), np.float32)
    for row, i in enumerate(indices):
        e = examples[i]
        n = len(e.ids)
        ids[row, :n] = e.ids
        pos[row, :n] = np.arange(n)
        adapted[row, e.activation : n] = True
        k = n - e.response_start
        label_pos[row, :k] = np.arange(e.response_start - 1, n - 1)
        labels[row, :k] = e.ids[e.response_start :]
        weights[row, :k] = 1.0
        content[row, : e.content_end - e.response_start] = 1.0
    return Batch(ids, pos, adapted, label_pos, labels, weights, content)


def num_tokens(examples: list[Example], indices: list[int]) -> int:
    return sum(len(examples[i].ids) for i in indices)
