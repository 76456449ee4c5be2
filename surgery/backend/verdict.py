"""An output's verdict: whether it passed the checks it was written under, carried by the folder.

An output whose verification or perplexity check failed is kept for inspection, but it must not
look usable. So the folder says so itself:

- `surgery.json` holds `verdict`: `{"passed": false, "failed": [reasons], "accepted": null}`
  (`{"passed": true}` for an output that passed, or was not checked: `"checked": false`);
- its `genai_config.json` is written as `genai_config.json.failed-check`, a name
  onnxruntime-genai does not load, so a deployment that loads the folder fails loudly;
- `surgery run` and `surgery eval` refuse it unless given `--allow-failed`;
- `surgery accept OUT` records that a person looked and accepted it (who is not recorded; when
  is), and puts `genai_config.json` back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from surgery.backend.output import REPORT, is_our_output, write_atomically

GENAI_CONFIG = "genai_config.json"
HELD_BACK = GENAI_CONFIG + ".failed-check"


def failed_checks(report: dict[str, Any]) -> list[str]:
    """Why the output failed the checks in its report (empty: it passed, or nothing was checked)."""
    failed = []
    verification = report.get("verification") or {}
    if verification.get("passed") is False:
        failed.append(f"verification against PyTorch: {verification.get('reason') or 'failed'}")
    perplexity = report.get("perplexity") or {}
    if perplexity.get("passed") is False:
        failed.append(
            f"perplexity check: {perplexity['increase']:+.1%} against the original, allowed "
            f"+{perplexity['max_increase']:.0%}"
        )
    retrieval = report.get("retrieval") or {}
    if retrieval.get("passed") is False:
        lost = ", ".join(f"{loss:.0%} at {length}" for length, loss in retrieval["lost"].items())
        failed.append(f"retrieval check: pass keys lost {lost} tokens, allowed {retrieval['max_loss']:.0%}")
    draft = report.get("draft") or {}
    if draft.get("passed") is False:
        failed.append(f"draft: {draft.get('reason') or 'failed'}")
    return failed


def seal(folder: str | os.PathLike, report: dict[str, Any]) -> None:
    """Record the verdict in `report` (before it is written) and hold back the genai config of
    an output that failed its checks."""
    failed = failed_checks(report)
    checked = (not (report.get("verification") or {}).get("skipped", False) or "perplexity" in report
               or "retrieval" in report)
    report["verdict"] = {"passed": not failed, "checked": checked, "failed": failed, "accepted": None}
    config = Path(folder) / GENAI_CONFIG
    if failed and config.exists():
        os.replace(config, Path(folder) / HELD_BACK)
        report["verdict"]["genai_config"] = HELD_BACK


def unaccepted_failure(report: dict[str, Any] | None) -> list[str]:
    """The failed checks of an output nobody accepted, from its report (empty when it may be used)."""
    verdict = (report or {}).get("verdict")
    if not isinstance(verdict, dict) or verdict.get("passed", True) or verdict.get("accepted"):
        return []
    return list(verdict.get("failed") or ["a check failed"])


def read_report(folder: str | os.PathLike) -> dict[str, Any] | None:
    """An output folder's surgery.json (None: none, or not a JSON object)."""
    try:
        with open(Path(folder) / REPORT, encoding="utf-8") as handle:
            report = json.load(handle)
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


class AcceptError(Exception):
    """The folder cannot be accepted (not an output of surgery, or nothing to accept)."""


def accept(folder: str | os.PathLike) -> list[str]:
    """Accept an output that failed its checks: record when in its report, and put its genai
    config back under the name onnxruntime-genai loads. Returns the checks it had failed."""
    path = Path(folder)
    report = read_report(path) if path.is_dir() and is_our_output(path) else None
    if report is None:
        raise AcceptError(f"'{folder}' is not a folder written by `surgery apply`")
    failed = unaccepted_failure(report)
    if not failed:
        accepted = (report.get("verdict") or {}).get("accepted")
        raise AcceptError(f"'{folder}' {'was accepted already' if accepted else 'passed its checks'}; "
                          "there is nothing to accept")  # fmt: skip
    report["verdict"]["accepted"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if (path / HELD_BACK).exists():
        os.replace(path / HELD_BACK, path / GENAI_CONFIG)
        report["verdict"]["genai_config"] = GENAI_CONFIG

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")

    write_atomically(str(path / REPORT), write)
    return failed
