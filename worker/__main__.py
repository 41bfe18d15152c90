"""`python -m forseti.worker` runs the `forseti` command."""

from .cli import main

main()
