"""Exercises of NF4 (nf4.py) and of the AdamW update and paging (paged_optim.py), and their wrong
answers."""
import torch

from exercises import Exercise

NF4_EXERCISES = []
OPTIMIZER_EXERCISES = []
