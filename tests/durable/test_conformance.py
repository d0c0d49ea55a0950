"""The official Durable Streams server conformance suite against a real ``runstream serve``.

npm ``@durable-streams/server-conformance-tests`` (pinned in ``package.json``, locked in
``package-lock.json``) runs under vitest from this directory, with the server's root
URL as its base. Its counts per engine go to ``test-artifacts/durable/``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import REPO, ServeProcess
from tests.durable.conftest import ENGINES, NPM_DIR, npx

ARTIFACTS = REPO / "test-artifacts" / "durable"
SUITE = "@durable-streams/server-conformance-tests"


def suite_version() -> str:
    package = NPM_DIR / "node_modules" / SUITE / "package.json"
    return str(json.loads(package.read_text())["version"])


async def run_suite(base_url: str, report: Path) -> tuple[dict[str, Any], str]:
    env = {**os.environ, "DS_BASE_URL": base_url, "FORCE_COLOR": "0"}
    proc = await asyncio.create_subprocess_exec(
        npx(),
        "vitest",
        "run",
        "--config",
        "vitest.config.mjs",
        "--reporter=json",
        f"--outputFile={report}",
        cwd=NPM_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    text = output.decode(errors="replace")
    raw = await asyncio.to_thread(lambda: report.read_text() if report.exists() else None)
    assert raw is not None, text[-3000:]
    return json.loads(raw), text


def failures(result: dict[str, Any]) -> list[str]:
    out = []
    for suite in result["testResults"]:
        for test in suite["assertionResults"]:
            if test["status"] == "failed":
                message = (test.get("failureMessages") or [""])[0][:500]
                out.append(f"{' > '.join(test['ancestorTitles'])} > {test['title']}: {message}")
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("ds_server", ENGINES, indirect=True)
async def test_official_conformance_suite_passes(
    ds_server: ServeProcess, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    npx()
    result, output = await run_suite(ds_server.url, tmp_path / "report.json")
    engine = request.node.callspec.params["ds_server"]
    counts = {
        "suite": f"{SUITE}@{suite_version()}",
        "engine": engine,
        "total": result["numTotalTests"],
        "passed": result["numPassedTests"],
        "failed": result["numFailedTests"],
        "skipped": result["numPendingTests"] + result["numTodoTests"],
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"conformance-{engine}.json").write_text(json.dumps(counts, indent=2) + "\n")
    print(json.dumps(counts))
    assert failures(result) == [], "\n".join(failures(result))
    assert counts["passed"] > 0 and counts["failed"] == 0, output[-3000:]
