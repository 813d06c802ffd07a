"""``python -m edgemeta``: the command line."""

from edgemeta._console import main

main()
