"""What validation reports: one issue per problem, with its key path, file position, given value and what is allowed."""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

from finetune.config.knobs import Path
from finetune.config.loading import Location

GIVEN_MAX = 80

Locator = Callable[[Path], Location]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config: where (key path and file position), what was given, what is allowed."""

    path: str
    location: str
    message: str
    given: str | None = None
    allowed: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        text = f"{self.location}: {self.path}: {self.message}"
        if self.given is not None:
            text += f"\n    given: {self.given}"
        if self.allowed:
            text += f"\n    allowed: {self.allowed}"
        return text


class ConfigInvalid(Exception):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= GIVEN_MAX else text[: GIVEN_MAX - 3] + "..."


MAX_LISTED_CHOICES = 12


def _choices(expected: str) -> list[str]:
    """The names in pydantic's "'a', 'b' or 'c'"."""
    return re.findall(r"'([^']*)'", expected)


def did_you_mean(given: Any, expected: str) -> str:
    """'; did you mean 'LORA'?' for `lora` (case and - or _ aside first, then a close spelling); '' if none."""
    if not isinstance(given, str):
        return ""
    choices = _choices(expected)

    def folded(text: str) -> str:
        return re.sub(r"[-_ ]", "", text).lower()

    same = [choice for choice in choices if folded(choice) == folded(given)]
    close = same or [choice for choice in choices if folded(choice) in difflib.get_close_matches(
        folded(given), [folded(c) for c in choices], n=1, cutoff=0.75)]
    return f"; did you mean '{close[0]}'?" if close and close[0] != given else ""


def short_choices(expected: str) -> str:
    """The allowed names, or their number and where they are listed when there are many."""
    choices = _choices(expected)
    return expected if len(choices) <= MAX_LISTED_CHOICES else f"{len(choices)} values, see docs/config-reference.md"
