"""No tests: the CLI's tests are in tests/cli/test_<module>.py. This keeps
``from tests.cli.test_cli import cli`` working for the modules that import it
from here until they import it from tests/cli/command.py."""

from tests.cli.command import cli

__all__ = ["cli"]
