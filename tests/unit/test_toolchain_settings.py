"""The ``[toolchain]`` settings section (bot/model/toolchain_settings.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.model.settings import from_mapping
from converters.core.errors import ConfigError


def settings(**toolchain):
    return from_mapping({"toolchain": toolchain}, env={}, free_disk=10**12)


def test_default_is_the_pinned_build_and_no_following():
    t = settings().toolchain
    assert (t.source, t.following, t.as_source().kind) == ("pinned", False, "pinned")


def test_git_and_dir_sources():
    t = settings(source="git", url="file:///srv/llama.cpp", ref="b6500").toolchain
    assert t.as_source().ref == "b6500" and t.release_source("b6501").ref == "b6501"
    assert settings(source="dir", path="/src/llama.cpp").toolchain.as_source().path == Path("/src/llama.cpp")


@pytest.mark.parametrize("values,key", [
    ({"source": "svn"}, "toolchain.source"),
    ({"follow": "nightly"}, "toolchain.follow"),
    ({"follow": "releases", "canary_repo": "o/m"}, "toolchain.url"),
    ({"follow": "releases", "url": "file:///x"}, "toolchain.canary_repo"),
    ({"canary_repo": "not a repo"}, "toolchain.canary_repo"),
    ({"follow_hours": 0}, "toolchain.follow_hours"),
    ({"unknown": 1}, "toolchain.unknown"),
])
def test_bad_values_name_the_key(values, key):
    with pytest.raises(ConfigError) as e:
        settings(**values)
    assert e.value.key == key or key in str(e.value)


def test_git_needs_a_url():
    with pytest.raises(ConfigError, match="needs url"):
        settings(source="git")
