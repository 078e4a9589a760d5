"""What Tamiyo's policies share about their configs (built by `esper.config.from_dict`)."""

from __future__ import annotations

import dataclasses


def settings_in_words(config: object) -> dict[str, str]:
    """A policy config's fields as strings (`Policy.settings()`, GetPolicyInfo)."""
    return {f.name: str(getattr(config, f.name)) for f in dataclasses.fields(config)}  # type: ignore[arg-type]
