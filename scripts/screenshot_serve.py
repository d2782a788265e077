"""The README's screenshots of the serve page: a real server, headless Chromium, one generation.

    python scripts/screenshot_serve.py --checkpoint checkpoints/timemachine --out examples/figures
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/timemachine")
    ap.add_argument("--out", default="examples/figures")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)

    from playwright.sync_api import expect, sync_playwright

    from charlm import load_checkpoint
    from charlm.serve import ServeConfig, make_server

    ckpt = load_checkpoint(args.checkpoint)
    httpd = make_server(ckpt, ServeConfig(port=0), model_id=Path(args.checkpoint).name,
                        command_checkpoint=args.checkpoint)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            for name, viewport in (("serve.png", {"width": 1100, "height": 640}),
                                   ("serve-phone.png", {"width": 390, "height": 844})):
                page = browser.new_page(viewport=viewport)
                page.goto(url)
                expect(page.locator("#card")).to_contain_text("parameters")
                page.fill("#prompt", "The Time Traveller ")
                page.eval_on_selector("#length", "el => { el.value = 400; el.dispatchEvent(new Event('input')); }")
                page.uncheck("#random-seed")
                page.fill("#seed", "1")
                page.click("#generate")
                expect(page.locator("#stats")).to_contain_text("seed 1")
                shots.append(out / name)
                page.screenshot(path=str(shots[-1]), full_page=name == "serve-phone.png")
                page.close()
            browser.close()
    finally:
        httpd.service.generator.stop()
        httpd.shutdown()
    return shots


if __name__ == "__main__":
    for path in main():
        print(path)
