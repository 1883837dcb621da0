"""The ground floor: fast kernels that import torch and numpy only, never a concept module.

A tier-1 layer may call one of these as it calls torch; each kernel's docstring names the reference
it equals and the test that proves it (through oracle.py's checkers where one exists).
"""
