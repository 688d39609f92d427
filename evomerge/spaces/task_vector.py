"""Task-vector space: one coefficient per expert, θ = θ0 + Σ c_k τ_k (the MAP setting).

A parameter-space search at ``global`` granularity with a single searched parameter (the
operator's ``weight``); kept as its own space because it is what MAP surrogates and most users
mean by "merge coefficients", and its genome is exactly the coefficient vector c.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from evomerge.spaces.base import ModelPool, SpaceConfig, register_space
from evomerge.spaces.ps import ParamSpec, PSConfig, PSSpace


class TaskVectorConfig(SpaceConfig):
    type: Literal["task_vector"] = "task_vector"
    operator: str = "task_arithmetic"
    bounds: tuple[float, float] = (0.0, 2.0)
    init: float = 0.5
    fixed: dict[str, Any] = Field(default_factory=dict)  # other per-model parameters (e.g. density)
    options: dict[str, Any] = Field(default_factory=dict)
    experts: list[str] | None = None

    def merge_methods(self) -> tuple[str, ...]:
        return (self.operator,)


@register_space("task_vector", TaskVectorConfig)
class TaskVectorSpace(PSSpace):
    def __init__(self, config: TaskVectorConfig, pool: ModelPool):
        self.tv_config = config
        ps = PSConfig(
            operator=config.operator, granularity="global", decimals=config.decimals,
            parameters={"weight": ParamSpec(bounds=config.bounds, init=config.init)},
            fixed=config.fixed, options=config.options, experts=config.experts,
        )
        super().__init__(ps, pool)
        self.names = [f"c[{e}]" for e in self.experts]

    def describe(self) -> str:
        return f"task_vector space: {self.operator.name}, one coefficient per expert = {self.dim} genes"
