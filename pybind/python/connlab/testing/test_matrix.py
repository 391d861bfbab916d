"""The lifecycle matrix as pytest tests: every scenario of connlab.matrix on every target the
connlab plugin selects (in-process backends, or --connlab-target / --connlab-serve-cmd)."""

from __future__ import annotations

import pytest

from connlab import matrix
from connlab.pytest_plugin import warnings_seen


@pytest.mark.parametrize(
    "connlab_scenario_id",
    [pytest.param(s.id, marks=pytest.mark.connlab_scenario(s.id), id=s.id) for s in matrix.select()],
)
def test_scenario(
    connlab_scenario_id: str,
    connlab_target: matrix.Target,
    connlab_options: matrix.Options,
    request: pytest.FixtureRequest,
) -> None:
    result = matrix.run_one(matrix.SCENARIOS[connlab_scenario_id], connlab_target, connlab_options)
    request.node.user_properties.append(("connlab_status", result.status))
    if result.status == matrix.SKIP:
        if connlab_target.kind == matrix.IN_PROCESS:
            pytest.fail(f"{connlab_scenario_id} skipped on an in-process backend: {result.detail}")
        pytest.skip(result.detail)
    if result.status == matrix.NA:
        pytest.skip(f"n/a: {result.detail}")
    if result.status == matrix.WARN:
        message = f"{connlab_scenario_id} on {connlab_target.name}: {result.detail}"
        if request.config.getoption("connlab_strict") or request.config.getini("connlab_strict"):
            pytest.fail(f"warning (--connlab-strict): {result.detail}", pytrace=False)
        warnings_seen(request.config).append(message)
        return
    assert result.status == matrix.PASS, result.detail
