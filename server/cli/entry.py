"""A console-script entry that starts customer commands in about 2 s.

Importing ``server.cli.main`` (every operator command; torch and peft among their
imports) takes some 15 s more, which a customer's ``loraplex --url ... adapters list``
does not need: this module looks at the command line first (``remote_commands``) and
imports ``server.cli.main`` only for an operator command. ``python -m server.cli.entry``
runs it.
"""

from __future__ import annotations

import sys

from server.cli import remote_commands


def main() -> None:
    argv = sys.argv[1:]
    if remote_commands.wants_remote(argv):
        sys.exit(remote_commands.main(argv))
    from server.cli.main import main as operator_main

    sys.exit(operator_main(argv))


if __name__ == "__main__":
    main()
