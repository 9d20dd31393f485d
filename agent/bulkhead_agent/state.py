"""What the agent knows about itself at run time, shared by main and the services."""

from __future__ import annotations

from dataclasses import dataclass, field

from bulkhead_agent.settings import Settings


@dataclass
class AgentState:
    settings: Settings
    started_ms: float  # CLOCK_BOOTTIME ms at the first line of main()
    ready_ms: float = 0.0  # when health turned SERVING; 0 until then
    features: list[str] = field(default_factory=list)
