"""The boot switches every target reads, in one table (docs/reference.md, "Switches").

Pure data: the agent's command-line parser warns about the old spellings from
it, and the initrd hooks' shell test is generated from it, so every target
reads the same words the same way.
"""

from __future__ import annotations

# guest-agent=<bool>: run the agent in this boot or not. rd. is dracut's and
# systemd's spelling for initrd-only parameters; both are read everywhere.
SWITCH_KEYS = ("guest-agent", "rd.guest-agent")
# guest-agent.onfail=<policy>: what the boot does when a required mount failed.
ONFAIL_KEYS = ("guest-agent.onfail", "rd.guest-agent.onfail")
ONFAIL_VALUES = ("continue", "shell")

TRUE_WORDS = ("1", "yes", "on", "true")
FALSE_WORDS = ("0", "no", "off", "false")

# Old spellings: still read, with a warning naming the new one, for one release.
DEPRECATED = {
    "guest_agent": "guest-agent",
    "rd.guest_agent": "rd.guest-agent",
    "guest_agent.onfail": "guest-agent.onfail",
    "rd.guest_agent.onfail": "rd.guest-agent.onfail",
}
