"""Writing results: result files (replaced atomically) and small text tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

from paretoq.errors import UserError
from paretoq.files import atomic_write


def write_atomic(path, data: str | bytes) -> Path:
    """``paretoq.files.atomic_write``, with a path the system refuses reported as a ``UserError``."""
    try:
        return atomic_write(path, data)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path, obj) -> Path:
    return write_atomic(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def format_table(header: list[str], rows: list[list], markdown: bool = False) -> str:
    """Columns aligned (numbers right, text left); ``markdown`` adds the pipes and the rule."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [all(_is_number(r[i]) for r in rows if r[i] is not None) and rows for i in range(len(header))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |" if markdown else "  ".join(parts).rstrip()

    out = [line(header)]
    if markdown:
        out.append("|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                                  for w, num in zip(widths, numeric)) + "|")
    out += [line(r) for r in cells]
    return "\n".join(out)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:,.4f}" if abs(v) < 10 else f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
