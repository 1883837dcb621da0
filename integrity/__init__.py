"""The ground floor for integrity: the merge record (what a merge remembers, its SHA-256) that
adapters.AdapterLinear keeps, in one place and out of the reader's way. Imports torch only."""
