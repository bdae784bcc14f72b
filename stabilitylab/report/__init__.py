"""Stability report over one or more run directories.

:func:`write_report` reads the runs, runs every detector on them and writes into one folder:

- ``report.html``: a self-contained page, with figures embedded as base64 PNG data URIs;
- ``report.md``: the same tables, with image links to the PNG files;
- ``knn_top1.png``, ``loss.png``, ``grad_first_last.png`` and ``grad_heatmap.png``;
- ``attention.png`` when a run has attention probes;
- for a sweep folder also ``sweep_knn_top1.png`` and ``sweep_dips.png``;
- ``events.json``: every detected event of every run and the detector parameters.

Everything is computed in memory before the first file is written, and each file is written
to a temporary name and renamed, so a failure leaves each file either complete or as it was.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabilitylab.atomic import write_bytes_atomic, write_text_atomic
from stabilitylab.detect import DetectorParams, RunEvents, detect_run
from stabilitylab.errors import RunDirError
from stabilitylab.report.attention import attention_figures
from stabilitylab.report.content import ReportContent
from stabilitylab.report.document import build_report_content
from stabilitylab.report.figures import render_figures
from stabilitylab.report.html import render_html
from stabilitylab.report.markdown import render_markdown
from stabilitylab.report.methods import build_method_report
from stabilitylab.report.summary import run_labels
from stabilitylab.report.sweep import build_sweep_report, load_report_sweep
from stabilitylab.runs import CONFIG_FILE, is_report_dir, make_dir, read_run

__all__ = ["EVENTS_FILE", "HTML_FILE", "MARKDOWN_FILE", "REPORT_DIR_NAME", "write_report"]

log = logging.getLogger(__name__)

REPORT_DIR_NAME = "report"
HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
EVENTS_FILE = "events.json"
EVENTS_FORMAT_VERSION = 1


def write_report(
    run_paths: Sequence[str | Path] | str | Path,
    out_dir: Path | None = None,
    *,
    params: DetectorParams | None = None,
) -> Path:
    """Write the stability report for ``run_paths`` and return the report folder.

    A single folder that contains ``sweep.json`` is a sweep: the report covers its grid
    points' runs and adds the sweep sections, and events.json gains a ``sweep`` key. Runs of
    several methods add the per-method section and a ``methods`` key.

    The default folder is ``RUN_DIR/report`` for one run or sweep. For several runs it is ``report``
    in the folder that contains the first run, so runs kept side by side share one report
    and a new comparison there replaces it. A path given twice is reported once.

    Raises RunDirError for an empty list, a missing run directory or one without
    ``config.json``, and when ``out_dir`` exists as a file.
    """
    paths = unique_run_paths(run_paths)
    target = Path(out_dir) if out_dir is not None else default_report_dir(paths)
    check_report_dir(target)
    # One sweep folder stands for the run folders of its grid points.
    sweep = load_report_sweep(paths)
    if sweep is not None:
        paths = sweep.run_paths
    runs = [read_run(path) for path in paths]
    params = params or DetectorParams()
    events = [detect_run(run, params) for run in runs]
    labels = run_labels(runs)
    figures = render_figures(runs, events, labels) + attention_figures(runs, events, labels)
    methods = build_method_report(runs, events)
    extra = build_sweep_report(sweep, runs, events) if sweep is not None else None
    sections = [*(methods.sections if methods else ()), *(extra.sections if extra else ())]
    content = build_report_content(runs, events, labels, figures, params, extra_sections=sections)
    payload = events_payload(events, labels, params)
    if methods is not None:
        payload["methods"] = methods.payload
    if extra is not None:
        content.title = extra.title
        payload["sweep"] = extra.payload
    write_report_files(target, content, payload)
    log.info("wrote the report on %d run(s) to %s", len(runs), target)
    return target


def unique_run_paths(run_paths: Sequence[str | Path] | str | Path) -> list[Path]:
    """Return the run paths in order, without repeats of the same folder.

    A single ``str`` or ``Path`` counts as one run. Raises RunDirError for an empty list.
    """
    if isinstance(run_paths, str | os.PathLike):
        run_paths = [run_paths]
    paths: list[Path] = []
    seen: set[Path] = set()
    for raw in run_paths:
        path = Path(raw)
        resolved = path.resolve()
        if resolved in seen:
            log.warning("run directory %s was given more than once, so it is reported once", path)
            continue
        seen.add(resolved)
        paths.append(path)
    if not paths:
        raise RunDirError("no run directory was given. Pass at least one run folder")
    return paths


def default_report_dir(paths: Sequence[Path]) -> Path:
    """Return ``RUN_DIR/report`` for one run, else ``report`` beside the first run's folder."""
    if len(paths) == 1:
        return paths[0] / REPORT_DIR_NAME
    return paths[0].resolve().parent / REPORT_DIR_NAME


def events_payload(
    events: Sequence[RunEvents], labels: Sequence[str], params: DetectorParams
) -> dict[str, Any]:
    """Return the content of ``events.json``: the parameters and every run's events."""
    return {
        "format_version": EVENTS_FORMAT_VERSION,
        "detector_params": params.to_dict(),
        "runs": [
            {"label": label, **run_events.to_dict()}
            for run_events, label in zip(events, labels, strict=True)
        ],
    }


def check_report_dir(target: Path) -> None:
    """Raise RunDirError unless ``target`` is new, empty or an earlier stabilitylab report.

    An earlier report is replaced file by file. Any other folder with files in it, a run
    directory included, is left alone so that no user file is overwritten.
    """
    if target.exists() and not target.is_dir():
        raise RunDirError(f"report folder {target} is a file. Pass a folder name for the report")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if (target / CONFIG_FILE).exists():
        raise RunDirError(
            f"report folder {target} is a run directory. Pass another --out, such as "
            f"{target / REPORT_DIR_NAME}"
        )
    if not is_report_dir(target):
        raise RunDirError(
            f"report folder {target} already contains files that are not a stabilitylab report. "
            "Pass a new or empty folder"
        )


def write_report_files(target: Path, content: ReportContent, payload: dict[str, Any]) -> None:
    """Write the figures, ``events.json``, ``report.md`` and ``report.html`` into ``target``."""
    check_report_dir(target)
    make_dir(target, "report folder")
    # allow_nan=False keeps the file strict JSON. Events contain no NaN by construction, so
    # a ValueError here is a bug in a detector.
    events_text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    markdown_text = render_markdown(content)
    html_text = render_html(content)
    for figure in content.figures:
        write_bytes_atomic(target / figure.file_name, figure.png)
    write_text_atomic(target / EVENTS_FILE, events_text)
    write_text_atomic(target / MARKDOWN_FILE, markdown_text)
    write_text_atomic(target / HTML_FILE, html_text)
