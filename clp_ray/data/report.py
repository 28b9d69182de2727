"""What validating training data found: each bad record's problem, and the counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

MAX_LISTED = 20


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.reason}"


@dataclass
class ValidationReport:
    files: list[str]
    records: int = 0  # non-blank lines seen
    good: int = 0
    blank_lines: int = 0
    problems: list[Problem] = field(default_factory=list)  # one per bad record (its first problem)
    content_hash: str = ""
    rejects_path: Optional[str] = None
    duplicates: int = 0  # records identical to an earlier one
    on_duplicate: str = "keep"  # what loading does with them: keep | drop (error: they are problems)

    @property
    def bad(self) -> int:
        return len(self.problems)

    def counts(self) -> dict[str, int]:
        return dict(Counter(f"{p.field}: {p.reason.split(' (')[0]}" for p in self.problems).most_common())

    def text(self, limit: Optional[int] = MAX_LISTED) -> str:
        shown = self.problems if limit is None else self.problems[:limit]
        lines = [str(p) for p in shown]
        if limit is not None and self.bad > limit:
            lines.append(f"... and {self.bad - limit} more")
        lines.append(f"{len(self.files)} file(s), {self.records} records: {self.good} good, {self.bad} bad"
                     + (f", {self.blank_lines} blank lines ignored" if self.blank_lines else "")
                     + (f", {self.duplicates} duplicate(s) {'dropped' if self.on_duplicate == 'drop' else 'found'}"
                        if self.duplicates else ""))
        lines.extend(f"  {n:>6}  {what}" for what, n in self.counts().items())
        if self.rejects_path:
            lines.append(f"rejected lines written to {self.rejects_path}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "records": self.records, "good": self.good, "bad": self.bad,
                "duplicates": self.duplicates, "on_duplicate": self.on_duplicate,
                "problem_counts": self.counts(), "content_hash": self.content_hash, "rejects_path": self.rejects_path}
