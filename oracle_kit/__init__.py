"""The oracle kit's machinery (tier 2): the cases the checkers draw, the contracts, golden files.
Its entry point is oracle.py at the top."""
