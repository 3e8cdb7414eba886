"""What a nanochat shard is: a parquet file whose `text` column holds strings of valid UTF-8.

One check for the download stage (bytes that arrive are verified before they get a final name) and
for the stages that read shards (tokenizer, pretokenize), so that all of them refuse the same files
for the same reasons.
"""

import pyarrow as pa
import pyarrow.parquet as pq


class ShardProblem(ValueError):
    """Why a file is not a nanochat shard; each caller adds the file and the fix that suits it."""


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def open_shard(path):
    """The shard as a pq.ParquetFile whose schema has a string `text` column."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for bytes that are not parquet
        raise ShardProblem(f"not a parquet file ({e})") from e
    names = pf.schema_arrow.names
    if "text" not in names:
        raise ShardProblem(f"no 'text' column (columns: {', '.join(names) or 'none'})")
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ShardProblem(f"the 'text' column holds {kind}, not strings")
    return pf


def text_groups(pf):
    """The `text` column of each row group of an opened shard, in order, each checked to be UTF-8."""
    for i in range(pf.num_row_groups):
        try:
            column = pf.read_row_group(i, columns=["text"]).column("text")
        except Exception as e:  # a body cut inside a row group, a bad page: pyarrow's words say which
            raise ShardProblem(f"row group {i} cannot be read ({e})") from e
        try:  # a plain read lets invalid UTF-8 through; only full validation looks at every byte
            column.validate(full=True)
        except pa.ArrowInvalid as e:
            raise ShardProblem(f"row group {i} of 'text' is not valid UTF-8 ({e})") from e
        yield column


def check(path):
    """Read every row group of a shard; what we learnt about it, or ShardProblem."""
    pf = open_shard(path)
    for _ in text_groups(pf):
        pass
    return {"num_rows": pf.metadata.num_rows, "num_row_groups": pf.num_row_groups}
