"""Fixed choices of training and evaluation parameters, importable without torch.

The command line lists them in ``--help`` and completes them in shells; the library checks
its arguments against the same tuples. (The export's choices live in ``exporter.formats``.)
"""

AMP_MODES = ("off", "bf16", "fp16")
"""Mixed precision of ``add_task``: off, bf16, or fp16 (with loss scaling; CUDA only)."""
RESIZE_MODES = ("crop", "squash")
"""How a task's images reach the input size (``data.eval_transform``), stored with the task:
``crop`` resizes the shorter side to 8/7 and crops, ``squash`` resizes the whole image to a square."""
SPLITS = ("test", "train")
"""The ImageFolder splits ``evaluate`` reads."""
