"""The speedrun: time to nanoGPT's validation loss, ours against nanoGPT's own loop.

  python -m experiments.speedrun

data.py (the char data both sides read), nanogpt.py (the PyTorch reference), race.py (our
side), __main__.py (the command: both, side by side, report and figure).
"""
