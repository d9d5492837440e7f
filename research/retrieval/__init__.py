"""First-stage retrieval and re-ranking: BM25, dense (faiss) search, fusion, hard-negative mining."""
