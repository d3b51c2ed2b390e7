"""
The task types of diffusion models, as the real worker names them.

The simulator serves them, the router reads them from C{/v1/models} to tell
image workers from video workers, and the launcher accepts them in its YAML:
one list, here, so the three cannot drift apart. Pure, no imports from the
rest of the package.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["IMAGE_TASK_TYPES", "VIDEO_INCAPABLE_TASK_TYPES", "TaskType"]


class TaskType(Enum):
    """
    The seven C{ModelTaskType} names of the real worker (§3.1).

    C{/v1/models} reports the name; the router decides video capability from
    it (L{VIDEO_INCAPABLE_TASK_TYPES}), so the simulator must only ever
    report one of these.
    """

    T2V = "T2V"
    I2V = "I2V"
    TI2V = "TI2V"
    T2I = "T2I"
    I2I = "I2I"
    TI2I = "TI2I"
    I2M = "I2M"

    @property
    def is_image_gen(self) -> bool:
        """C{True} for the image-generation types (the real C{is_image_gen})."""
        return self in _IMAGE_GEN_TASKS

    @property
    def requires_image_input(self) -> bool:
        """C{True} when a generation without an input image is a validation error."""
        return self in _REQUIRES_IMAGE_TASKS

    @property
    def accepts_image_input(self) -> bool:
        """C{True} when an input image is allowed at all."""
        return self in _ACCEPTS_IMAGE_TASKS

    @property
    def data_type(self) -> str:
        """C{"image"}, C{"video"} or C{"mesh"}: what the pipeline writes to disk."""
        if self.is_image_gen:
            return "image"
        if self is TaskType.I2M:
            return "mesh"
        return "video"


_IMAGE_GEN_TASKS = frozenset({TaskType.T2I, TaskType.I2I, TaskType.TI2I})
_REQUIRES_IMAGE_TASKS = frozenset({TaskType.I2V, TaskType.I2I, TaskType.I2M})
_ACCEPTS_IMAGE_TASKS = frozenset(
    {TaskType.I2V, TaskType.I2I, TaskType.TI2I, TaskType.TI2V, TaskType.I2M}
)

#: Task types (C{/v1/models} C{data[0].task_type}) of image models: the
#: router's image endpoints prefer these workers.
IMAGE_TASK_TYPES = frozenset(t.value for t in _IMAGE_GEN_TASKS)

#: Task types whose workers cannot serve C{/v1/videos}: the image types, and
#: C{I2M} (image-to-mesh), which an earlier router wrongly counted as
#: video-capable.
VIDEO_INCAPABLE_TASK_TYPES = IMAGE_TASK_TYPES | {TaskType.I2M.value}
