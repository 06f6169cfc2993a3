"""Settings: defaults, the example file, validation errors that name the key, env overrides, the token."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bot.model import settings as S
from converters.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "ggufbot.example.toml"


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> S.Settings:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return S.load(p, env=env or {})


def test_defaults_without_a_file(tmp_path: Path) -> None:
    s = S.load(None, env={"GGUFBOT__DATA_DIR": str(tmp_path / "data")})
    assert s.data_dir == tmp_path / "data"
    assert s.database_url == f"sqlite:///{tmp_path / 'data' / 'ggufbot.db'}"
    assert [src.author for src in s.sources] == list(S.DEFAULT_AUTHORS)
    assert all(src.pipeline_tag == "text-generation" for src in s.sources)
    assert s.target.namespace is None  # resolved from the token at start
    assert s.max_model_bytes > 0  # a share of the free disk
    assert s.token is None and not s.will_publish


def test_auto_size_limit_follows_free_disk() -> None:
    s = S.from_mapping({}, env={}, free_disk=600_000_000_000)
    assert s.max_model_bytes == int(600_000_000_000 * S.AUTO_SIZE_FRACTION)
    s2 = S.from_mapping({"limits": {"max_model_gb": 3}}, env={}, free_disk=1)
    assert s2.max_model_bytes == 3_000_000_000


def test_example_file_loads(tmp_path: Path) -> None:
    s = S.load(EXAMPLE, env={})
    assert s.sources[0].author == "Qwen" and s.sources[2].key == "llama-search"
    assert s.filters.licenses_deny == ("cc-by-nc-nd-4.0",)
    assert s.config_path == EXAMPLE
    assert s.quantize.variants == () and s.target.variant_repo_template == "{org}/{model}-{variant}-GGUF"


@pytest.mark.parametrize("text,key", [
    ("colour = 1", "colour"),
    ("[limits]\nconcurency = 2", "limits.concurency"),
    ("[[sources]]\nauthor = 'a'\nauther = 'b'", "sources[0].auther"),
    ("[limits]\nconcurrency = 'two'", "limits.concurrency"),
    ("[limits]\nconcurrency = 0", "limits.concurrency"),
    ("[target]\npublish = 'yes'", "target.publish"),
    ("[target]\nrepo_template = '{name}-GGUF'", "target.repo_template"),
    ("[target]\nnamespace = 'bad name'", "target.namespace"),
    ("[quantize]\nladder = 'Q9_Z'", "quantize.ladder"),
    ("[quantize]\nouttype = 'q8'", "quantize.outtype"),
    ("[quantize]\nvariants = ['prune-25pct-kd', 'prune-99-layers']", "quantize.variants"),
    ("[quantize]\nvariants = 'prune-25pct-kd'", "quantize.variants"),
    ("[target]\nvariant_repo_template = '{org}/{model}-GGUF'", "target.variant_repo_template"),
    ("[target]\nvariant_repo_template = '{org}/{model}-{variant}-{size}'", "target.variant_repo_template"),
    ("[filters]\nlicenses_deny = 'mit'", "filters.licenses_deny"),
    ("[filters]\nmin_params = 10\nmax_params = 5", "filters.min_params"),
    ("[schedule]\nheartbeat_seconds = 100\nstale_after_seconds = 150", "schedule.stale_after_seconds"),
    ("[[sources]]\npipeline_tag = 'text-generation'", "sources[0]"),
    ("sources = 'Qwen'", "sources"),
    ("limits = 3", "limits"),
    ("database_url = 'not a url'", "database_url"),
])
def test_bad_settings_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_text(tmp_path, text)
    assert ei.value.key == key
    assert key in str(ei.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_text(tmp_path, "[limits\n")
    with pytest.raises(ConfigError, match="does not exist"):
        S.load(tmp_path / "nope.toml", env={})


@pytest.mark.parametrize("env,check", [
    ({"GGUFBOT_LIMITS__CONCURRENCY": "3"}, lambda s: s.limits.concurrency == 3),
    ({"GGUFBOT_TARGET__PUBLISH": "false"}, lambda s: s.target.publish is False),
    ({"GGUFBOT_FILTERS__LICENSES_DENY": "mit, gpl-3.0"}, lambda s: s.filters.licenses_deny == ("mit", "gpl-3.0")),
    ({"GGUFBOT_LIMITS__MAX_MODEL_GB": "2.5"}, lambda s: s.max_model_bytes == 2_500_000_000),
    ({"GGUFBOT_TARGET__NAMESPACE": "me"}, lambda s: s.target.namespace == "me"),
    ({"GGUFBOT_QUANTIZE__VARIANTS": "prune-25pct-kd, prune-4-layers"},
     lambda s: s.quantize.variants == ("prune-25pct-kd", "prune-4-layers")),
    ({"GGUFBOT__DATABASE_URL": "postgresql+psycopg://h/db"}, lambda s: s.database_url.startswith("postgresql")),
    ({"GGUFBOT_CACHE": "/x", "GGUFBOT_CUDA": "0"}, lambda s: True),  # other parts' variables are not settings
])
def test_env_overrides(tmp_path: Path, env: dict[str, str], check) -> None:
    s = load_text(tmp_path, "[limits]\nconcurrency = 1\n", env=env)
    assert check(s)


@pytest.mark.parametrize("env,key", [
    ({"GGUFBOT_LIMITS__CONCURRENCY": "many"}, "limits.concurrency"),
    ({"GGUFBOT_LIMITS__NOPE": "1"}, "limits.nope"),
    ({"GGUFBOT_NOSECTION__X": "1"}, "nosection"),
    ({"GGUFBOT_TARGET__PUBLISH": "maybe"}, "target.publish"),
    ({"GGUFBOT_QUANTIZE__VARIANTS": "prune-4-layers,no-such-recipe"}, "quantize.variants"),
    ({"GGUFBOT__COLOUR": "red"}, "colour"),
])
def test_bad_env_names_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        S.load(None, env=env)
    assert ei.value.key == key


def test_env_beats_file(tmp_path: Path) -> None:
    s = load_text(tmp_path, "[limits]\nconcurrency = 2\n", env={"GGUFBOT_LIMITS__CONCURRENCY": "4"})
    assert s.limits.concurrency == 4


def test_token_is_read_and_never_shown(tmp_path: Path) -> None:
    tok = "hf_secretsecretsecret"
    s = S.load(None, env={"HF_TOKEN": tok})
    assert s.token == tok and s.will_publish
    assert tok not in repr(s) and tok not in str(s.describe())
    assert s.describe()["token_set"] is True
    f = tmp_path / "tok"
    f.write_text(tok + "\n")
    s2 = load_text(tmp_path, f"[hub]\ntoken_file = '{f}'\n")
    assert s2.token == tok
    with pytest.raises(ConfigError) as ei:
        load_text(tmp_path, f"[hub]\ntoken_file = '{tmp_path / 'missing'}'\n")
    assert ei.value.key == "hub.token_file"


def test_frozen_and_exclusions() -> None:
    s = S.from_mapping({"filters": {"exclude_patterns": ["*-Base", "evil/*"]}}, env={}, free_disk=10**12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.limits = S.Limits()  # type: ignore[misc]
    assert s.excluded("Org/Model-7B-base") == "*-Base"
    assert s.excluded("EVIL/thing") == "evil/*"
    assert s.excluded("Org/Model-7B-Instruct") is None


def test_duplicate_sources_need_names() -> None:
    with pytest.raises(ConfigError) as ei:
        S.from_mapping({"sources": [{"author": "a"}, {"author": "a"}]}, env={}, free_disk=1)
    assert ei.value.key == "sources"
    s = S.from_mapping({"sources": [{"author": "a"}, {"author": "a", "name": "a2", "search": "x"}]}, env={},
                       free_disk=1)
    assert [x.key for x in s.sources] == ["author=a;pipeline_tag=text-generation", "a2"]
