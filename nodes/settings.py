"""The config sections a node reads as they are: one typed schema for the controller and the nodes.

testbed.plan.config composes these into a run's configuration, and the controller copies them
unchanged into every node's config; a node reads them through these models, so a default is
written once, here, and the two sides cannot drift apart. Only what a node needs is here
(training hyper-parameters, time limits, fault-tolerance timing, how the data plane receives);
the rest of a run's configuration is the controller's. pydantic v2 validates: a wrong value
raises an error that names its field.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A config section: unknown fields refused, types strict (an int stands for a float),
    checked again on assignment."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class Train(Section):
    """How each node trains its segments."""

    batch_size: int = Field(32, gt=0, description="samples per client per step")
    lr: float = Field(0.05, gt=0, description="SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    iters_per_round: int | None = Field(
        None, gt=0, description="steps per round (null: one local epoch over the mean shard)")


class Timeouts(Section):
    """How long anyone waits, in seconds."""

    step_s: float = Field(300.0, gt=0, description="a node waiting for one message in a step")
    start_s: float = Field(180.0, gt=0, description="nodes starting and connecting")
    round_s: float = Field(3600.0, gt=0, description="the controller waiting for a round")


class Fault(Section):
    """Fault tolerance (docs/fault-tolerance.md)."""

    heartbeat_s: float = Field(0.5, gt=0, description="heartbeat period")
    heartbeat_misses: int = Field(10, gt=0, description="beats missed before a node is dead")
    max_restarts: int = Field(3, ge=0, description="node restarts a run may use (0: none)")


class Transport(Section):
    """How a node's data plane receives (docs/transport.md)."""

    reuse_receive_memory: bool = Field(
        True, description="received frames reuse freed heap memory instead of fresh pages "
                          "(glibc only; the node keeps its peak message memory)")
