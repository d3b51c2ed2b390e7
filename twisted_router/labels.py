"""
Which checkpoint each weight-version label names.

A trainer tells its samples apart by C{X-Weight-Version}; if two different
checkpoints were both served as C{"7"}, it could not. So the router keeps,
for every label the fleet has been refitted to, the C{model_path} it named,
and refuses a refit that reuses a label for another checkpoint. The same
checkpoint under the same label is a retry (after a partial failure, say)
and is allowed. Pure bookkeeping, no I/O.
"""

from __future__ import annotations

#: The label of the weights the workers were started with. The router never
#: learns their path, so no refit may take it.
STARTUP_LABEL = "0"


class WeightLabels:
    """The checkpoint (C{model_path}) each used weight-version label names."""

    def __init__(self) -> None:
        self._paths: dict[str, str] = {}

    def conflict(self, label: str, model_path: str) -> str | None:
        """
        Why a refit to C{model_path} may not be labelled C{label}, or C{None}
        when it may (a new label, or the same checkpoint again).
        """
        if label == STARTUP_LABEL:
            return (
                f"weight_version {label!r} names the weights the workers were started with; "
                "label a refit with another version"
            )
        used = self._paths.get(label)
        if used is None or used == model_path:
            return None
        return (
            f"weight_version {label!r} already names checkpoint {used!r}; a refit to {model_path!r} "
            "needs a new weight_version so that samples from the two can be told apart"
        )

    def record(self, label: str, model_path: str) -> None:
        """The fleet now serves C{model_path} as C{label}."""
        self._paths[label] = model_path

    def next_free(self, start: int, model_path: str) -> str:
        """
        The label for a refit that gave none: the counter C{start}, or the
        next number after it that does not already name another checkpoint.
        """
        number = max(start, 1)
        while self.conflict(str(number), model_path) is not None:
            number += 1
        return str(number)

    def items(self) -> list[tuple[str, str]]:
        """Every used label and its checkpoint, in the order they were first used (for the state file)."""
        return list(self._paths.items())

    def __len__(self) -> int:
        return len(self._paths)
