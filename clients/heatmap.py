"""A compact text heatmap of one attention row: one line per context token.

      0 <|bos|>   ██████████████████▓   0.329
      1 two       ███████████████████▒  0.336
      2 ␣plus     ██████████████        0.248
      ...

Bars are scaled to the row's largest weight (the numbers are the weights themselves); the last cell
of a bar is a partial shade (` ░▒▓█`).
"""

from __future__ import annotations

from collections.abc import Sequence

from clients.results import Completion

SHADES = " ░▒▓█"
VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})


def visible(text: str, width: int = 14) -> str:
    """Token text with whitespace made visible, cut to `width` characters (an empty text is ∅)."""
    shown = text.translate(VISIBLE) or "∅"
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def bar(weight: float, top: float, width: int) -> str:
    """`weight / top` of `width` cells: full blocks, then one partial shade."""
    cells = 0.0 if top <= 0 else max(0.0, min(1.0, weight / top)) * width
    full = int(cells)
    partial = SHADES[round((cells - full) * (len(SHADES) - 1))] if full < width else ""
    return ("█" * full + partial.strip()).ljust(width)


def heatmap(labels: Sequence[str], weights: Sequence[float], *, width: int = 20) -> str:
    """One line per token: index, visible text, bar, weight."""
    if len(labels) != len(weights):
        raise ValueError(f"{len(labels)} labels but {len(weights)} weights")
    top = max(weights, default=0.0)
    texts = [visible(label) for label in labels]
    pad = max((len(t) for t in texts), default=1)
    digits = len(str(max(len(labels) - 1, 0)))
    return "\n".join(f"{i:>{digits}} {text:<{pad}} {bar(w, top, width)} {w:.3f}"
                     for i, (text, w) in enumerate(zip(texts, weights)))


def pick(rows: Sequence, index: int | str) -> list:
    """One entry of the outermost axis (a layer, or a head), or "mean": their element-wise mean."""
    return _mean(rows) if index == "mean" else rows[int(index)]


def _mean(items: Sequence):
    if isinstance(items[0], (int, float)):
        return sum(items) / len(items)
    return [_mean(group) for group in zip(*items)]


def chosen_token(completion: Completion) -> int:
    """The last generated token with text (a final end-of-sequence token has none), else the last."""
    for i in range(len(completion.tokens) - 1, -1, -1):
        if completion.tokens[i].text:
            return i
    return len(completion.tokens) - 1


def token_heatmap(completion: Completion, *, token: int | None = None, layer: int | str = -1,
                  head: int | str = "mean", label: str | None = None, width: int = 20) -> str:
    """The heatmap of generated token `token`'s attention (default: `chosen_token`), for one entry
    (or "mean") of the layers and of the heads the completion holds; `label` names them in the title."""
    if not completion.tokens:
        raise ValueError("no token was generated")
    n = len(completion.tokens)
    index = chosen_token(completion) if token is None else token
    if not -n <= index < n:
        raise ValueError(f"there is no token {index}: {n} tokens were generated")
    index %= n
    row = completion.attention_row(index)  # [layer][head][key]
    for axis, i, size in (("layer", layer, len(row)), ("head", head, len(row[0]))):
        if i != "mean" and not -size <= int(i) < size:
            raise ValueError(f"there is no {axis} {i} among the {size} {axis}s the server returned")
    weights = pick(pick(row, layer), head)
    labels = [t.text for t in completion.context(index)]
    where = label or f"layer {layer}, head {head}"
    title = (f"attention of token {index} ({visible(completion.tokens[index].text, 30)}) over its "
             f"{len(labels)} context tokens, {where}:")
    return title + "\n" + heatmap(labels, weights, width=width)
