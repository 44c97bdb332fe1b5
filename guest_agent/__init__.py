"""guest-agent: mounts a microVM guest's shares, volumes and /nix/store overlay at early boot."""

__version__ = "0.1.0"
