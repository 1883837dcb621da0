"""Exercises of LoRA, rsLoRA, DoRA and VeRA (lora.py, dora.py, vera.py), and their wrong answers."""
import torch

from exercises import Exercise

ADAPTER_EXERCISES = []
