"""SIGHUP: which settings changed, and the running config with the reloadable ones applied.

Pure: both functions compare two loaded configs field by field against `config.RELOADABLE`.
"""

from __future__ import annotations

import dataclasses

from dgdm.agent.config import RELOADABLE, AgentConfig


def changed_settings(old: AgentConfig, new: AgentConfig) -> tuple[list[str], list[str]]:
    """Keys whose value differs, split into (reloadable, needs restart)."""
    changed = [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(old)
        for f in dataclasses.fields(getattr(old, section.name))
        if getattr(getattr(old, section.name), f.name)
        != getattr(getattr(new, section.name), f.name)
    ]
    return [k for k in changed if k in RELOADABLE], [k for k in changed if k not in RELOADABLE]


def merge_reloadable(old: AgentConfig, new: AgentConfig) -> AgentConfig:
    sections = {}
    for section in dataclasses.fields(old):
        current, fresh = getattr(old, section.name), getattr(new, section.name)
        updates = {
            f.name: getattr(fresh, f.name)
            for f in dataclasses.fields(current)
            if f"{section.name}.{f.name}" in RELOADABLE
        }
        sections[section.name] = dataclasses.replace(current, **updates)
    return dataclasses.replace(old, **sections)
