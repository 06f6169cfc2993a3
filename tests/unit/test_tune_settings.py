"""Settings and job spec of per-tensor tuning: `[quantize] tune`, `tune_seconds`, `convert --tune`."""

from __future__ import annotations

import pytest

from bot.model import settings as S
from converters.core.errors import ConfigError


def test_tune_is_on_by_default_and_reaches_the_job_spec() -> None:
    from bot.jobs.job import JobSpec
    from converters.core import quants
    from converters.ladder import job, pipeline, tune

    s = S.from_mapping({}, env={}, free_disk=10**12)
    assert s.quantize.tune == ("default",) and s.quantize.tune_seconds > 0
    # "default": Q4_K_M, Q3_K_M and Q2_K where the ladder has them (the default ladder has all three)
    ladder = [q.name for q in quants.parse_ladder(s.quantize.ladder)]
    assert [q.name for q in tune.check_points(s.quantize.tune, ladder)] == ["Q4_K_M", "Q3_K_M", "Q2_K"]
    assert [q.name for q in tune.check_points(["default"], ["Q8_0", "Q2_K"])] == ["Q2_K"]
    assert tune.check_points(["default"], ["Q8_0"]) == () and tune.check_points([], ladder) == ()
    assert [q.name for q in tune.check_points(["Q2_K", "default"], ladder)] == ["Q2_K", "Q4_K_M", "Q3_K_M"]
    off = S.from_mapping({"quantize": {"ladder": "Q8_0", "tune": ["default"]}}, env={}, free_disk=10**12)
    spec = JobSpec.from_settings(off, "acme/Model", "main", calibration=None, evaluation=None)
    names = [st.name for st in job.ladder_stages(spec.ladder, None)]
    assert "tune" not in names  # nothing of the default points in this ladder: no tune stage
    assert S.from_mapping({"quantize": {"tune": []}}, env={}, free_disk=10**12).quantize.tune == ()
    assert isinstance(pipeline.LadderOptions().tune, tuple)
    s2 = S.from_mapping({"quantize": {"ladder": "small", "tune": ["Q4_K_M", "Q2_K"], "tune_seconds": 900}}, env={},
                        free_disk=10**12)
    assert s2.quantize.tune == ("Q4_K_M", "Q2_K")
    spec = JobSpec.from_settings(s2, "acme/Model", "main", calibration=None, evaluation=None)
    assert spec.ladder.tune == ("Q4_K_M", "Q2_K") and spec.ladder.tune_seconds == 900
    assert s.quantize.tune_confirm is False and spec.ladder.tune_confirm is False  # the cheap mode by default
    s3 = S.from_mapping({"quantize": {"ladder": "small", "tune": ["Q2_K"], "tune_confirm": True}}, env={},
                        free_disk=10**12)
    assert JobSpec.from_settings(s3, "acme/Model", "main", calibration=None, evaluation=None).ladder.tune_confirm is True


@pytest.mark.parametrize("quantize,why", [
    ({"ladder": "small", "tune": ["Q5_K_M"]}, "not in the ladder"),
    ({"tune": ["Q9_Z"]}, "unknown quant type"),
    ({"ladder": "Q8_0,BF16", "tune": ["BF16"]}, "nothing to tune"),
    ({"tune_seconds": 0}, "must be positive"),
])
def test_bad_tune_settings_name_the_key(quantize, why) -> None:
    with pytest.raises(ConfigError) as ei:
        S.from_mapping({"quantize": quantize}, env={}, free_disk=10**12)
    assert ei.value.key.startswith("quantize.tune") and why in str(ei.value)


def test_ladder_stages_add_tune_only_when_asked() -> None:
    from converters.ladder import job
    from converters.ladder import pipeline

    names = [s.name for s in job.ladder_stages(pipeline.LadderOptions(ladder="small", imatrix=False), None)]
    assert "tune" not in names
    names = [s.name for s in job.ladder_stages(pipeline.LadderOptions(ladder="small", imatrix=False,
                                                                     tune=("Q4_K_M",)), None)]
    assert names[names.index("quantize") + 1] == "tune"
