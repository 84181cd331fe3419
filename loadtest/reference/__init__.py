"""The reference server: the Channels tutorial chat, unchanged, for `loadtest/bench.py` to compare against."""
