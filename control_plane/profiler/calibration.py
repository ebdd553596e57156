"""The calibration prompts the profiler measures quality on.

`calibration.jsonl` (next to this file) holds a small bundled set written for Tandem: chat
questions, a multi-turn chat, reasoning, code to explain and to review, extraction, and
documents to summarise, from ~50 to ~1,500 tokens under the SmolLM2 chat template. No
external dataset, so the profile library is reproducible offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CALIBRATION_FILE = Path(__file__).with_name("calibration.jsonl")


@dataclass(frozen=True)
class CalibrationPrompt:
    id: str
    kind: str
    messages: tuple[dict[str, str], ...]

    @property
    def chars(self) -> int:
        return sum(len(message["content"]) for message in self.messages)


def load_prompts(path: Path | None = None) -> list[CalibrationPrompt]:
    prompts = []
    for line_number, line in enumerate((path or CALIBRATION_FILE).read_text().splitlines(), 1):
        if not line.strip():
            continue
        data: dict[str, Any] = json.loads(line)
        try:
            messages = tuple({"role": m["role"], "content": m["content"]} for m in data["messages"])
            prompts.append(CalibrationPrompt(str(data["id"]), str(data.get("kind", "")), messages))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"calibration prompt on line {line_number} is malformed: {exc}") from None
    return prompts


def select_prompts(prompts: list[CalibrationPrompt], count: int, spread: bool = True) -> list[CalibrationPrompt]:
    """`count` prompts, shortest first. With `spread`, evenly spaced over the length range
    (the shortest and the longest included), so a small count still covers short chats and
    long documents; without it, simply the `count` shortest (the cheap --quick set)."""
    if count <= 0:
        raise ValueError("need at least one calibration prompt")
    ordered = sorted(prompts, key=lambda p: p.chars)
    if count >= len(ordered):
        return ordered
    if not spread or count == 1:
        return ordered[:count]
    last = len(ordered) - 1
    picks = sorted({round(i * last / (count - 1)) for i in range(count)})
    return [ordered[i] for i in picks]
