"""The unit tests mirror guest_agent/: tests/unit/<package>/ holds a package's tests, this
directory those of the top-level modules and of the repository as a whole (docs, lint, the
import graph). Their shared fakes (handler_fakes.py, cli_env.py) are here: pytest puts this
directory on sys.path for this conftest, so every test below imports them by name."""
