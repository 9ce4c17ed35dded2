"""Write a feature dashboard as a static site that opens from a file on an offline machine.

Layout of ``out/``::

    index.html              the table of features (sortable, searchable by id), links to feature.html#ID
    feature.html            one feature card, chosen by the URL fragment (#ID); previous / next links
    assets/app.js, style.css
    data/index.js           window.MTSAE_INDEX = {meta, rows}: one summary row per feature
    data/features/<id>.js   window.MTSAE_FEATURES[id] = {...}: the card's data

Data are JavaScript files loaded by ``<script>`` tags, not JSON fetched at run time: browsers refuse
``fetch`` from ``file://`` pages, while scripts load. Nothing refers to another host (no CDN, fonts or
images) and a Content-Security-Policy in every page forbids connections, so the page makes no network
request (``tests/features/test_browser.py`` checks it in headless Chromium).
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["index_rows", "write_site"]

#: forbids every fetch / XHR / WebSocket and any resource from another origin; scripts and styles from
#: the site's own files (and the inline style attributes the cards use)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'none'"
)

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>{title}</title>
<link rel="stylesheet" href="assets/style.css">
<script src="data/index.js"></script>
<script src="assets/app.js"></script>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""

_INDEX_BODY = """<div class="toolbar">
<input id="search" type="search" placeholder="feature id (Enter opens it)" autocomplete="off">
<span id="count"></span>
<span class="muted">click a column to sort</span>
</div>
<table id="index-table" class="index"></table>"""


def _js(name: str, value: Any) -> str:
    return f"{name} = {json.dumps(value, separators=(',', ':'), allow_nan=False)};\n"


def index_rows(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The index table's row per feature (summary numbers only)."""
    rows = []
    for f in features:
        r = {k: f.get(k) for k in ("id", "density", "max_act", "mean_act", "context_share", "ablated_ratio")}
        if "truth" in f:
            r["truth_feature"], r["truth_group"], r["truth_cos"] = (
                f["truth"]["feature"],
                f["truth"]["group"],
                f["truth"]["cos"],
            )
        if f.get("promoted"):
            r["top_token"] = f["promoted"][0][0]
        rows.append(r)
    return rows


def write_site(data: dict[str, Any], out: str | Path) -> Path:
    """Write ``data`` (from :func:`mtsae.features.collect.collect_dashboard`) as a site under ``out``;
    returns the path of ``index.html``. Files of an earlier dashboard in ``data/features`` are replaced."""
    out = Path(out)
    (out / "assets").mkdir(parents=True, exist_ok=True)
    feat_dir = out / "data" / "features"
    if feat_dir.exists():
        shutil.rmtree(feat_dir)  # a smaller --features selection must not leave stale cards behind
    feat_dir.mkdir(parents=True)
    static = resources.files("mtsae.features") / "static"
    for name in ("app.js", "style.css"):
        (out / "assets" / name).write_text(
            static.joinpath(name).read_text(encoding="utf-8"), encoding="utf-8"
        )
    meta = data["meta"]
    (out / "data" / "index.js").write_text(
        _js("window.MTSAE_INDEX", {"meta": meta, "rows": index_rows(data["features"])}), encoding="utf-8"
    )
    for f in data["features"]:
        (feat_dir / f"{f['id']}.js").write_text(
            "window.MTSAE_FEATURES = window.MTSAE_FEATURES || {};\n"
            + _js(f"window.MTSAE_FEATURES[{int(f['id'])}]", f),
            encoding="utf-8",
        )
    title = "mtsae features"
    (out / "index.html").write_text(_PAGE.format(csp=CSP, title=title, body=_INDEX_BODY), encoding="utf-8")
    (out / "feature.html").write_text(
        _PAGE.format(csp=CSP, title=title, body='<div id="feature"></div>'), encoding="utf-8"
    )
    return out / "index.html"
