"""Load + encode throughput: charlm's numpy lookup against HuggingFace tokenizers.

    python scripts/bench_encode.py corpora/tinyshakespeare.txt
"""

import sys
import time

from charlm.corpus import ensure_corpus, load_corpus


def main(path="corpora/tinyshakespeare.txt", repeats=5):
    path = ensure_corpus(path)
    size_mb = path.stat().st_size / 1e6
    best = min(_timed(lambda: load_corpus(path)) for _ in range(repeats))
    corpus = load_corpus(path)
    encode = min(_timed(lambda: corpus.vocab.encode(corpus.text)) for _ in range(repeats))
    tok = corpus.vocab.to_tokenizer()
    t_tok = _timed(lambda: tok.encode(corpus.text))
    assert tok.encode(corpus.text).ids == corpus.ids.tolist()
    print(f"{path}: {size_mb:.2f} MB, {len(corpus):,} chars")
    print(f"load_corpus (read + normalise + vocab + encode): {size_mb / best:,.0f} MB/s")
    print(f"Vocab.encode alone (numpy lookup):               {size_mb / encode:,.0f} MB/s")
    print(f"tokenizers Tokenizer.encode (same ids):          {size_mb / t_tok:,.1f} MB/s")


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main(*sys.argv[1:])
