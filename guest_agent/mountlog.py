"""What this run mounted: `MountLog`, defined in guest_agent.handlers.base (one module
fewer for the boot path to import) and re-exported here."""

from __future__ import annotations

from guest_agent.handlers.base import MountLog

__all__ = ["MountLog"]
