"""Settings and job spec of per-tensor tuning: `[quantize] tune`, `tune_seconds`, `convert --tune`."""

from __future__ import annotations

import pytest

from bot.model import settings as S
from converters.core.errors import ConfigError


def test_tune_is_off_by_default_and_reaches_the_job_spec() -> None:
    from bot.jobs.job import JobSpec

    s = S.from_mapping({}, env={}, free_disk=10**12)
    assert s.quantize.tune == () and s.quantize.tune_seconds > 0
    s2 = S.from_mapping({"quantize": {"ladder": "small", "tune": ["Q4_K_M", "Q2_K"], "tune_seconds": 900}}, env={},
                        free_disk=10**12)
    assert s2.quantize.tune == ("Q4_K_M", "Q2_K")
    spec = JobSpec.from_settings(s2, "acme/Model", "main", calibration=None, evaluation=None)
    assert spec.ladder.tune == ("Q4_K_M", "Q2_K") and spec.ladder.tune_seconds == 900
    assert s.quantize.tune_confirm is True and spec.ladder.tune_confirm is True
    s3 = S.from_mapping({"quantize": {"ladder": "small", "tune": ["Q2_K"], "tune_confirm": False}}, env={},
                        free_disk=10**12)
    assert JobSpec.from_settings(s3, "acme/Model", "main", calibration=None, evaluation=None).ladder.tune_confirm is False


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
