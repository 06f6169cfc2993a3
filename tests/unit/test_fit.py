"""Memory-budget files (issue 21 part 4): budgets parsed, KV cache and compute sized from the architecture, llama.cpp's
buffer lines read, the baseline and the largest context chosen, the publish rule, settings and the stage list."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.model import settings as S
from converters.core.errors import ConfigError, InputError, ParseError
from converters.core.report import FileResult, KldStats
from converters.formats import gguf_meta
from converters.ladder import budget
from converters.llama import memory

GB, GIB, MB, MIB = 10**9, 2**30, 10**6, 2**20


# ------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize("text,size,ctx,label", [
    ("16GB@32k", 16 * GB, 32768, "16GB-32k"),
    ("8 GiB @ 8k", 8 * GIB, 8192, "8GiB-8k"),
    ("500MB@4096", 500 * MB, 4096, "500MB-4k"),
    ("1.5gb@1000", int(1.5 * GB), 1000, "1.5GB-1000"),
    ("300MiB@2K", 300 * MIB, 2048, "300MiB-2k"),
    ("24.0GB@128k", 24 * GB, 131072, "24GB-128k"),
])
def test_budget_syntax(text: str, size: int, ctx: int, label: str) -> None:
    b = budget.parse(text)
    assert (b.bytes, b.ctx, b.label, b.type) == (size, ctx, label, f"fit-{label}")


@pytest.mark.parametrize("text", ["16GB", "16@32k", "16TB@8k", "GB@8k", "16GB@", "16GB@8m", "0GB@8k", "1GB@8",
                                  "-1GB@8k", "16 GB at 32k"])
def test_bad_budgets_say_the_syntax(text: str) -> None:
    with pytest.raises(InputError, match="16GB@32k|positive|at least 16"):
        budget.parse(text)


def test_the_same_budget_twice_is_refused() -> None:
    assert [b.label for b in budget.parse_all(["8GB@8k", "16GB@32k"])] == ["8GB-8k", "16GB-32k"]
    with pytest.raises(InputError, match="twice"):
        budget.parse_all(["8GB@8k", "8 GB @ 8k"])


# ------------------------------------------------------------------------------------------ KV cache
def smol() -> memory.Attention:
    """SmolLM2-135M: llama, 30 layers, 9 heads, 3 KV heads (GQA), head dim 64 from 576 / 9."""
    return memory.Attention.from_hparams({"arch": "llama", "n_layer": 30, "n_head": 9, "n_head_kv": 3,
                                          "n_embd": 576, "n_ff": 1536, "n_vocab": 49152, "n_ctx_train": 8192})


def test_llama_gqa_kv_matches_what_llama_cpp_allocated() -> None:
    a = smol()
    assert a.key_length == a.value_length == 64
    # llama.cpp (pinned tree) reported "CPU KV buffer size = 90.00 MiB" at -c 4096, 47.81 MiB with -ctk/-ctv q8_0,
    # 22.50 MiB at -c 1000 (padded to 1024 cells) and 720.00 MiB at 32k
    assert memory.kv_bytes(a, 4096) == 90 * MIB == 2 * 30 * 4096 * 3 * 64 * 2
    assert memory.kv_bytes(a, 4096, "q8_0") == 30 * 4096 * 2 * (192 // 32 * 34)
    assert round(memory.kv_bytes(a, 4096, "q8_0") / MIB, 2) == 47.81
    assert memory.kv_bytes(a, 1000) == 22.5 * MIB
    assert memory.kv_bytes(a, 32768) == 720 * MIB
    assert memory.kv_bytes_per_token(a) == 30 * 2 * 3 * 64 * 2


def test_sliding_window_layers_cache_only_their_window() -> None:
    # gemma3: five sliding layers of six (llama.cpp's default pattern), window from the file
    hp = {"arch": "gemma3", "n_layer": 12, "n_head": 4, "n_head_kv": 2, "key_length": 256, "value_length": 256,
          "sliding_window": 1024, "n_embd": 640, "n_ff": 2048, "n_vocab": 262144}
    a = memory.Attention.from_hparams(hp)
    assert a.swa_layers == (True,) * 5 + (False,) + (True,) * 5 + (False,)
    row = 2 * 256 * 2 * 2  # K and V, 2 KV heads, f16
    swa_cells = 1024 + 512  # window + n_ubatch, padded to 256
    assert memory.kv_bytes(a, 32768) == 2 * 32768 * row + 10 * swa_cells * row
    assert memory.kv_bytes(a, 1024) == 12 * 1024 * row  # a window larger than the context: the context
    assert memory.kv_bytes_per_token(a) == 2 * row  # only the full-attention layers grow
    # the file's own pattern wins over the default; a model without a window has none
    explicit = memory.Attention.from_hparams({**hp, "sliding_window_pattern": [True, False] * 6})
    assert sum(explicit.swa_layers) == 6
    assert memory.Attention.from_hparams({**hp, "sliding_window": 0}).window == 0


def test_gemma2_default_window_and_phi3_sliding_window_ignored() -> None:
    g2 = memory.Attention.from_hparams({"arch": "gemma2", "n_layer": 4, "n_head": 8, "n_head_kv": 4,
                                        "key_length": 256, "value_length": 256, "n_embd": 2304})
    assert g2.window == 4096 and g2.swa_layers == (True, False, True, False)
    # phi3's converter writes a sliding window llama.cpp turns off: a full cache on every layer
    phi = memory.Attention.from_hparams({"arch": "phi3", "n_layer": 2, "n_head": 4, "n_head_kv": 2,
                                         "n_embd": 256, "sliding_window": 128})
    assert phi.window == 0 and memory.kv_bytes(phi, 4096) == 2 * 4096 * 2 * 2 * 64 * 2


def test_mla_caches_the_latent_only() -> None:
    # DeepSeek-V3 as converted for llama.cpp's MLA: one KV head of 576 (kv_lora_rank 512 + 64 rope dims), no V
    hp = {"arch": "deepseek2", "n_layer": 61, "n_head": 128, "n_head_kv": 1, "key_length": 576,
          "value_length": 512, "key_length_mla": 192, "value_length_mla": 128, "n_embd": 7168}
    a = memory.Attention.from_hparams(hp)
    assert a.mla
    assert memory.kv_bytes(a, 4096) == 61 * 4096 * 576 * 2
    # the same numbers without MLA's keys: K and V per head
    assert memory.kv_bytes(memory.Attention.from_hparams({**hp, "key_length_mla": None}), 4096) == \
        61 * 4096 * (576 + 512) * 2


def test_per_layer_kv_heads_and_layers_without_attention() -> None:
    a = memory.Attention.from_hparams({"arch": "openelm", "n_layer": 3, "n_head": [4, 8, 8], "n_head_kv": [1, 2, 0],
                                       "key_length": 64, "value_length": 64, "n_embd": 512})
    assert memory.kv_bytes(a, 256) == 256 * (1 + 2) * 64 * 2 * 2
    with pytest.raises(InputError, match="3"):
        memory.Attention.from_hparams({"arch": "x", "n_layer": 3, "n_head": [4, 4], "n_embd": 256})
    with pytest.raises(InputError, match="KV cache type"):
        memory.kv_bytes(a, 256, "q3_k")


def test_kv_facts_read_from_gguf_metadata() -> None:
    K = gguf_meta.K
    arch = "gemma3"
    values = {K.General.ARCHITECTURE: arch, K.LLM.BLOCK_COUNT.format(arch=arch): 6,
              K.Attention.HEAD_COUNT.format(arch=arch): 4, K.Attention.HEAD_COUNT_KV.format(arch=arch): 1,
              K.Attention.KEY_LENGTH.format(arch=arch): 256, K.Attention.VALUE_LENGTH.format(arch=arch): 256,
              K.Attention.SLIDING_WINDOW.format(arch=arch): 512, K.LLM.EMBEDDING_LENGTH.format(arch=arch): 640,
              K.LLM.FEED_FORWARD_LENGTH.format(arch=arch): 2048, K.LLM.CONTEXT_LENGTH.format(arch=arch): 32768,
              K.Tokenizer.LIST: ["a", "b", "c"]}
    hp = gguf_meta.GgufMeta(path=Path("x.gguf"), values=values, data_offset=0, tensor_count=0).kv_hparams()
    a = memory.Attention.from_hparams(hp)
    assert (a.n_layer, a.n_head_kv, a.key_length, a.window, a.n_vocab, a.n_ctx_train) == \
        (6, (1,) * 6, 256, 512, 3, 32768)
    assert sum(a.swa_layers) == 5


def test_compute_estimate_is_above_what_llama_cpp_reserved() -> None:
    # SmolLM2 at 1k..32k with flash attention (llama.cpp's auto on the CPU): "CPU compute buffer size = 98.25 MiB"
    for ctx in (1024, 4096, 32768):
        est = memory.compute_bytes(smol(), ctx)
        assert 98.25 * MIB <= est <= 1.1 * 98.25 * MIB


LOG = """\
0.00.109.940 I load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
0.00.112.994 I llama_context: n_ctx                 = 4096
0.00.113.393 I llama_context:        CPU  output buffer size =     0.19 MiB
0.00.113.497 I llama_kv_cache_iswa: creating non-SWA KV cache, size = 4096 cells
0.00.113.497 I llama_kv_cache:        CPU KV buffer size =    90.00 MiB
0.00.113.497 I llama_kv_cache:        CPU KV buffer size =    10.00 MiB
0.00.186.701 I llama_kv_cache: size =   90.00 MiB (  4096 cells,  30 layers,  1/1 seqs), K (f16):   45.00 MiB
0.00.192.044 I sched_reserve:        CPU compute buffer size =    98.25 MiB
0.00.193.709 I generate: n_ctx = 4096, n_batch = 2048, n_predict = 1, n_keep = 0
"""


def test_buffer_lines_are_summed_per_kind() -> None:
    b = memory.parse_buffers(LOG)
    assert b.ctx == 4096 and b.devices == ("CPU_Mapped", "CPU")
    assert (b.model, b.kv, b.compute, b.output) == (round(92.10 * MIB), 100 * MIB, round(98.25 * MIB),
                                                     round(0.19 * MIB))
    assert b.total == b.model + b.overhead and b.to_json()["total"] == b.total
    with pytest.raises(ParseError, match="model buffer"):
        memory.parse_buffers("llama_context: n_ctx = 4096\n")


# ------------------------------------------------------------------------------------------ selection
def test_baseline_is_the_largest_that_fits_and_the_solver_budget() -> None:
    totals = {"Q8_0": 400 * MB, "Q4_K_M": 290 * MB, "IQ4_XS": 285 * MB, "Q2_K": 250 * MB}
    assert budget.largest_fitting(totals, 300 * MB) == "Q4_K_M"
    assert budget.largest_fitting(totals, 290 * MB) == "Q4_K_M"
    assert budget.largest_fitting(totals, 200 * MB) is None
    m = budget.margin(300 * MB)
    assert m == int(300 * MB * 0.005) + MIB
    assert budget.weight_budget(300 * MB, 190 * MB, 96 * MB) == 300 * MB - 190 * MB - m
    assert budget.weight_budget(300 * MB, 200 * MB, 99 * MB) == 99 * MB  # the baseline's layout stays possible


def test_largest_context() -> None:
    per_token = 23040  # SmolLM2's f16 KV bytes per token
    fixed = 200 * MB
    ctx = budget.max_context(300 * MB, fixed, per_token)
    assert ctx % 256 == 0 and fixed + ctx * per_token <= 300 * MB < fixed + (ctx + 256) * per_token
    assert budget.max_context(100 * MB, fixed, per_token) == 0


def _result(type_: str, kld: float, err: float, size: int, fit: dict | None = None) -> FileResult:
    stats = KldStats(*([1.0] * 10), None, kld, err, *([0.1] * 4), *([0.01] * 4), 0.9, 0.01, 8)
    return FileResult(type=type_, path=f"{type_}.gguf", size=size, bpw=None, bpw_nominal=None, stats=stats,
                      extra={"fit": fit} if fit is not None else {})


def test_the_memory_rule_of_a_fit_file() -> None:
    """The KLD comparison is the paired gate's (tests/unit/test_paired.py); the memory rule is the fit file's own."""
    from converters.ladder.evaluate import verdict

    fit = {"budget_bytes": 300 * MB, "ctx": 4096, "baseline": "Q4_K_M", "memory": {"total": 295 * MB}}
    assert budget.memory_reason(fit) is None
    assert "over the budget" in budget.memory_reason({**fit, "memory": {"total": 301 * MB}})
    assert "no stock file" in budget.memory_reason({**fit, "baseline": None})
    assert "not measured" in budget.memory_reason({**fit, "memory": {}})
    assert verdict.memory_reasons(_result("Q4_K_M", 0.05, 0.002, 100 * MB)) == []
    assert "missing" in verdict.memory_reasons(_result("fit-300MB-4k", 0.04, 0.002, 1))[0]


def test_the_verdict_withholds_a_fit_file_and_keeps_it_off_the_curve() -> None:
    from converters.ladder.evaluate import verdict

    fit = {"budget_bytes": 300 * MB, "ctx": 4096, "baseline": "Q4_K_M", "memory": {"total": 301 * MB}}
    files = [_result("Q8_0", 0.001, 0.0001, 140 * MB), _result("Q4_K_M", 0.05, 0.002, 100 * MB),
             _result("fit-300MB-4k", 0.04, 0.002, 104 * MB, fit)]
    reasons = verdict.gate(files)
    assert reasons["Q4_K_M"] == [] and any("over the budget" in r for r in reasons["fit-300MB-4k"])
    assert [p.key for p in verdict.curve_points(files)] == ["Q8_0", "Q4_K_M"]


# ------------------------------------------------------------------------------------------ settings, stages
def test_fit_settings_reach_the_job_spec_and_the_stage_list() -> None:
    from bot.jobs.job import JobSpec
    from converters.ladder import job, pipeline

    s = S.from_mapping({}, env={}, free_disk=10**12)
    assert s.quantize.fit == () and s.quantize.fit_kv_type == "f16"
    s2 = S.from_mapping({"quantize": {"fit": ["8GB@8k", "16GB@32k"], "fit_kv_type": "q8_0"}}, env={},
                        free_disk=10**12)
    spec = JobSpec.from_settings(s2, "acme/Model", "main", calibration=None, evaluation=None)
    assert spec.ladder.fit == ("8GB@8k", "16GB@32k") and spec.ladder.fit_kv_type == "q8_0"
    names = [st.name for st in job.ladder_stages(pipeline.LadderOptions(ladder="small", imatrix=False), None)]
    assert "fit" not in names
    names = [st.name for st in job.ladder_stages(pipeline.LadderOptions(ladder="small", imatrix=False, tune=("Q4_K_M",),
                                                                        fit=("8GB@8k",)), None)]
    assert names[names.index("tune") + 1] == "fit"


@pytest.mark.parametrize("quantize,key", [
    ({"fit": ["16GB"]}, "quantize.fit"),
    ({"fit": ["8GB@8k", "8GB@8k"]}, "quantize.fit"),
    ({"fit_kv_type": "q4_0"}, "quantize.fit_kv_type"),
])
def test_bad_fit_settings_name_the_key(quantize, key) -> None:
    with pytest.raises(ConfigError) as ei:
        S.from_mapping({"quantize": quantize}, env={}, free_disk=10**12)
    assert ei.value.key == key
