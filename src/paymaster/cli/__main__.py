"""``python -m paymaster.cli``: the ``paymaster`` command."""

from . import main

main()
