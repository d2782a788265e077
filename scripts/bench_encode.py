"""Load + encode throughput: charlm's numpy lookup against HuggingFace tokenizers.

    python scripts/bench_encode.py corpora/tinyshakespeare.txt
    python scripts/bench_encode.py corpora/timemachine.txt --repeats 3
"""

from __future__ import annotations

import argparse
import time

from charlm.corpus import ensure_corpus, load_corpus


def main(argv=None) -> dict:
    """Print the three rates (MB/s); return them."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="?", default="corpora/tinyshakespeare.txt", help="a UTF-8 text file")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (the best is reported)")
    args = ap.parse_args(argv)
    path = ensure_corpus(args.corpus)
    size_mb = path.stat().st_size / 1e6
    best = min(_timed(lambda: load_corpus(path)) for _ in range(args.repeats))
    corpus = load_corpus(path)
    encode = min(_timed(lambda: corpus.vocab.encode(corpus.text)) for _ in range(args.repeats))
    tok = corpus.vocab.to_tokenizer()
    t_tok = _timed(lambda: tok.encode(corpus.text))
    assert tok.encode(corpus.text).ids == corpus.ids.tolist()
    rates = {"load_corpus": size_mb / best, "encode": size_mb / encode, "tokenizers": size_mb / t_tok}
    print(f"{path}: {size_mb:.2f} MB, {len(corpus):,} chars")
    print(f"load_corpus (read + normalise + vocab + encode): {rates['load_corpus']:,.0f} MB/s")
    print(f"Vocab.encode alone (numpy lookup):               {rates['encode']:,.0f} MB/s")
    print(f"tokenizers Tokenizer.encode (same ids):          {rates['tokenizers']:,.1f} MB/s")
    return rates


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
