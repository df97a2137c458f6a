"""The graph explorer: one offline HTML page per attribution graph (`render_html`)."""

from attrgraph.explorer.page import render_html

__all__ = ["render_html"]
