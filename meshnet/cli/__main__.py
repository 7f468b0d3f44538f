"""`python -m meshnet.cli ...` is `meshnetctl ...` (scripts/dry-run runs it so, without the venv's script)."""

from meshnet.cli import run

run()
