"""`python -m tscompile` = the `tscompile` command."""
from .cli import main

main()
