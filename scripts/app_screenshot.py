"""The app screenshots in the docs (`docs/images/app_before_request.png`, `docs/images/app_four_panes.png`), taken
from the run `hf-ema demo` trains.

Trains the demo run when the folder holds none (`hf_ema.demo.train_tiny_run`, its defaults: 600 steps, post-hoc
snapshots), starts the app on a free localhost port and opens it in headless Debian Chromium (Playwright,
`/usr/bin/chromium`). It saves the page as it opens, then sets four panes (raw weights, EMA, post-hoc EMA
sigma_rel=0.15, mean of the last 3 checkpoints), generates greedily from one prompt and saves the whole page once the
scores are in.

Usage:
    python scripts/app_screenshot.py [--run runs/tiny] [--prompt "The for statement"] [--max-new-tokens 40]
        [--out-dir docs/images]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the app's `serve` package, from the clone
sys.path.insert(0, str(REPO / "tests"))  # the page helpers the browser tests use
from _app_page import CHROMIUM, CHROMIUM_ARGS, choose_pane, free_port, generate_and_wait  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/tiny", help="the demo run (trained there when missing)")
    parser.add_argument("--prompt", default="The for statement")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out-dir", default=str(REPO / "docs" / "images"))
    args = parser.parse_args()
    if not os.path.exists(CHROMIUM):
        parser.error(f"{CHROMIUM} is not installed (apt-get install chromium, as root)")

    from playwright.sync_api import sync_playwright

    from hf_ema.demo.tiny_run import train_tiny_run
    from serve.launch import start_app

    run = Path(train_tiny_run(args.run, progress=False)["output_dir"])
    demo, url = start_app(run, port=free_port(), device="cpu")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url)
            page.locator("#generate").wait_for()
            before = Path(args.out_dir) / "app_before_request.png"
            page.screenshot(path=str(before), full_page=True)
            choose_pane(page, 1, "raw weights")
            choose_pane(page, 2, "EMA")
            choose_pane(page, 3, "post-hoc EMA (any sigma_rel)", sigma="0.15")
            choose_pane(page, 4, "merge of the last k checkpoints", k="3")
            generate_and_wait(page, args.prompt, args.max_new_tokens)
            after = Path(args.out_dir) / "app_four_panes.png"
            page.screenshot(path=str(after), full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {before} and {after}")


if __name__ == "__main__":
    main()
