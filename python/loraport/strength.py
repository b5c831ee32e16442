"""Strength: a factor folded into a ported LoRA's update, ΔW_out = S · ΔW (S may be negative).

What users retune by hand after an upgrade (a strength per Wan 2.2 expert, per block), written
into the file so that a loader at strength 1 gives it. A specification is a float (every module),
or rules (regex, S) applied to the module names in the LoRA's own naming (what the report's
``module`` column shows, e.g. ``double_blocks.3.img_attn_qkv`` or ``blocks.7.attn1.to_q``),
with ``re.search``. A module's strength is that of the LAST rule whose regex matches it, else the
plain value (default 1): ``--strength 0.8 --strength 'double_blocks\\.(1[0-9])\\.=1.2'``.

The factor multiplies the float32 ``up`` factor once, before it is cast to the output's dtype:
the same single rounding the output's dtype already costs (and none at all when S is a power of
two)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .errors import InputError


class Strength:
    """A parsed strength specification: a plain value and ordered (regex, S) rules."""

    def __init__(self, spec=None):
        self.default = 1.0
        self.rules: list[tuple[str, float]] = []
        if spec is None:
            return
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            self.default = _value(spec, "strength")
            return
        items = list(spec.items()) if isinstance(spec, Mapping) else list(spec) if not isinstance(spec, str) else [spec]
        for item in items:
            if isinstance(item, str):
                self._add_text(item)
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                self.default = _value(item, "strength")
            else:
                try:
                    pattern, value = item
                except (TypeError, ValueError):
                    raise InputError(
                        f"loraport: strength entry {item!r} is not a number, 'S', 'REGEX=S' or (regex, S)"
                    ) from None
                self._add_rule(str(pattern), value)

    def _add_text(self, text: str) -> None:
        pattern, sep, value = text.rpartition("=")
        if not sep:
            self.default = _value(text, "strength")
        else:
            self._add_rule(pattern, value)

    def _add_rule(self, pattern: str, value) -> None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"loraport: strength rule {pattern!r}: not a regular expression ({e})") from None
        self.rules.append((pattern, _value(value, f"strength rule {pattern!r}")))

    def __call__(self, module_name: str) -> float:
        for pattern, value in reversed(self.rules):
            if re.search(pattern, module_name):
                return value
        return self.default

    def to_dict(self) -> dict:
        """{"default": S, "rules": [[regex, S], ...]}: the report's setting and the output's
        ``loraport.strength`` metadata (as JSON)."""
        return {"default": self.default, "rules": [[p, v] for p, v in self.rules]}

    @classmethod
    def from_dict(cls, doc: dict) -> Strength:
        out = cls(doc["rules"])
        out.default = float(doc["default"])
        return out


def _value(value, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"loraport: {what}: {value!r} is not a number") from None
    if not math.isfinite(out):
        raise InputError(f"loraport: {what}: {value!r} is not finite")
    return out
