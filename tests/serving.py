"""A real charlm server on a free loopback port for the tests, and a small checkpoint to serve."""

import http.client
import json
import threading

import torch

from charlm import RNNLM, Vocab, load_checkpoint, save_checkpoint
from charlm.serve import ServeConfig, make_server

TEXT = "the time traveller smiled and the machine was gone\n" * 4


def make_checkpoint(directory, cell="gru"):
    vocab = Vocab.from_text(TEXT)
    torch.manual_seed(0)
    model = RNNLM(len(vocab), cell=cell, hidden_size=24, num_layers=2, embedding_dim=6)
    meta = {"corpus": {"path": "corpus.txt", "preprocess": "lower", "val_fraction": 0.1},
            "progress": {"step": 7, "best_val_loss": 2.0}}
    path = save_checkpoint(directory / "run" / "best", model, vocab, meta)
    return load_checkpoint(path)


class Server:
    def __init__(self, ckpt, **config):
        self.httpd = make_server(ckpt, ServeConfig(port=0, **config), model_id="run", command_checkpoint="run")
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method, path, body=None, headers=None, raw=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        h = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        if body is not None:
            raw = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=raw, headers=h)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r, data

    def json(self, method, path, body=None, **kw):
        r, data = self.request(method, path, body, **kw)
        return r.status, json.loads(data), r

    def events(self, path, body):
        r, data = self.request("POST", path, body)
        assert r.status == 200, data
        assert r.getheader("Content-Type").startswith("text/event-stream")
        out = []
        for block in data.decode().split("\n\n"):
            if block.startswith("data: "):
                payload = block[6:]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
        return out

    def healthy(self):
        status, body, _ = self.json("GET", "/health")
        return status == 200 and body["status"] == "ok"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()




NEAR_TIE = 1e-5  # a distribution this close to a tie at the first differing character: float rounding, not a bug


def assert_same_text(ckpt, prompt: str, options: dict, got: str, want: str) -> None:
    """``got`` (from the server) is ``want`` (charlm.generate's), or the two part first where the lone model
    was all but tied (a batch's products may differ from one sequence's in the last bits: tie_margin)."""
    from charlm.sample import tie_margin

    if got == want:
        return
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert k < min(len(got), len(want)), f"one text is a prefix of the other ({len(got)} and {len(want)} chars)"
    margin = tie_margin(ckpt.model, ckpt.vocab, prompt, want, k, options.get("temperature", 0.0),
                        options.get("top_k"), options.get("top_p"), options.get("seed"))
    assert margin < NEAR_TIE, f"the texts part at character {k}, where the model was not tied (margin {margin:.2e})"
