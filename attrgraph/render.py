"""Draw an attribution graph: the interactive explorer (offline HTML) or the static figure (PNG, SVG).

`render_html` lives in `attrgraph.explorer`, `render_png` and `render_svg` in `attrgraph.figure`;
both use the same grid (docs/attribution-graphs.md §9): a column per token, a named row per block and
matrix, embeddings at the bottom and logits on top. The graph convention is in `attrgraph.export`.
"""

from attrgraph.explorer import render_html
from attrgraph.figure import render_png, render_svg

__all__ = ["render_html", "render_png", "render_svg"]
