"""Search spaces (genome ⇄ recipe): ``ps``, ``dfs``, ``hybrid``, ``task_vector``, ``model_archive``; see :mod:`.base`."""

from evomerge.spaces.base import (
    SPACES, ModelPool, Space, SpaceConfig, Stage, make_space, parent_recipes, parse_space_config,
    register_space,
)
from evomerge.spaces import dfs, hybrid, model_archive, ps, task_vector  # noqa: F401  (register the spaces)
from evomerge.spaces.dfs import DFSSpace
from evomerge.spaces.hybrid import HybridSpace
from evomerge.spaces.model_archive import ModelArchiveSpace
from evomerge.spaces.ps import PSSpace
from evomerge.spaces.task_vector import TaskVectorSpace

__all__ = [
    "SPACES", "ModelPool", "Space", "SpaceConfig", "Stage", "make_space", "parent_recipes",
    "parse_space_config", "register_space", "PSSpace", "DFSSpace", "HybridSpace", "TaskVectorSpace",
    "ModelArchiveSpace",
]
