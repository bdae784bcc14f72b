"""Names and values from users and files reach the report as text, never as markup.

A monitored run lives in a folder whose path contains a script element. Its configuration
values and one layer-group name are image tags with an ``onerror`` handler, and a planted
gradient spike in that layer puts the name into the spike tables. The HTML report is parsed
with :mod:`html.parser` to check that no element or attribute came from those strings.
"""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
import torch
from torch import nn

from stabilitylab import Monitor
from stabilitylab.report import write_report

SCRIPT = "<script>alert(1)</script>"
RUN_NAME = "<img src=x onerror=alert(2)>"
CONFIG_MODEL = "<img src=x onerror=alert(3)>"
CONFIG_METHOD = '"><script>alert(4)</script>'
LAYER = "<img src=x onerror=alert(5)>"
STEPS = 60
SPIKE_STEP = 50


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


class MarkupCollector(HTMLParser):
    """Collect every start tag with its attributes, and the text between tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture(scope="module")
def report_files(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    groups = {
        LAYER: ["stem"],
        "blocks.00": ["blocks.0"],
        "blocks.01": ["blocks.1"],
        "head": ["head"],
    }
    out = tmp_path_factory.mktemp("escaping") / SCRIPT / RUN_NAME
    config = {"model": CONFIG_MODEL, "method": CONFIG_METHOD, "seed": 0}
    with Monitor(model, optimizer, out=out, config=config, groups=groups) as monitor:
        for step in range(STEPS):
            x = torch.randn(16, 4)
            y = torch.randint(0, 3, (16,))
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            monitor.after_backward(loss)
            if step == SPIKE_STEP:
                model.stem.weight.grad.mul_(1000.0)
            optimizer.step()
    folder = write_report([out], tmp_path_factory.mktemp("report"))
    html = (folder / "report.html").read_text(encoding="utf-8")
    markdown = (folder / "report.md").read_text(encoding="utf-8")
    return html, markdown


@pytest.fixture(scope="module")
def parsed(report_files):
    collector = MarkupCollector()
    collector.feed(report_files[0])
    collector.close()
    return collector


def test_html_has_no_script_element(parsed):
    assert [tag for tag, _ in parsed.tags if tag == "script"] == []


def test_html_has_no_event_handler(parsed):
    handlers = [
        (tag, name) for tag, attrs in parsed.tags for name in attrs if name.startswith("on")
    ]
    assert handlers == []


def test_html_images_are_figures(parsed):
    sources = [attrs.get("src") or "" for tag, attrs in parsed.tags if tag == "img"]
    assert sources
    assert all(source.startswith("data:image/png;base64,") for source in sources)


@pytest.mark.parametrize("value", [SCRIPT, RUN_NAME, CONFIG_MODEL, CONFIG_METHOD, LAYER])
def test_html_shows_value_as_text(parsed, value):
    assert value in "".join(parsed.text)


def test_html_layer_in_spike_table(parsed):
    assert f"grad_norm[{LAYER}]" in parsed.text


@pytest.mark.parametrize("value", [SCRIPT, RUN_NAME, CONFIG_MODEL, LAYER])
def test_markdown_escapes_value(report_files, value):
    _, markdown = report_files
    escaped = value.replace("<", "&lt;").replace(">", "&gt;")
    assert value not in markdown
    assert escaped in markdown


def test_markdown_has_no_raw_tag(report_files):
    _, markdown = report_files
    assert "<script" not in markdown
    assert "<img" not in markdown
