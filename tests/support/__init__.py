"""Helpers shared by the tests: system calls and errno answers (``syscalls``),
tree snapshots and their comparison (``trees``), and the random-operation
differential engine (``differential``).  Fixtures and daemon handling stay in
``tests/conftest.py``."""
