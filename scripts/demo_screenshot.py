"""The README's picture of the web demo (docs/demo_app.png): the demo served on a trained model, one of its
validation examples asked in headless Chromium, and the page photographed with the answer, the decoded thoughts
and where the chosen thought looked.

    python run.py args/demo.yaml                                  # the demo's model in runs/demo (CPU, minutes)
    python scripts/demo_screenshot.py runs/demo --out docs/demo_app.png

Run it from the folder the run was trained in (the examples are the run's val_path, a relative path). Needs the app
extra (gradio), selenium, Chromium and chromedriver (Debian: apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
from pathlib import Path


def browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium or not shutil.which("chromedriver"):
        raise SystemExit("error: needs chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                f"--window-size={width},{height}", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium_')}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="run directory, checkpoint_N directory or exported HF folder")
    p.add_argument("--out", type=Path, default=Path("docs/demo_app.png"))
    p.add_argument("--example", type=int, default=2,
                   help="which of the page's validation examples to ask (default 2: on the demo's built-in set, a "
                        "question of 4 steps)")
    p.add_argument("--width", type=int, default=1300)
    p.add_argument("--height", type=int, default=1250, help="window height (the page shows about 140 px less)")
    args = p.parse_args(argv)

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from multimodal_coconut.app import build, example_questions, serve
    from multimodal_coconut.inference import load_trained

    trained = load_trained(args.model)
    if not trained.backbone.is_multimodal:
        raise SystemExit("error: the README's picture is of a vision-language model (the demo's)")
    examples = example_questions(trained)
    if not 0 <= args.example < len(examples):
        raise SystemExit(f"error: --example {args.example}: the page has {len(examples)} examples (is the run's "
                         f"val_path {trained.config.val_path} there, relative to this folder?)")
    image, question, choices = examples[args.example]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build(trained)
    serve(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    driver = browser(args.width, args.height)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 180)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))[0].send_keys(
            str(Path(image).resolve()))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
        driver.find_element(By.CSS_SELECTOR, "#choices textarea").send_keys(choices)
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#heatmap img"))
        thoughts = driver.find_element(By.CSS_SELECTOR, "#thoughts").text
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
        demo.close()
    print(f"asked {question!r} (choices {choices}): answer {answer!r}\n{thoughts}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
