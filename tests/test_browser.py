"""The serve page in a real headless Chromium (Debian's), driven by Playwright.

In CI (``CI=true``) a missing browser or driver fails these tests; elsewhere they skip with the reason.
"""

import os
import shutil
import threading

import pytest
import torch

from charlm import RNNLM, Vocab, generate, load_checkpoint, save_checkpoint
from charlm.serve import ServeConfig, make_server

try:
    from playwright.sync_api import expect
except ImportError:  # the fixture skips (or fails in CI) with the reason
    expect = None

CHROMIUM = os.environ.get("CHARLM_CHROMIUM", "/usr/bin/chromium")
TEXT = "the time traveller smiled and the machine was gone\n" * 4
# Chromium as root in a container, and with no network: no sandbox, no background requests.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHARLM_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:  # the page's own Content-Security-Policy stays in force (no bypass_csp)
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _serve(tmp_path, hidden, chunk):
    vocab = Vocab.from_text(TEXT)
    torch.manual_seed(0)
    model = RNNLM(len(vocab), cell="gru", hidden_size=hidden, num_layers=2, embedding_dim=8)
    meta = {"corpus": {"path": "tiny.txt", "preprocess": "raw"}, "progress": {"step": 3, "best_val_loss": 2.5}}
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "run" / "best", model, vocab, meta))
    httpd = make_server(ckpt, ServeConfig(port=0, chunk=chunk), model_id="run", command_checkpoint="run")
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, ckpt


@pytest.fixture
def small(tmp_path):
    httpd, ckpt = _serve(tmp_path, hidden=24, chunk=8)
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", ckpt, httpd
    httpd.shutdown()
    httpd.server_close()


def _open(browser, url, **kwargs):
    """A new page on ``url``, once it has loaded the model card."""
    page = browser.new_page(**kwargs)
    page.goto(url)
    expect(page.locator("#card")).to_contain_text("GRU")
    return page


def _set_range(page, selector, value):
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }",
                          str(value))


def _settings(page, prompt="the ", temperature=0.9, length=120, seed=7):
    page.fill("#prompt", prompt)
    _set_range(page, "#temperature", temperature)
    _set_range(page, "#length", length)
    page.uncheck("#random-seed")
    page.fill("#seed", str(seed))


def test_generate_streams_the_librarys_text(browser, small):
    url, ckpt, _ = small
    page = _open(browser, url)
    _settings(page)
    page.click("#generate")
    expect(page.locator("#stats")).to_contain_text("seed 7")
    expected = generate(ckpt.model, ckpt.vocab, "the ", 120, temperature=0.9, seed=7)
    assert page.inner_text("#output .prompt") == "the "
    assert page.eval_on_selector("#output", "el => el.textContent") == expected
    assert int(page.get_attribute("#output", "data-chunks")) > 1  # it arrived in several pieces
    command = page.inner_text("#command")
    assert command == "charlm generate 'the ' --checkpoint 'run' --length 120 --temperature 0.9 --seed 7"
    page.close()


def test_stop_at_ends_the_text_before_the_string(browser, small):
    url, ckpt, _ = small
    full = generate(ckpt.model, ckpt.vocab, "the ", 120, temperature=0.9, seed=7)[4:]
    stop = next(full[i:i + 3] for i in range(20, 100) if full.find(full[i:i + 3]) == i)
    page = _open(browser, url)
    _settings(page)
    page.fill("#stop-at", stop.replace("\n", "\\n"))
    page.click("#generate")
    expect(page.locator("#stats")).to_contain_text("· stop")
    assert page.eval_on_selector("#output", "el => el.textContent") == "the " + full[:full.find(stop)]
    page.close()


def test_unknown_characters_are_named_before_sending(browser, small):
    url, _, _ = small
    page = _open(browser, url)
    page.fill("#prompt", "the Zebra")
    assert page.is_visible("#warning")
    assert '"Z"' in page.inner_text("#warning")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("U+005A")
    assert "'Z' (U+005A)" in page.inner_text("#error")
    page.fill("#prompt", "the ")
    assert not page.is_visible("#warning")
    page.close()


def test_stop_ends_the_generation_and_frees_the_server(browser, tmp_path):
    httpd, _ = _serve(tmp_path, hidden=1024, chunk=1)  # ~1 ms a character: 5,000 take seconds
    try:
        page = _open(browser, f"http://127.0.0.1:{httpd.server_address[1]}/")
        _set_range(page, "#length", 5000)
        page.click("#generate")
        expect(page.locator("#stats")).to_contain_text("chars/s")  # streaming has begun
        expect(page.locator("#server-stats")).to_contain_text("1 sequence generating together")
        page.wait_for_timeout(100)
        page.click("#stop")
        expect(page.locator("#stats")).to_contain_text("stopped")
        shown = len(page.eval_on_selector("#output span:last-child", "el => el.textContent"))
        assert 20 < shown < 5000
        assert page.is_enabled("#generate")
        service = httpd.service
        for _ in range(100):
            if not service.engine.health()["busy"]:
                break
            page.wait_for_timeout(50)
        assert not service.engine.health()["busy"]  # the server let go of the model
        page.keyboard.press("Control+Enter")  # the shortcut starts another one
        expect(page.locator("#stop")).to_be_enabled()
        page.click("#stop")
        page.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_phone_width_layout(browser, small):
    url, _, _ = small
    page = _open(browser, url, viewport={"width": 390, "height": 844})
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # no sideways scrolling
    prompt, controls = page.locator("#prompt").bounding_box(), page.locator("#temperature").bounding_box()
    assert controls["y"] > prompt["y"]  # one column: the controls come below
    page.close()


@pytest.mark.parametrize("cell, quantize", [("lstm", None), ("lstm", "int8"), ("mogrifier", None),
                                            ("mogrifier", "int8")])
def test_the_web_export_generates_the_greedy_text_of_charlm_generate(browser, tmp_path, cell, quantize):
    """charlm export --format web (fp32, or --quantize int8), served by Python's own static file server: the
    page's greedy text is charlm generate's on the same exported file (and, for fp32, the checkpoint's); for the
    LSTM and the Mogrifier LSTM, whose state is a pair (h, c)."""
    import functools
    import http.server

    pytest.importorskip("onnxruntime")
    from click.testing import CliRunner

    from charlm.cli import main

    vocab = Vocab.from_text(TEXT)
    torch.manual_seed(0)
    model = RNNLM(len(vocab), cell=cell, hidden_size=48, num_layers=2, embedding_dim=8)
    meta = {"corpus": {"path": "tiny.txt", "preprocess": "raw"}, "progress": {"step": 3, "best_val_loss": 2.5}}
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "run" / "best", model, vocab, meta))
    site = tmp_path / "site"
    r = CliRunner().invoke(main, ["export", str(ckpt.path), "--format", "web", "--out", str(site), "--quiet",
                                  *(["--quantize", quantize] if quantize else [])])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["generate", "the ", "--length", "200", "--checkpoint", str(site / "model.onnx")])
    assert r.exit_code == 0, r.output
    expected = r.output[:-1]  # charlm generate --engine onnx on the page's own model file
    if quantize is None:
        assert expected == generate(ckpt.model, ckpt.vocab, "the ", 200)
    assert {".charlm", "index.html", "app.js", "model.onnx", "model.tokenizer.json", "charlm.json", "ort.wasm.min.js",
            "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"} <= {p.name for p in site.iterdir()}
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        page = browser.new_page()
        requests = []
        page.on("request", lambda req: requests.append(req.url))
        page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/index.html")
        expect(page.locator("#card")).to_contain_text(f"{cell.upper()} 48", timeout=30_000)
        if quantize:
            expect(page.locator("#card")).to_contain_text("int8 weights")
        page.fill("#prompt", "the ")
        _set_range(page, "#temperature", 0)
        _set_range(page, "#length", 200)
        page.click("#generate")
        expect(page.locator("#stats")).to_contain_text("· length", timeout=30_000)
        shown = page.eval_on_selector("#output", "el => el.textContent")
        assert shown == expected
        page.fill("#stop-at", shown[30:33])
        page.click("#generate")
        expect(page.locator("#stats")).to_contain_text("· stop", timeout=30_000)
        assert page.eval_on_selector("#output", "el => el.textContent") == "the " + shown[4:][:shown[4:].find(
            shown[30:33])]
        assert all(u.startswith(f"http://127.0.0.1:{httpd.server_address[1]}/") for u in requests)  # no CDN
        page.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
