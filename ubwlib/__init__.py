"""ubwlib: Untargeted Backdoor Watermarks (UBW, NeurIPS 2022) for dataset copyright protection.

Layers, top to bottom (nothing imports anything above it):
``experiments`` -> ``watermarks`` / ``verify`` / ``defenses`` -> ``train`` -> ``models``, ``data``.
``metrics`` are pure functions of predictions and labels; ``cache`` stores results by content hash.
"""

__version__ = "0.1.0"
