"""Training of DeepSeg's default brain model (see train.py)."""
