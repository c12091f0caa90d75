"""Saved prompt styles (A1111's styles.csv: name, prompt, negative_prompt)."""
from __future__ import annotations

import csv
from pathlib import Path

from .errors import ApiError


def load_styles(path: Path | None) -> list[dict]:
    if path is None or not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return [{"name": row.get("name", ""), "prompt": row.get("prompt", ""),
                 "negative_prompt": row.get("negative_prompt", "")}
                for row in csv.DictReader(fh) if row.get("name")]


def merge_style(style_text: str, prompt: str) -> str:
    """A style with `{prompt}` wraps the prompt; otherwise it is appended after a comma."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    if not style_text:
        return prompt
    return f"{prompt}, {style_text}" if prompt else style_text


def apply_styles(path: Path | None, names: list[str] | None, prompt: str, negative: str) -> tuple[str, str]:
    if not names:
        return prompt, negative
    styles = {s["name"]: s for s in load_styles(path)}
    for name in names:
        if name not in styles:
            raise ApiError(400, f"prompt style {name!r} not found; available styles: "
                                f"{', '.join(styles) or '(none)'}")
        prompt = merge_style(styles[name]["prompt"], prompt)
        negative = merge_style(styles[name]["negative_prompt"], negative)
    return prompt, negative
