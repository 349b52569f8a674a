"""`make prices`: the shipped price table, generated from a public catalogue.

Source: the ``model_prices_and_context_window_backup.json`` inside the ``litellm`` wheel on
PyPI, at the version pinned below (downloaded with pip, no dependency installed: the proxy
never imports litellm). Only text-token prices are kept, as USD per million tokens:
``input``, ``output``, ``cached_input`` (a read from the prompt cache), ``cache_write_5m``
and ``cache_write_1h`` (Anthropic's cache writes). The proxy reads the result,
``proxy/data/prices.json``, at start-up: no network then or at run time. The config's
``pricing:`` overrides and extends it.

    python scripts/make_prices.py [--version X.Y.Z] [--wheel path/to.whl]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

VERSION = "1.110.2"  # the litellm release the shipped table comes from
MEMBER = "litellm/model_prices_and_context_window_backup.json"
OUT = Path(__file__).resolve().parent.parent / "proxy" / "data" / "prices.json"
MODES = {"chat", "completion", "embedding", "responses", None}
FIELDS = {  # ours: theirs (USD per token)
    "input": "input_cost_per_token",
    "output": "output_cost_per_token",
    "cached_input": "cache_read_input_token_cost",
    "cache_write_5m": "cache_creation_input_token_cost",
    "cache_write_1h": "cache_creation_input_token_cost_above_1hr",
}


def wheel(version: str) -> Path:
    target = Path(tempfile.mkdtemp())
    command = [sys.executable, "-m", "pip", "download", f"litellm=={version}", "--no-deps"]
    subprocess.run([*command, "-d", str(target), "-q"], check=True)
    return next(target.glob("litellm-*.whl"))


def table(catalogue: dict[str, object]) -> dict[str, dict[str, float]]:
    prices: dict[str, dict[str, float]] = {}
    for model, entry in sorted(catalogue.items()):
        if not isinstance(entry, dict) or entry.get("mode") not in MODES:
            continue
        price = {}
        for ours, theirs in FIELDS.items():
            value = entry.get(theirs)
            if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                price[ours] = round(value * 1_000_000, 6)  # per million tokens
        if "input" in price and "output" in price:
            prices[model] = price
    return prices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=VERSION)
    parser.add_argument("--wheel", type=Path, help="a litellm wheel already downloaded")
    args = parser.parse_args()
    path = args.wheel or wheel(args.version)
    with zipfile.ZipFile(path) as archive:
        catalogue = json.loads(archive.read(MEMBER))
    document = {
        "source": f"litellm {args.version} on PyPI: {MEMBER}",
        "generated": time.strftime("%Y-%m-%d", time.gmtime()),
        "unit": "USD per million tokens",
        "prices": table(catalogue),
    }
    OUT.parent.mkdir(exist_ok=True)
    lines = [  # one model a line: a new table's diff reads as what changed
        f"  {json.dumps(model)}: {json.dumps(price, sort_keys=True)}"
        for model, price in document.pop("prices").items()  # type: ignore[union-attr]
    ]
    head = json.dumps(document, sort_keys=True)[:-1]
    OUT.write_text(head + ', "prices": {\n' + ",\n".join(lines) + "\n}}\n")
    print(f"{OUT}: {len(lines)} models from {document['source']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
