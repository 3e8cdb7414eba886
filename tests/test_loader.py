import collections

import numpy as np
import pytest

from pipeline.loader import REFILL, BestFitPacker, DistributedLoader, DocStream, TokenShards


class Docs:
    """A stream of (length, shard, doc) handed out `per_chunk` at a time, as DocStream.chunk does."""

    def __init__(self, lengths, per_chunk=1):
        self.docs = iter([(n, 0, i) for i, n in enumerate(lengths)])
        self.per_chunk, self.chunks = per_chunk, 0

    def chunk(self):
        out = [doc for _, doc in zip(range(self.per_chunk), self.docs, strict=False)]
        if not out:
            raise StopIteration
        self.chunks += 1
        return out


def one_epoch(blocks, world, batch=4, seq_len=128, buffer_size=64):
    """Per rank, the (shard, doc, ntokens) segments of every row it got in one epoch."""
    seen = {}
    for rank in range(world):
        loader = DistributedLoader(blocks, batch, seq_len, rank, world, buffer_size, epochs=1)
        seen[rank] = []
        for inputs, targets in loader:
            assert inputs.shape == targets.shape == (batch, seq_len)
            seen[rank] += loader.last_rows
    return seen


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_document_is_seen_once_per_epoch_across_ranks(smoke_data, world):
    blocks = smoke_data["blocks"][:1]
    shards = TokenShards(blocks)
    seen = one_epoch(blocks, world)
    starts = collections.Counter((s, d) for rows in seen.values() for row in rows for s, d, _ in row)
    expected = {(s, d) for s, n in enumerate(shards.num_docs) for d in range(n)}
    assert set(starts) == expected            # nothing lost, at shard ends or anywhere
    assert max(starts.values()) == 1          # and nothing twice
    # the ranks' rows are disjoint
    rank_docs = [{(s, d) for row in rows for s, d, _ in row} for rows in seen.values()]
    assert sum(map(len, rank_docs)) == len(set().union(*rank_docs))


def test_rows_are_bos_aligned_and_targets_shift_inputs(smoke_data):
    loader = DistributedLoader(smoke_data["blocks"][:1], 8, 256)
    bos = loader.shards.bos
    for _ in range(20):
        inputs, targets = next(loader)
        assert (inputs[:, 0] == bos).all()
        assert (inputs[:, 1:] == targets[:, :-1]).all()
        for i, segments in enumerate(loader.last_rows):
            row = np.concatenate([inputs[i], targets[i, -1:]])
            starts = np.cumsum([0] + [n for _, _, n in segments])[:-1]
            assert (row[starts] == bos).all()   # every packed document begins with its BOS
            assert sum(n for _, _, n in segments) == 257  # full: no padding while training


def test_rows_match_document_tokens(smoke_data):
    loader = DistributedLoader(smoke_data["blocks"][:1], 2, 64)
    inputs, targets = next(loader)
    row = np.concatenate([inputs[0], targets[0, -1:]])
    at = 0
    for shard, doc, n in loader.last_rows[0]:
        assert (row[at:at + n] == loader.shards.doc(shard, doc)[:n]).all()
        at += n


def test_best_fit_takes_the_largest_that_fits_then_crops_the_shortest():
    packer = BestFitPacker(Docs([5, 3, 9, 2]), capacity=8, buffer_size=4)
    # fits: 5 (largest <= 8), then 3 (largest <= 3) -> full
    assert packer.next_row() == [(0, 0, 5), (0, 1, 3)]
    # left: 9, 2. 9 does not fit, 2 does; then nothing fits 6 -> crop the shortest left (9) to 6
    assert packer.next_row() == [(0, 3, 2), (0, 2, 6)]
    with pytest.raises(StopIteration):
        packer.next_row()


def test_equal_lengths_go_in_the_order_they_came_as_in_nanochat():
    """nanochat scans its buffer (a list in arrival order) for the largest document that fits, keeping the
    first of equal ones, and crops the first of the shortest: so do we, which makes our rows its rows."""
    packer = BestFitPacker(Docs([3, 5, 3, 5, 9, 9]), capacity=8, buffer_size=6)
    assert packer.next_row() == [(0, 1, 5), (0, 0, 3)]  # the first 5, then the first 3
    assert packer.next_row() == [(0, 3, 5), (0, 2, 3)]
    assert packer.next_row() == [(0, 4, 8)]  # nothing fits whole: the first of the two 9s is cropped
    assert packer.next_row() == [(0, 5, 8)]


def test_the_buffer_is_topped_up_a_chunk_at_a_time(smoke_data):
    """nanochat tokenizes each row group 128 documents at a time and tops its buffer up with whole batches:
    a shard's documents come in chunks that end at multiples of 128 or at the shard's end."""
    shards = TokenShards(smoke_data["blocks"][:1])
    stream = DocStream(shards)
    sizes = [[len(stream.chunk()) for _ in range(-(-n // REFILL))] for n in shards.num_docs]
    for n, chunks in zip(shards.num_docs, sizes, strict=True):
        assert chunks == [REFILL] * (n // REFILL) + ([n % REFILL] if n % REFILL else [])
    docs = Docs(range(1, 2000), per_chunk=REFILL)
    packer = BestFitPacker(docs, capacity=2048, buffer_size=1000)
    packer.next_row()
    assert docs.chunks == 8  # 8 x 128 = 1024 >= 1000: the buffer holds whole chunks, not exactly 1000


def test_same_rows_whatever_the_world_size(smoke_data):
    """Step by step, world 2 with 2 micro-batches each sees the rows world 1 sees in 4."""
    blocks = smoke_data["blocks"][:1]
    single = DistributedLoader(blocks, 4, 128, 0, 1)
    pair = [DistributedLoader(blocks, 4, 128, r, 2) for r in range(2)]
    for _ in range(10):  # steps
        rows_1 = [next(single)[0] for _ in range(4)]
        rows_2 = [next(pair[r])[0] for _ in range(2) for r in range(2)]
        assert sorted(map(bytes, np.concatenate(rows_1))) == sorted(map(bytes, np.concatenate(rows_2)))
        assert pair[0].state_dict() == pair[1].state_dict() == single.state_dict()


def test_state_restores_the_exact_continuation_even_on_another_world_size(smoke_data):
    blocks = smoke_data["blocks"][:1]
    straight = DistributedLoader(blocks, 4, 128)
    for _ in range(30):
        next(straight)
    state = straight.state_dict()
    expected = [next(straight)[0] for _ in range(6)]

    resumed = DistributedLoader(blocks, 4, 128, state=state)
    assert all((next(resumed)[0] == e).all() for e in expected)
    # resumed on 2 ranks: micro-batches alternate between them
    halves = [DistributedLoader(blocks, 4, 128, r, 2, state=state) for r in range(2)]
    for i, e in enumerate(expected):
        assert (next(halves[i % 2])[0] == e).all()


def test_epochs_continue_forever_when_training(smoke_data):
    loader = DistributedLoader(smoke_data["blocks"][-1:], 8, 512)  # the small validation block
    for _ in range(300):
        next(loader)
    assert loader.state_dict()["position"][0] >= 2


def test_end_of_a_finite_pass_is_padded_with_ignored_targets(smoke_data):
    loader = DistributedLoader(smoke_data["blocks"][-1:], 16, 512, epochs=1, buffer_size=8)
    trained, real = 0, 0
    for _, targets in loader:
        trained += int((targets != -1).sum())
        real += sum(sum(n for _, _, n in row) - 1 for row in loader.last_rows)
    assert (targets == -1).any()     # the last micro-batch is not full
    assert trained == real           # exactly the real tokens are trained on, the padding never
