"""Vision-language models (converters.llama.mmproj): acceptance, the ladder record, the test image, the embeddings check's
reader, and what the card and publishing do with projector files. No llama.cpp here (tests/integration/test_vlm.py
runs it)."""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import pytest

from bot.publish import card, source_card
from bot.publish import commit as publish
from converters.formats import checkpoint as ck
from converters.llama import mmproj
from converters.core import artifacts
from converters.core.errors import UnsupportedModel
from converters.core.report import Check
from converters.core.workdir import Ladder, ProjectorFile, WorkDir
from tests.unit.test_checkpoint import make
from tests.workdirs import make_workdir

VLM_CONFIG = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {"hidden_size": 8, "num_hidden_layers": 1}, "vision_config": {"hidden_size": 8}}
CONVERTER = ('TEXT_MODEL_MAP: dict[str, str] = {"Gemma3ForConditionalGeneration": "gemma", '
             '"PaddleOCRVLForConditionalGeneration": "ernie", "LlamaForCausalLM": "llama"}\n'
             'MMPROJ_MODEL_MAP: dict[str, str] = {"Gemma3ForConditionalGeneration": "gemma"}\n')


@pytest.fixture
def converter(tmp_path: Path) -> Path:
    root = tmp_path / "converter"
    (root / "conversion").mkdir(parents=True)
    (root / "conversion" / "__init__.py").write_text(CONVERTER)
    return root


def test_projector_architectures_are_read_from_the_converter_source(converter: Path) -> None:
    assert ck.supported_projectors(converter) == {"Gemma3ForConditionalGeneration"}
    assert ck.supported_architectures(converter) == {"Gemma3ForConditionalGeneration",
                                                     "PaddleOCRVLForConditionalGeneration", "LlamaForCausalLM"}


def test_projector_architectures_of_a_single_file_converter(tmp_path: Path) -> None:
    (tmp_path / "convert_hf_to_gguf.py").write_text(
        '@ModelBase.register("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")\nclass Gemma3Model(TextModel):\n'
        '    pass\n\n@ModelBase.register("Gemma3ForConditionalGeneration")\nclass Gemma3VisionModel(MmprojModel):\n'
        '    pass\n\n@ModelBase.register("Qwen2VLModel", "Qwen2VLForConditionalGeneration")\n'
        'class Qwen2VLVisionModel(MmprojModel):\n    pass\n')
    assert ck.supported_projectors(tmp_path) == {"Gemma3ForConditionalGeneration", "Qwen2VLModel",
                                                 "Qwen2VLForConditionalGeneration"}
    assert ck.supported_projectors(tmp_path / "nowhere") is None


@pytest.mark.parametrize("arch", ["PaddleOCRVLForConditionalGeneration",  # text part known, vision tower not
                                  "PaliGemmaForConditionalGeneration"])  # neither
def test_a_vision_tower_the_converter_cannot_export_is_refused_with_a_reason(tmp_path, converter, arch) -> None:
    d = make(tmp_path, config={**VLM_CONFIG, "architectures": [arch]})
    with pytest.raises(UnsupportedModel) as e:
        ck.inspect(d, supported=ck.supported_architectures(converter), projectors=ck.supported_projectors(converter))
    assert str(e.value) == (f"vision-language model {arch}: the pinned llama.cpp converter cannot convert its vision "
                            "tower (no --mmproj support), so its projector could not be published")


def test_a_supported_vision_language_model_and_a_text_model_are_accepted(tmp_path, converter) -> None:
    kw = {"supported": ck.supported_architectures(converter), "projectors": ck.supported_projectors(converter)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    vlm = ck.inspect(make(tmp_path / "a", config=VLM_CONFIG), **kw)
    text = ck.inspect(make(tmp_path / "b"), **kw)
    assert (vlm.vision, text.vision) == (True, False)
    assert ck.vision_refusal("LlamaForCausalLM", {"architectures": ["LlamaForCausalLM"]}, frozenset()) is None


def test_ladder_json_lists_projectors_only_for_a_vision_model(tmp_path) -> None:
    wd = WorkDir(make_workdir(tmp_path))
    text_only = json.loads(wd.ladder_path.read_text())
    assert "projectors" not in text_only and wd.ladder().projectors == ()
    proj = ProjectorFile(type="F16", path="mmproj-Tiny-Instruct-F16.gguf", size=3, sha256="ab" * 32)
    wd.write_ladder(Ladder.from_json({**text_only, "projectors": [proj.to_json()]}))
    assert wd.ladder().projectors == (proj,)
    assert json.loads(wd.ladder_path.read_text())["projectors"] == [
        {"type": "F16", "path": "mmproj-Tiny-Instruct-F16.gguf", "size": 3, "sha256": "ab" * 32}]


def test_the_generated_test_image_is_a_png_of_the_stated_size() -> None:
    from PIL import Image

    img = Image.open(io.BytesIO(mmproj.test_png()))
    assert (img.format, img.mode, img.size) == ("PNG", "RGB", mmproj.IMAGE_SIZE)
    assert len(img.getcolors(maxcolors=1 << 16) or ()) > 100  # a picture, not a flat colour


def _dump(path: Path, values: list[float], n_tokens: int) -> Path:
    path.write_bytes(struct.pack("<ii", n_tokens, len(values) // n_tokens) + struct.pack(f"<{len(values)}f", *values))
    return path


def test_read_embeddings_counts_non_finite_values(tmp_path) -> None:
    good = mmproj.read_embeddings(_dump(tmp_path / "a", [1.0, -1.0, 3.0, 1.0], 2))
    assert good == {"n_tokens": 2, "n_embd": 2, "non_finite": 0, "mean": 1.0, "std": pytest.approx(math.sqrt(2)),
                    "min": -1.0, "max": 3.0}
    bad = mmproj.read_embeddings(_dump(tmp_path / "b", [1.0, math.nan, math.inf, 1.0], 1))
    assert bad["non_finite"] == 2 and bad["n_embd"] == 4
    (tmp_path / "c").write_bytes(struct.pack("<ii", 4, 4) + b"\0" * 8)  # says 16 floats, holds 2
    with pytest.raises(ValueError, match="does not hold 4 x 4 floats"):
        mmproj.read_embeddings(tmp_path / "c")


def _vlm_workdir(tmp_path: Path, check: Check) -> WorkDir:
    """A finished text work dir with two projector files added, and the report's projector check."""
    wd = WorkDir(make_workdir(tmp_path))
    ladder = wd.ladder()
    projs = []
    for qtype, payload in (("F16", b"GGUF mmproj f16"), ("Q8_0", b"GGUF mmproj q8")):
        p = wd.path / mmproj.projector_name(ladder.model_name, qtype)
        p.write_bytes(payload)
        projs.append(ProjectorFile(type=qtype, path=p.name, size=len(payload), sha256=""))
    ladder = Ladder.from_json({**ladder.to_json(), "projectors": [p.to_json() for p in projs]})
    wd.write_ladder(ladder)
    report = wd.report()
    report.checks[mmproj.CHECK] = check
    report.file_hashes.update(wd.content(ladder))  # the chart keeps its entry
    wd.write_report(report)
    return wd


def test_card_and_upload_list_the_projector_when_its_check_passed(tmp_path) -> None:
    wd = _vlm_workdir(tmp_path, Check.ok("2 projector file(s) load"))
    ladder, report = wd.ladder(), wd.report()
    files = publish.collect_files(wd, ladder, report)
    assert {"mmproj-Tiny-Instruct-F16.gguf", "mmproj-Tiny-Instruct-Q8_0.gguf"} <= set(files)
    publish.verified_hashes(wd, report, files)  # measured by the evaluation: publishable as they are
    facts = source_card.SourceFacts.from_checkpoint(Path(ladder.source.path), repo=ladder.source.repo)
    settings = card.CardSettings(repo_id="team/Tiny-Instruct-GGUF", quantized_by="team", hub_url="http://hub.test")
    ctx = card.build_context(ladder, report, facts, settings)
    assert ctx["projectors"]["main"] == "mmproj-Tiny-Instruct-F16.gguf"
    assert ctx["projectors"]["model_file"] == "Tiny-Instruct-Q4_K_M.gguf"
    text = card.render(ctx)
    assert "## Images: the vision projector" in text
    assert "| [mmproj-Tiny-Instruct-Q8_0.gguf](http://hub.test/team/Tiny-Instruct-GGUF/blob/main/" \
           "mmproj-Tiny-Instruct-Q8_0.gguf) | Q8_0 |" in text
    assert ("llama-mtmd-cli -m Tiny-Instruct-Q4_K_M.gguf --mmproj mmproj-Tiny-Instruct-F16.gguf --image photo.jpg"
            in text)
    assert "llama-server -m Tiny-Instruct-Q4_K_M.gguf --mmproj mmproj-Tiny-Instruct-F16.gguf" in text
    assert "| projector | passed |" in text


def test_a_q8_0_projector_that_failed_is_withheld_and_the_f16_one_published(tmp_path) -> None:
    files = [{"path": "mmproj-Tiny-Instruct-F16.gguf", "status": "passed"},
             {"path": "mmproj-Tiny-Instruct-Q8_0.gguf", "status": "failed", "detail": "cannot load"}]
    wd = _vlm_workdir(tmp_path, Check.ok("1 projector file(s) load; withheld: ...", files=files))
    ladder, report = wd.ladder(), wd.report()
    assert [p.type for p in artifacts.published_projectors(ladder, report)] == ["F16"]
    uploaded = publish.collect_files(wd, ladder, report)
    assert "mmproj-Tiny-Instruct-F16.gguf" in uploaded and "mmproj-Tiny-Instruct-Q8_0.gguf" not in uploaded


def test_a_projector_that_failed_its_check_is_not_published_and_blocks_the_model(tmp_path) -> None:
    from converters.ladder.evaluate import publishable

    failed = Check.fail("mmproj-Tiny-Instruct-Q8_0.gguf: 12 of 1024 image embedding values are not finite")
    wd = _vlm_workdir(tmp_path, failed)
    ladder, report = wd.ladder(), wd.report()
    assert not any(p.startswith("mmproj-") for p in publish.collect_files(wd, ladder, report))
    facts = source_card.SourceFacts.from_checkpoint(Path(ladder.source.path), repo=ladder.source.repo)
    settings = card.CardSettings(repo_id="team/Tiny-Instruct-GGUF", quantized_by="team", hub_url="http://hub.test")
    assert "vision projector" not in card.render(card.build_context(ladder, report, facts, settings))
    ok, why = publishable({**report.checks, mmproj.CHECK: failed})
    assert not ok and why == ["the vision projector does not work: " + failed.detail]
    assert publishable(report.checks | {mmproj.CHECK: Check.ok("loads")}) == (True, [])


@pytest.mark.parametrize("arch,why", [
    ("PaddleOCRVLForConditionalGeneration", "cannot convert its vision tower"),
    ("MysteryForCausalLM", "architecture MysteryForCausalLM is not supported by the pinned llama.cpp converter")])
def test_the_bots_job_refuses_what_the_converter_cannot_convert_at_inspect(tmp_path, converter, arch, why) -> None:
    """The bot's own job spec (not only `ggufbot convert`) checks the architecture and the vision tower against the
    pinned converter before any program runs."""
    import types

    from bot.model import settings as S
    from bot.jobs.job import JobSpec
    from converters.core.hooks import NULL_HOOKS
    from converters.ladder.job import InspectStage, JobContext

    spec = JobSpec.from_settings(S.from_mapping({}, env={}, free_disk=10**12), "acme/Model", "a" * 40,
                                 calibration=None, evaluation=None)
    assert spec.rules.check_architecture
    config = {**VLM_CONFIG, "architectures": [arch]} if "VL" in arch else {"architectures": [arch],
                                                                           "model_type": "mystery"}
    ctx = JobContext(workdir=tmp_path / "work", toolchain=types.SimpleNamespace(root=converter), hooks=NULL_HOOKS,
                     model_name="Model", checkpoint_dir=make(tmp_path, config=config))
    with pytest.raises(UnsupportedModel, match=why):
        InspectStage(spec.ladder, spec.rules).run(ctx)
