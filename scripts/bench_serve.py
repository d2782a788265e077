"""charlm serve under concurrent clients: aggregate characters per second and time to the first
character with 1, 2, 4, 8 and 16 clients streaming at once, against ``charlm.generate`` in-process.

The server runs as its own process (``python -m charlm serve``) on a free loopback port; each
client is a thread streaming ``POST /generate`` (SSE) with its own seed. The in-process rows run in
this process while the server idles: one stream (``charlm.generate``), and for each client count N
the same N continuations in one call (``num_samples=N``: what one process does with the batch).
Rounds interleave the client counts and the in-process figures; each figure is the median over the
rounds, and each server row is also given as a share of the in-process batch of the same size. The
texts of the first round are checked against ``charlm.generate`` with the same seeds (equal, or
parted first at a near-tie: a batch's products may differ from one sequence's in the last bits).

    python scripts/bench_serve.py --checkpoint checkpoints/timemachine --length 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_api(port: int, body: dict) -> tuple[float, float, str]:
    """(seconds to the first text chunk, seconds in all, the text) of one streamed /generate."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/generate", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    buffer, first, texts = b"", None, []
    while True:
        more = response.read1(65536)  # what has arrived (the chunked encoding undone)
        if not more:
            break
        buffer += more
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            payload = json.loads(event.removeprefix(b"data: "))
            if "text" in payload:
                first = first if first is not None else time.perf_counter() - t0
                texts.append(payload["text"])
    total = time.perf_counter() - t0
    conn.close()
    return first, total, "".join(texts)


def in_process(model, vocab, body: dict, num_samples: int = 1) -> tuple[float, str]:
    """(seconds, the first continuation) of ``charlm.generate`` on this process, ``num_samples`` in one batch."""
    from charlm import generate

    t0 = time.perf_counter()
    text = generate(model, vocab, body["prompt"], body["length"], body["temperature"], seed=body["seed"],
                    num_samples=num_samples)
    text = text if num_samples == 1 else text[0]
    return time.perf_counter() - t0, text[len(body["prompt"]):]


def same_or_near_tie(ckpt, body: dict, got: str, want: str) -> str | None:
    """None when ``got`` is ``want`` or parts from it first at a near-tie; else what is wrong."""
    from charlm.sample import tie_margin

    if got == want:
        return None
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if k is None:
        return f"one text is a prefix of the other ({len(got)} and {len(want)} characters)"
    margin = tie_margin(ckpt.model, ckpt.vocab, body["prompt"], want, k, body["temperature"], seed=body["seed"])
    return None if margin < 1e-5 else f"the texts part at character {k}, where the model was not tied ({margin:.1e})"


def clients_round(port: int, body: dict, clients: int, seed0: int) -> dict:
    """``clients`` concurrent streams: aggregate chars/s, p50/p95 time to first character, the texts."""
    results = [None] * clients

    def client(i):
        results[i] = through_api(port, {**body, "seed": seed0 + i})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    firsts = sorted(r[0] for r in results)
    return {"rate": sum(len(r[2]) for r in results) / wall, "p50": _quantile(firsts, 0.5),
            "p95": _quantile(firsts, 0.95), "texts": [r[2] for r in results]}


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile with linear interpolation between the closest ranks."""
    pos = (len(values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/timemachine")
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--clients", default="1,2,4,8,16", help="Client counts, comma-separated.")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]

    from charlm import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "charlm", "serve", args.checkpoint, "--port", str(port),
                               "--slots", str(max(counts)), "--queue-size", str(max(counts))],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    body = {"prompt": "The ", "length": args.length, "temperature": args.temperature}
    runs = {c: [] for c in counts}
    local, batched = [], {c: [] for c in counts}
    try:
        server.stdout.readline()  # "Serving ... at http://..." once it listens
        through_api(port, {**body, "seed": 0})  # warm-up, both sides
        in_process(ckpt.model, ckpt.vocab, {**body, "seed": 0})
        for r in range(args.rounds):
            for c in counts:
                runs[c].append(clients_round(port, body, c, seed0=1000 * r))
                if r == 0:  # each client's text is the one charlm.generate gives with its seed
                    for i, text in enumerate(runs[c][-1]["texts"][:4]):
                        seeded = {**body, "seed": i}
                        wrong = same_or_near_tie(ckpt, seeded, text, in_process(ckpt.model, ckpt.vocab, seeded)[1])
                        assert wrong is None, f"{c} clients: client {i}'s text is not charlm.generate's: {wrong}"
                batched[c].append(in_process(ckpt.model, ckpt.vocab, {**body, "seed": r}, num_samples=c)[0])
            local.append(in_process(ckpt.model, ckpt.vocab, {**body, "seed": r})[0])
    finally:
        server.terminate()
        server.wait(timeout=30)
    in_batch = {c: c * args.length / statistics.median(batched[c]) for c in counts}
    return report(args, ckpt, counts, runs, args.length / statistics.median(local), in_batch)


def report(args, ckpt, counts, runs, rate_local, in_batch) -> dict:
    med = lambda c, key: statistics.median(x[key] for x in runs[c])  # noqa: E731
    one = med(counts[0], "rate")
    print(f"{args.checkpoint}: {ckpt.config.num_layers} x {ckpt.config.cell} {ckpt.config.hidden_size}, "
          f"{args.length:,} characters per client at temperature {args.temperature}, streamed; "
          f"median of {args.rounds} interleaved rounds\n")
    print("| clients | characters/s (all clients) | vs 1 client | in-process batch of as many | server / in-process "
          "| first character p50 | p95 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    out = {"rate_local": rate_local, "clients": {}}
    for c in counts:
        rate, p50, p95 = med(c, "rate"), med(c, "p50") * 1e3, med(c, "p95") * 1e3
        print(f"| {c} | {rate:,.0f} | {rate / one:.2f}x | {in_batch[c]:,.0f} | {rate / in_batch[c]:.2f}x | "
              f"{p50:.1f} ms | {p95:.1f} ms |")
        out["clients"][c] = {"rate": rate, "p50_ms": p50, "p95_ms": p95, "in_process": in_batch[c],
                             "ratio": rate / in_batch[c]}
    print(f"\nin-process charlm.generate, one stream: {rate_local:,.0f} characters/s; one client through the "
          f"server keeps {one / rate_local:.1%} of it")
    return out


if __name__ == "__main__":
    main()
