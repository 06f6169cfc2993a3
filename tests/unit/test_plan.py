"""The planner is pure: names, sizes, splits and disk from checkpoint facts and options."""

from pathlib import Path

import pytest

from converters.ladder import pipeline
from converters.llama.calibrate import TextFile
from converters.formats.checkpoint import Checkpoint
from converters.core.errors import InputError, NeedsImatrix


def fake_checkpoint(params: int) -> Checkpoint:
    return Checkpoint(path=Path("/models/Big"), config={}, architecture="LlamaForCausalLM", model_type="llama",
                      weight_files=(), weight_bytes=params * 2, parameters=params, dtypes=("BF16",),
                      tokenizer_files=("tokenizer.json",), chat_template=None, license=None)


CAL = TextFile(path=Path("cal.txt"), name="cal.txt", source="cal.txt", sha256="0" * 64, bytes=10_000)


def test_plan_names_and_sizes(tmp_path):
    p = pipeline.plan(fake_checkpoint(1_000_000_000), tmp_path, model_name="Big",
                      options=pipeline.LadderOptions(ladder="Q8_0,Q4_K_M", calibration=CAL))
    assert [f.path for f in p.files] == ["Big-Q8_0.gguf", "Big-Q4_K_M.gguf"]
    assert p.reference == "Big-BF16.gguf"
    q8, q4 = p.files
    assert q8.estimated_bytes > q4.estimated_bytes > 0 and not q8.split
    assert p.disk_needed == p.reference_bytes + q8.estimated_bytes + q4.estimated_bytes
    text = p.describe()
    assert "Big-Q4_K_M.gguf" in text and "disk" in text and "cal.txt" in text


def test_large_files_are_planned_as_splits(tmp_path):
    p = pipeline.plan(fake_checkpoint(70_000_000_000), tmp_path, model_name="Huge",
                      options=pipeline.LadderOptions(ladder="Q8_0,Q2_K", calibration=CAL, split_max_bytes=45_000_000_000))
    q8, q2 = p.files
    assert q8.split and q8.path == "Huge-Q8_0/Huge-Q8_0-00001-of-00002.gguf"
    assert not q2.split and q2.path == "Huge-Q2_K.gguf"


def test_imatrix_types_refused_without_imatrix(tmp_path):
    with pytest.raises(NeedsImatrix) as ei:
        pipeline.plan(fake_checkpoint(10**9), tmp_path, model_name="M",
                      options=pipeline.LadderOptions(ladder="Q4_K_M,IQ2_XXS", imatrix=False))
    assert "IQ2_XXS" in str(ei.value)


def test_imatrix_needs_text(tmp_path):
    with pytest.raises(InputError):
        pipeline.plan(fake_checkpoint(10**9), tmp_path, model_name="M",
                      options=pipeline.LadderOptions(ladder="Q4_K_M", calibration=None))


@pytest.mark.parametrize("source,name", [("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
                                         ("/data/models/My Model/", "My-Model")])
def test_model_name(source, name):
    assert pipeline.model_name_for(source) == name


@pytest.mark.parametrize("options,text", [
    (dict(jobs=0), "jobs must be at least 1"),
    (dict(split_max_bytes=10), "split size"),
    (dict(calibration=TextFile(path=Path("c.txt"), name="c.txt", source="c.txt", sha256="0" * 64, bytes=100)),
     "too short"),
])
def test_bad_options(tmp_path, options, text):
    with pytest.raises(InputError) as ei:
        pipeline.plan(fake_checkpoint(10**9), tmp_path, model_name="M",
                      options=pipeline.LadderOptions(**{"ladder": "Q8_0", "calibration": CAL, **options}))
    assert text in str(ei.value)
