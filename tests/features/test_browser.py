"""The dashboard in a real browser (headless Chromium over the DevTools protocol): cards, highlighted
tokens, the index's sorting and search, and not one network request."""

from __future__ import annotations

from pathlib import Path

import pytest


def _open(browser, out: Path, page: str, fragment: str = "") -> None:
    browser.events.clear()
    browser.open((out / page).resolve().as_uri() + (f"#{fragment}" if fragment else ""))


def _only_local_requests(browser) -> None:
    urls = browser.requested_urls()
    assert urls, "the page loaded nothing (is request recording on?)"
    assert all(u.startswith("file://") for u in urls), [u for u in urls if not u.startswith("file://")]
    assert browser.console_errors() == []


def test_index_sorts_and_filters(browser, synthetic_site: dict) -> None:
    out, rows = synthetic_site["out"], synthetic_site["index"]["rows"]
    _open(browser, out, "index.html")
    browser.wait_for("document.querySelectorAll('#index-table tbody tr').length > 0")
    shown = "Array.from(document.querySelectorAll('#index-table tbody tr')).map(r => +r.dataset.id)"
    assert browser.eval(shown) == [r["id"] for r in rows]
    for key in ("density", "max_act", "context_share"):
        browser.eval(f"document.querySelector('th[data-sort={key}]').click()")
        want = sorted(rows, key=lambda r: (-r[key], r["id"]))
        assert browser.eval(shown) == [r["id"] for r in want], key
        browser.eval(f"document.querySelector('th[data-sort={key}]').click()")  # again: ascending
        want = sorted(rows, key=lambda r: (r[key], r["id"]))
        assert browser.eval(shown) == [r["id"] for r in want], key
    browser.eval(
        "const s = document.getElementById('search'); s.value = '1'; s.dispatchEvent(new Event('input'))"
    )
    ids = browser.eval(shown)
    assert ids and sorted(ids) == sorted(r["id"] for r in rows if str(r["id"]).startswith("1"))
    assert (
        browser.eval("document.getElementById('count').textContent") == f"{len(ids)} of {len(rows)} features"
    )
    links = browser.eval(
        "Array.from(document.querySelectorAll('#index-table a')).map(a => a.getAttribute('href'))"
    )
    assert links == [f"feature.html#{i}" for i in ids]
    _only_local_requests(browser)


def test_feature_card_renders(browser, synthetic_site: dict, tmp_path: Path) -> None:
    out, feats = synthetic_site["out"], synthetic_site["features"]
    fid = max((f for f in feats.values() if f["n_fire"]), key=lambda f: f["n_fire"])["id"]
    f = feats[fid]
    _open(browser, out, "feature.html", str(fid))
    browser.wait_for(f"document.querySelector('.feature-card[data-id=\"{fid}\"]')")
    tops = [e for e in f["examples"] if e["kind"] == "top"]
    assert browser.eval(".example[data-kind=top]".join(["document.querySelectorAll('", "').length"])) == len(
        tops
    )
    # every example marks its maximum once, and the shaded tokens are the ones where the feature fires
    n_max = "Array.from(document.querySelectorAll('.example[data-kind]')).map(e => e.querySelectorAll('.tok.max').length)"
    assert set(browser.eval(n_max)) == {1}
    n_on = browser.eval("document.querySelectorAll('.example[data-kind] .tok.on').length")
    assert n_on == sum(a > 0 for e in f["examples"] for a in e["acts"])
    colours = "Array.from(document.querySelectorAll('.example[data-kind] .tok%s')).map(t => t.style.backgroundColor)"
    assert all(c.startswith("rgb") for c in browser.eval(colours % ".on"))
    assert set(browser.eval(colours % ":not(.on)")) == {""}
    assert browser.eval("document.querySelectorAll('svg.hist rect').length") == len(f["hist"]["counts"])
    assert browser.eval("document.querySelectorAll('table.attr tr[data-branch]').length") == 4
    assert f["truth"]["group"] in browser.eval("document.querySelector('.truth').textContent")
    browser.screenshot(tmp_path / "feature.png")
    assert (tmp_path / "feature.png").stat().st_size > 10_000
    # the fragment picks the feature: going to another one swaps the card
    other = next(i for i in sorted(feats) if i != fid)
    browser.eval(f"location.hash = '#{other}'")
    browser.wait_for(f"document.querySelector('.feature-card[data-id=\"{other}\"]')")
    _only_local_requests(browser)


def test_lm_card_shows_text_and_logits(browser, lm_site: dict) -> None:
    out, feats = lm_site["out"], lm_site["features"]
    f = max(feats.values(), key=lambda f: f["n_fire"])
    _open(browser, out, "feature.html", str(f["id"]))
    browser.wait_for("document.querySelector('.feature-card')")
    text = browser.eval("document.querySelector('.example[data-kind=top]').textContent")
    top = next(e for e in f["examples"] if e["kind"] == "top")
    assert "".join(top["text"]).replace("\n", "\u21b5") in text
    promoted = browser.eval(
        "Array.from(document.querySelectorAll('table.logits')[0].rows).map(r => r.cells[0].title)"
    )
    assert promoted == [f"token id {i}" for _, i, _ in f["promoted"]]
    _only_local_requests(browser)


@pytest.mark.parametrize("page", ["index.html", "feature.html"])
def test_no_reference_to_another_host(synthetic_site: dict, page: str) -> None:
    html = (synthetic_site["out"] / page).read_text() + (synthetic_site["out"] / "assets/app.js").read_text()
    html = html.replace('"http://www.w3.org/2000/svg"', "")  # the SVG namespace: a name, never fetched
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
