"""``python -m edgemeta``: the command line."""

from edgemeta.cli import main

main()
