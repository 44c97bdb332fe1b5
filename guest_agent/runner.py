"""Running a plan: `Runner`, defined in guest_agent.handlers beside `handler_for` (one
module fewer for the boot path to import) and re-exported here."""

from __future__ import annotations

from guest_agent.handlers import Runner

__all__ = ["Runner"]
