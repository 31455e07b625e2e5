"""The pack's one error type. ComfyUI shows the message in its UI, so the message is the interface."""

from __future__ import annotations


class ConceptSplitError(ValueError):
    """Bad input to ConceptSplit: says what was wrong, what was seen, what was expected and how to fix it."""

    @classmethod
    def build(cls, problem: str, *, seen: str, expected: str, fix: str) -> "ConceptSplitError":
        """Compose the four parts into one message: `problem. Seen: …. Expected: …. Fix: …`."""
        parts = [problem.rstrip(".") + "."]
        parts.append(f"Seen: {seen.rstrip('.')}.")
        parts.append(f"Expected: {expected.rstrip('.')}.")
        parts.append(f"Fix: {fix.rstrip('.')}.")
        return cls(" ".join(parts))
