"""Tiny-model and tiny-dataset factories for the test suite (importable as ``from helpers import ...``).

Everything here is built from scratch in a temporary folder: a randomly initialised 2-layer BERT with a
WordPiece vocabulary of a few dozen words, and a BEIR-format dataset whose queries share topic words with
their relevant documents (so a few training steps can make progress and BM25 finds the right documents).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
COMMON_WORDS = ["the", "a", "of", "and", "is", "about", "what", "how", "new", "study", "report", "query", "passage"]
TOPICS: dict[str, list[str]] = {
    "space": ["rocket", "orbit", "planet", "star", "moon", "launch", "galaxy", "comet"],
    "food": ["bread", "cheese", "apple", "soup", "bake", "kitchen", "recipe", "sugar"],
    "music": ["guitar", "piano", "song", "melody", "drum", "concert", "violin", "chord"],
    "sport": ["football", "goal", "team", "match", "runner", "tennis", "coach", "score"],
    "ocean": ["whale", "coral", "reef", "tide", "shark", "wave", "salt", "fish"],
    "medicine": ["virus", "vaccine", "cell", "gene", "doctor", "fever", "drug", "blood"],
}
VOCAB: list[str] = SPECIAL_TOKENS + COMMON_WORDS + [w for words in TOPICS.values() for w in words] + ["##s", "##ing"]

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128)


def write_vocab(directory: str | Path, vocab: list[str] = VOCAB) -> Path:
    path = Path(directory) / "vocab.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


def tiny_tokenizer(directory: str | Path):
    """A ``BertTokenizerFast`` over :data:`VOCAB` (lower-casing), its vocab.txt written into ``directory``."""
    from transformers import BertTokenizerFast

    # from_pretrained over a folder holding vocab.txt: transformers 5 ignores the ``vocab_file=`` argument of 4.x
    tokenizer = BertTokenizerFast.from_pretrained(str(write_vocab(directory).parent), do_lower_case=True)
    assert tokenizer.convert_tokens_to_ids("rocket") == VOCAB.index("rocket"), "tiny vocabulary not loaded"
    return tokenizer


def tiny_bert(seed: int = 0, with_pooler: bool = True):
    """A randomly initialised 2-layer BERT (hidden 32) over :data:`VOCAB`; seeded, so two calls give equal weights."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(VOCAB), **TINY_BERT)
    return BertModel(config, add_pooling_layer=with_pooler).eval()


def make_tiny_model_dir(directory: str | Path, seed: int = 0) -> Path:
    """A plain Hugging Face model directory (config, weights with BERT's pooler, tokenizer), as a hub snapshot has."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(directory)
    tokenizer.save_pretrained(directory)
    tiny_bert(seed).save_pretrained(directory)
    return directory


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_qrels(path: str | Path, rows: list[tuple[str, str, int]], header: bool = True, newline: str = "\n") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + [f"{q}\t{d}\t{s}" for q, d, s in rows]
    path.write_bytes((newline.join(lines) + newline).encode("utf-8"))
    return path


def make_tiny_beir(
    directory: str | Path, docs_per_topic: int = 6, train_queries_per_topic: int = 4, test_queries_per_topic: int = 2,
    seed: int = 0,
) -> Path:
    """A BEIR folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/train.tsv`` and ``qrels/test.tsv`` (graded).

    Document ``d<t>_<i>`` of topic ``t`` has a title and a text drawn from the topic's words (documents differ in
    length); query ``<split>_q<t>_<j>`` uses words of its relevant documents, which are two documents of its topic
    (test: one with grade 2, one with grade 1). One query per split has no qrels row, and one document has no title.
    """
    rng = random.Random(seed)
    directory = Path(directory)
    corpus, queries = [], []
    topic_docs: dict[str, list[tuple[str, list[str]]]] = {}
    for topic, words in TOPICS.items():
        for i in range(docs_per_topic):
            doc_id = f"d_{topic}_{i}"
            body = [rng.choice(words) for _ in range(3 + (i * 3) % 11)] + rng.sample(COMMON_WORDS, 2)
            rng.shuffle(body)
            title = "" if (topic == "ocean" and i == 0) else " ".join(rng.sample(words, 2))
            corpus.append({"_id": doc_id, "title": title, "text": " ".join(body), "metadata": {}})
            topic_docs.setdefault(topic, []).append((doc_id, body))
    qrels: dict[str, list[tuple[str, str, int]]] = {"train": [], "test": []}
    for split, count in (("train", train_queries_per_topic), ("test", test_queries_per_topic)):
        for topic, words in TOPICS.items():
            for j in range(count):
                query_id = f"{split}_q_{topic}_{j}"
                relevant = rng.sample(topic_docs[topic], 2)
                terms = [w for w in relevant[0][1] if w in words][:3] + [rng.choice(words)]
                queries.append({"_id": query_id, "text": "what " + " ".join(terms), "metadata": {}})
                for rank, (doc_id, _) in enumerate(relevant):
                    qrels[split].append((query_id, doc_id, (2 - rank) if split == "test" else 1))
        queries.append({"_id": f"{split}_unjudged", "text": "what about the new study", "metadata": {}})
    write_jsonl(directory / "corpus.jsonl", corpus)
    write_jsonl(directory / "queries.jsonl", queries)
    for split, rows in qrels.items():
        write_qrels(directory / "qrels" / f"{split}.tsv", rows)
    return directory
