"""What validation reports: one issue per problem, with its key path, file position, given value and what is allowed."""

from __future__ import annotations

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
