"""The facts as one self-contained HTML page: plotly.js and the facts are inlined, so the
file opens from disk with no network (image thumbnails load only when asked for)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from mdf_taxonomy.report.template import PAGE


def plotly_js() -> str:
    """plotly.min.js as the `plotly` package ships it (the `report` extra pins it)."""
    try:
        return (resources.files("plotly") / "package_data" / "plotly.min.js").read_text()
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the report needs the `plotly` package: pip install 'mdf-taxonomy[report]'"
        ) from e


def render(facts: dict[str, Any]) -> str:
    """The page for `facts` (as compute_facts returns them)."""
    import jinja2

    data = json.dumps(facts, separators=(",", ":"), allow_nan=False, default=_plain)
    data = data.replace("</", "<\\/")  # never ends the <script> early
    env = jinja2.Environment(autoescape=True)
    return env.from_string(PAGE).render(
        facts=facts, facts_json=data, plotly=plotly_js(), title="mdf-taxonomy report"
    )


def _plain(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"not JSON: {type(v).__name__}")
