"""List the registered models and the pretrained weights this toolkit knows: ``python -m models.list``.

Two tables: the pretrained sources (file, the models it fits, their default input size, the checkpoint layout,
licence, whether access is gated, where it is published, how the layout is checked) and every registered model
with its default input size, reference spellings and known weights. ``--markdown`` prints them as Markdown.
Nothing is built or downloaded: input sizes come from the factories' signatures, the rest from
``util.weights_files``.
"""
from __future__ import annotations

import argparse
import re
import sys

from models.registry import MODEL_ALIASES, default_input_size, list_models
from util.weights_files import source_rows


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header, ["-" * w for w in widths], *rows])


def _url(published: str) -> str:
    """The first address in a ``published`` text (the rest names the publisher)."""
    m = re.search(r"https?://[^\s;)]+", published)
    return m.group(0) if m else published


def weights_table(markdown: bool = False) -> str:
    rows = []
    for r in source_rows():
        models = r["models"].split(", ")
        rows.append([r["weights"], r["models"], str(default_input_size(models[0])), r["layout"],
                     r["licence"].split(" (")[0], r["gated"].split(":")[0], _url(r["published"]), r["checked"]])
    return _table(["weights", "models", "input", "layout", "licence", "gated", "published", "checked"], rows, markdown)


def models_table(markdown: bool = False) -> str:
    weights: dict[str, list[str]] = {}
    for r in source_rows():
        for m in r["models"].split(", "):
            weights.setdefault(m, []).append(r["weights"])
    aliases: dict[str, list[str]] = {}
    for alias, name in MODEL_ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    for arch in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14"):
        aliases.setdefault(arch, []).append(f"Dinov2 --model_arch {arch}")
    rows = [[name, str(default_input_size(name)), ", ".join(aliases.get(name, [])) or "-",
             ", ".join(weights.get(name, [])) or "-"] for name in list_models()]
    return _table(["model", "input", "reference spellings", "pretrained weights"], rows, markdown)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.list", description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    a = ap.parse_args(argv)
    print("Pretrained weights (nothing is downloaded: copy the file into --weights_dir)\n")
    print(weights_table(a.markdown))
    print("\nModels\n")
    print(models_table(a.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
