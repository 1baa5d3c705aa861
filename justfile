# The README's two commands, and the checks CI runs beside them.

venv := ".venv"
py := venv / "bin/python"

# Install castore and run the demo (the README's first command).
demo:
    python3 -m venv {{venv}} && {{venv}}/bin/pip install . && {{venv}}/bin/castore demo

# Install the test dependencies and run the whole suite (the README's second command).
test:
    python3 -m venv {{venv}} && {{venv}}/bin/pip install -e '.[dev]' && {{venv}}/bin/python -m pytest

# ruff and mypy, as CI runs them.
lint:
    {{py}} -m ruff check castore tests bench
    {{py}} -m ruff format --check castore tests bench
    {{py}} -m mypy --strict castore

# The side-by-side benchmark (full mode); `just bench --quick` for the CI-sized run.
bench *ARGS:
    {{py}} bench/run.py {{ARGS}}
