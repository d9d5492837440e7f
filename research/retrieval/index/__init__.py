"""Sharded corpus indexes: the manifest, shard files and their checks, the shard-by-shard encoding plan, and search
over shards (exact top-k merged across shards, or a faiss index built from a factory string and saved beside them)."""
