"""`python -m casm_deploy ...` runs the CLI (also what torchrun launches)."""

from casm_deploy.cli import main

main()
