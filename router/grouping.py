"""GroupPlanner: which queued items the forwarder sends together in one infer_group request.

It also learns whether the cloud reads tensors as bytes (the v2 binary tensor extension), which
the drain and live escalations then use. Groups are sized within the agent's own bounds (`drain_group_items`, `drain_group_bytes`) and
the cloud's, which it states in its server metadata (`GET /v2`); a cloud that does not list the
extension gets one request per item, as any v2 server takes them. A group the cloud finds too
large (413: its answers would pass the cloud's answer limit) halves the groups that follow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model_runtime.infer_group import GROUP_EXTENSION
from model_runtime.v2_binary import BINARY_EXTENSION
from router.clock import Clock
from router.queue_schema import QueuedItem

__all__ = ["GroupLimits", "GroupPlanner"]

_ENTRY_BYTES = 40
"""The group header's bytes per item besides its key: {"key":"","bytes":123456},"""
_RECHECK_S = 3600.0
"""How long what the cloud said about groups is trusted (a gateway may be upgraded)."""
_RETRY_S = 60.0
"""How soon to ask again when the question could not be asked."""


@dataclass(frozen=True, slots=True)
class GroupLimits:
    max_items: int
    max_body_bytes: int


class GroupPlanner:
    def __init__(self, max_items: int, max_bytes: int, clock: Clock) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._clock = clock
        self.limits: GroupLimits | None = None
        """The cloud's limits on groups; None: it takes none, or it is not known yet."""
        self.binary = False
        """The cloud reads tensors as bytes (the v2 binary tensor extension)."""
        self._check_at = -math.inf
        self._shrunk = max_items

    @property
    def enabled(self) -> bool:
        return self.max_items > 1

    def needs_check(self) -> bool:
        return self.enabled and self._clock.monotonic() >= self._check_at

    def learn(self, metadata: Mapping[str, Any] | None) -> None:
        """What `GET /v2` answered (None: it could not be asked, ask again soon)."""
        now = self._clock.monotonic()
        if metadata is None:
            self._check_at = now + _RETRY_S
            return
        self._check_at = now + _RECHECK_S
        extensions = metadata.get("extensions")
        self.binary = isinstance(extensions, list) and BINARY_EXTENSION in extensions
        limits = metadata.get(GROUP_EXTENSION)
        if not isinstance(extensions, list) or GROUP_EXTENSION not in extensions:
            self.limits = None
            return
        limits = limits if isinstance(limits, Mapping) else {}
        self.limits = GroupLimits(
            _positive(limits.get("max_items"), self.max_items),
            _positive(limits.get("max_body_bytes"), self.max_bytes),
        )

    def forget(self) -> None:
        """The cloud refused a group as if it knew no such thing: ask it again first."""
        self.limits = None
        self.binary = False
        self._check_at = -math.inf

    def shrink(self, refused_size: int) -> None:
        """A group of `refused_size` items was too large for the cloud: halve the next ones."""
        self._shrunk = max(1, min(self._shrunk, refused_size // 2))

    @property
    def items_per_group(self) -> int:
        if self.limits is None or not self.enabled:
            return 1
        return max(1, min(self.max_items, self.limits.max_items, self._shrunk))

    def plan(self, items: Sequence[QueuedItem]) -> list[list[QueuedItem]]:
        """`items` split into groups, in order, each of one model, within the item and byte
        bounds (an item larger than the byte bound goes alone)."""
        size = self.items_per_group
        if size == 1:
            return [[item] for item in items]
        byte_cap = min(self.max_bytes, self.limits.max_body_bytes if self.limits else 0)
        open_groups: dict[str, tuple[list[QueuedItem], int]] = {}
        groups: list[list[QueuedItem]] = []
        for item in items:
            cost = len(item.payload) + len(item.ticket) + _ENTRY_BYTES
            group, used = open_groups.get(item.model, ([], 0))
            if group and (len(group) >= size or used + cost > byte_cap):
                group, used = [], 0
            if not group:
                groups.append(group)
            group.append(item)
            open_groups[item.model] = (group, used + cost)
        return groups


def _positive(value: object, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return default
