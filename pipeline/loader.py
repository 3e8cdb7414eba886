"""Training batches from token shards: BOS-aligned rows, best-fit packed, split over DDP ranks.

Documents stream in shard order, epoch after epoch. Rows of `seq_len + 1` tokens are packed as
nanochat's BOS-aligned best-fit loader does: keep at least `buffer_size` documents buffered, topped up
128 documents at a time (nanochat tokenizes a row group in batches of 128); fill a row with the largest
buffered document that still fits (the earliest buffered of equal ones), again and again; when none
fits, crop the shortest one (the earliest of equal ones) to fill the row exactly (the cropped tail is
dropped). Every row starts with <|bos|> and has no padding. On one process this gives nanochat's very
rows, whenever a shard's row groups (all but its last) hold multiples of 128 documents, as nanochat's
shards do (1024) and the webtext fixture's (256).

Packing is global and runs on document lengths only, so every rank computes the same sequence of
rows cheaply; micro-batches of `batch_size` rows are dealt to ranks in turn (micro-batch m goes to
rank m % world) and a rank reads tokens only for its own rows. A training step that takes
`grad_accum` micro-batches per rank therefore sees the same rows whatever the world size, and the
loader's state, saved after any call, resumes on any world size that divides the rounds evenly.
"""

import bisect
import json
from pathlib import Path

import numpy as np

from pipeline.errors import StageError


class TokenShards:
    """The token shards of pretokenize blocks, as one ordered list of shards (memory-mapped lazily)."""

    def __init__(self, block_dirs):
        self.paths, self.num_docs = [], []
        bos = set()
        for d in map(Path, block_dirs):
            try:
                index = json.loads((d / "index.json").read_text())
            except OSError as e:
                raise StageError(f"{d}: no index.json; is it a finished pretokenize directory?") from e
            bos.add(index["bos"])
            for shard in index["shards"]:
                self.paths.append(d / shard["name"])
                self.num_docs.append(shard["documents"])
        if len(bos) > 1:
            raise StageError(f"token shards from different tokenizers (bos ids {sorted(bos)}) in {block_dirs}")
        if not self.paths or sum(self.num_docs) == 0:
            raise StageError(f"no documents in the token shards of {', '.join(map(str, block_dirs))}")
        self.bos = bos.pop()
        self._open = {}

    def offsets(self, shard):
        return self._load(shard)[1]

    def doc(self, shard, doc):
        tokens, offsets = self._load(shard)
        return tokens[offsets[doc]:offsets[doc + 1]]

    def _load(self, shard):
        if shard not in self._open:
            if len(self._open) > 8:  # keep a handful of shards mapped, not all 370
                self._open.pop(next(iter(self._open)))
            p = self.paths[shard]
            self._open[shard] = (np.load(f"{p}.tokens.npy", mmap_mode="r"), np.load(f"{p}.docs.npy"))
        return self._open[shard]


REFILL = 128  # documents per top-up of the best-fit buffer, counted from the start of each shard


class DocStream:
    """(length, shard, doc) of every document in order, epoch after epoch (forever unless `epochs`
    is given); the position counts epochs from 1."""

    def __init__(self, shards, position=(1, 0, 0), epochs=None):
        self.shards = shards
        self.epoch, self.shard, self.doc = position
        self.last_epoch = None if epochs is None else self.epoch + epochs - 1
        self._lengths = None

    def position(self):
        return [self.epoch, self.shard, self.doc]

    def __iter__(self):
        return self

    def chunk(self):
        """The next documents up to the next multiple of REFILL within the shard (or its end)."""
        first = next(self)
        out = [first]
        while self.doc % REFILL and self.doc < self.shards.num_docs[self.shard]:
            out.append(next(self))
        return out

    def __next__(self):
        while self.doc >= self.shards.num_docs[self.shard]:
            self.shard, self.doc, self._lengths = self.shard + 1, 0, None
            if self.shard == len(self.shards.paths):
                self.epoch, self.shard = self.epoch + 1, 0
        if self.last_epoch is not None and self.epoch > self.last_epoch:
            raise StopIteration
        if self._lengths is None:
            self._lengths = np.diff(self.shards.offsets(self.shard))
        item = (int(self._lengths[self.doc]), self.shard, self.doc)
        self.doc += 1
        return item


class BestFitPacker:
    """Rows as lists of (shard, doc, ntokens) segments, each taking a document's first ntokens."""

    def __init__(self, stream, capacity, buffer_size=1000, buffer=()):
        self.stream, self.capacity, self.buffer_size = stream, capacity, buffer_size
        self.lengths, self.docs = [], []  # sorted by length; docs[i] = (shard, doc) of lengths[i]
        for length, shard, doc in buffer:
            self._push(length, (shard, doc))

    def _push(self, length, doc):
        i = bisect.bisect_right(self.lengths, length)
        self.lengths.insert(i, length)
        self.docs.insert(i, doc)

    def _pop(self, i):
        return self.lengths.pop(i), self.docs.pop(i)

    def buffer(self):
        return [[n, *d] for n, d in zip(self.lengths, self.docs, strict=True)]

    def next_row(self):
        """The next row; at the end of a finite stream the last row may be short, then StopIteration."""
        row, room = [], self.capacity
        while room:
            while len(self.lengths) < self.buffer_size:
                try:
                    chunk = self.stream.chunk()
                except StopIteration:
                    break
                for length, shard, doc in chunk:
                    self._push(length, (shard, doc))
            if not self.lengths:  # a finite stream ran dry
                if row:
                    return row
                raise StopIteration
            i = bisect.bisect_right(self.lengths, room) - 1
            if i >= 0:  # the largest document that fits whole, the earliest buffered of that length
                length, doc = self._pop(bisect.bisect_left(self.lengths, self.lengths[i]))
                row.append((*doc, length))
                room -= length
            else:       # nothing fits: crop the shortest to fill the row
                _, doc = self._pop(0)
                row.append((*doc, room))
                room = 0
        return row


class DistributedLoader:
    """Yields (inputs, targets) int64 arrays of shape (batch_size, seq_len) for one rank.

    With `epochs` (e.g. 1 for a validation pass) the stream ends; the last micro-batch is padded
    with <|bos|> inputs and -1 targets (ignored by the loss), then StopIteration.
    """

    def __init__(self, block_dirs, batch_size, seq_len, rank=0, world_size=1, buffer_size=1000, state=None,
                 epochs=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.shards = TokenShards(block_dirs)
        self.batch_size, self.seq_len, self.rank, self.world = batch_size, seq_len, rank, world_size
        state = state or {}
        self.stream = DocStream(self.shards, tuple(state.get("position", (1, 0, 0))), epochs)
        self.packer = BestFitPacker(self.stream, seq_len + 1, buffer_size, state.get("buffer", ()))
        self.micro_batches = state.get("micro_batches", 0)  # global count dealt so far, all ranks
        self.cropped_tokens = self.used_tokens = 0
        self.last_rows = []  # this rank's rows of the last batch, as (shard, doc, ntokens) segments

    def state_dict(self):
        """Where the global row sequence stands; identical on every rank after the same step."""
        return {"position": self.stream.position(), "buffer": self.packer.buffer(),
                "micro_batches": self.micro_batches}

    def _materialize(self, row):
        out = np.full(self.seq_len + 1, self.shards.bos, dtype=np.int64)
        at = 0
        for shard, doc, n in row:
            tokens = self.shards.doc(shard, doc)
            out[at:at + n] = tokens[:n]
            at += n
            self.cropped_tokens += len(tokens) - n
            self.used_tokens += n
        return out, at

    def _rows(self):
        rows = []
        for _ in range(self.batch_size):
            try:
                rows.append(self.packer.next_row())
            except StopIteration:
                break
        return rows

    def next_batch(self):
        """This rank's next micro-batch. Each call packs one round of `world` micro-batches, so all
        ranks stand at the same place in the row sequence after every call."""
        mine = None
        for owner in range(self.world):
            rows = self._rows()
            if owner == self.rank:  # other ranks' rows are packed (lengths only) but never read
                mine = rows
        self.micro_batches += self.world
        if not mine:
            raise StopIteration
        self.last_rows = mine
        batch = np.full((self.batch_size, self.seq_len + 1), self.shards.bos, dtype=np.int64)
        targets_end = np.zeros(self.batch_size, dtype=np.int64)
        for i, row in enumerate(mine):
            batch[i], targets_end[i] = self._materialize(row)
        inputs, targets = batch[:, :-1], batch[:, 1:].copy()
        # positions past a short row's end (only at the end of a finite stream) are not trained on
        targets[np.arange(self.seq_len)[None, :] >= targets_end[:, None] - 1] = -1
        return inputs, targets

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()
