"""What ``charlm serve`` adds: time to the first character and characters per second through the
streaming API, against ``iter_generate`` in-process, for one checkpoint (default: the quickstart's).

The server runs as its own process (``python -m charlm serve``) on a free loopback port; the
in-process figures come from this process. Runs alternate between the two, and the medians are
reported.

    python scripts/bench_serve.py --checkpoint checkpoints/timemachine --length 2000 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_api(port: int, body: dict) -> tuple[float, float, str]:
    """(seconds to the first text chunk, seconds in all, the text) of one streamed /generate."""
    data = json.dumps({**body, "stream": True}).encode()
    t0 = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    buffer, first, texts = b"", None, []
    while True:
        more = sock.recv(65536)
        if not more:
            break
        buffer += more
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if not event.startswith(b"data: "):
                event = event.split(b"\r\n\r\n", 1)[-1]  # the response headers precede the first event
                if not event.startswith(b"data: "):
                    continue
            payload = json.loads(event[6:])
            if "text" in payload:
                first = first if first is not None else time.perf_counter() - t0
                texts.append(payload["text"])
    total = time.perf_counter() - t0
    sock.close()
    return first, total, "".join(texts)


def in_process(model, vocab, body: dict, chunk: int) -> tuple[float, float, str]:
    from charlm.sample import iter_generate

    t0 = time.perf_counter()
    first, texts = None, []
    for (text,) in iter_generate(model, vocab, body["prompt"], body["length"], body["temperature"], None, None,
                                 body["seed"], 1, chunk=chunk):
        first = first if first is not None else time.perf_counter() - t0
        texts.append(text)
    return first, time.perf_counter() - t0, "".join(texts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/timemachine")
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    from charlm import load_checkpoint
    from charlm.serve import ServeConfig

    ckpt = load_checkpoint(args.checkpoint)
    chunk = ServeConfig.chunk
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "charlm", "serve", args.checkpoint, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        server.stdout.readline()  # "Serving ... at http://..." once it listens
        body = {"prompt": "The ", "length": args.length, "temperature": args.temperature, "seed": 1}
        through_api(port, body)  # warm-up, both sides
        in_process(ckpt.model, ckpt.vocab, body, chunk)
        api, local = [], []
        for r in range(args.repeats):
            body["seed"] = r
            api.append(through_api(port, body))
            local.append(in_process(ckpt.model, ckpt.vocab, body, chunk))
            assert api[-1][2] == local[-1][2], "the API and the library gave different text"
    finally:
        server.terminate()
        server.wait(timeout=30)
    ttfc_api, ttfc_local = (statistics.median(x[0] for x in runs) * 1e3 for runs in (api, local))
    rate_api, rate_local = (args.length / statistics.median(x[1] for x in runs) for runs in (api, local))
    print(f"{args.checkpoint}: {ckpt.config.num_layers} x {ckpt.config.cell} {ckpt.config.hidden_size}, "
          f"{args.length:,} characters at temperature {args.temperature}, chunks of {chunk}, median of {args.repeats}\n")
    print("| path | first character | characters/s |")
    print("|---|---:|---:|")
    print(f"| in-process iter_generate | {ttfc_local:.1f} ms | {rate_local:,.0f} |")
    print(f"| streamed API (POST /generate, SSE) | {ttfc_api:.1f} ms | {rate_api:,.0f} |")
    print(f"\nthe API adds {ttfc_api - ttfc_local:+.1f} ms to the first character and keeps "
          f"{rate_api / rate_local:.1%} of the rate")
    return {"ttfc_api_ms": ttfc_api, "ttfc_local_ms": ttfc_local, "rate_api": rate_api, "rate_local": rate_local}


if __name__ == "__main__":
    main()
