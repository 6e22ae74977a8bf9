"""Test-session set-up shared by every test file.

Triton's interpreter must be chosen before `triton` is first imported (Triton 3.8 builds its
language library at import time), so decide it here, before any test module imports anything.
Run the whole suite with `make test`; one file with `.venv/bin/python -m pytest tests/model/test_moe.py`.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
