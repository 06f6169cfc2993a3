"""The one repo-name function (:func:`repo_name`): the target repo of a model or of a variant, from the
``target.repo_template`` / ``target.variant_repo_template`` settings. Pure, below every layer: the settings check
their templates with it when they are loaded, publishing names its repo with it."""

from __future__ import annotations

import re

from converters.core.errors import ConfigError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]{1,96}")


def repo_name(template: str, *, namespace: str, model: str, author: str | None = None,
              variant: str | None = None) -> str:
    """The one repo-name template function: ``{org}`` (the target namespace), ``{model}`` (the model name),
    ``{author}`` (the source repo's owner, default the namespace) and, for a variant's repo, ``{variant}`` (the
    recipe). A template without the namespace (settings' ``{model}-GGUF``) is put under ``namespace``."""
    if variant is not None:
        return _variant_repo_name(template, namespace=namespace, model=model, variant=variant)
    try:
        name = template.format(org=namespace, model=model, author=author or namespace)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"bad repo name template {template!r}: {e}; use {{org}}, {{model}}, {{author}}",
                          key="target.repo_template") from None
    if "/" not in name:
        name = f"{namespace}/{name}"
    return name


def _variant_repo_name(template: str, *, namespace: str, model: str, variant: str) -> str:
    """A variant's repo, e.g. ``acme/SmolLM2-135M-Instruct-prune-25pct-kd-GGUF``: the template must name the
    namespace, the model and the variant (a variant never lands in its teacher's repo)."""
    for name in ("{org}", "{model}", "{variant}"):
        if name not in template:
            raise ConfigError(f"variant repo pattern {template!r} must contain {name}",
                              key="target.variant_repo_template")
    try:
        rid = template.format(org=namespace, model=model, variant=variant)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"only {{org}}, {{model}} and {{variant}} may be used ({e})",
                          key="target.variant_repo_template") from None
    if not REPO_ID.fullmatch(rid):
        raise ConfigError(f"variant repo id {rid!r} is not a valid Hub repo id", key="target.variant_repo_template")
    return rid
