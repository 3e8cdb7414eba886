"""nanochat's time-to-GPT-2 leaderboard as a hash-addressed pipeline.

One module per stage (download, tokenizer, pretokenize, ...), each with a CLI; `plan` is the only
place that computes store keys; `store` writes outputs atomically and seals them with a manifest.
"""
