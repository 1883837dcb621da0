"""What train.py and sample.py share (tier 2): the texts and tokens, the run folder."""
