"""The lifecycle matrix as pytest tests: every scenario of connlab.matrix on every target the
connlab plugin selects (in-process backends, or --connlab-target / --connlab-serve-cmd)."""

from __future__ import annotations

import pytest

from connlab import matrix


@pytest.mark.parametrize(
    "connlab_scenario_id",
    [pytest.param(s.id, marks=pytest.mark.connlab_scenario(s.id), id=s.id) for s in matrix.select()],
)
def test_scenario(
    connlab_scenario_id: str, connlab_target: matrix.Target, connlab_options: matrix.Options
) -> None:
    result = matrix.run_one(matrix.SCENARIOS[connlab_scenario_id], connlab_target, connlab_options)
    if result.status == "skip":
        if connlab_target.kind == matrix.IN_PROCESS:
            pytest.fail(f"{connlab_scenario_id} skipped on an in-process backend: {result.detail}")
        pytest.skip(result.detail)
    assert result.status == "pass", result.detail
