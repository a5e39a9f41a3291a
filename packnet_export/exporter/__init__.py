"""Export PackNet tasks to ONNX: one module per format behind one interface.

* ``formats``: the registry of formats (dense, sparse, multitask), the opset range, the
  multi-task layouts, and the one check of each; light, for the CLI's ``--help``.
* ``template``: the one torch trace of an export, and the tensors each task reads.
* ``writer``: the streaming ONNX writer, the IR version policy, the metadata of every file.
* ``dense``, ``sparse``, ``multitask``: each format's ``write(context, task, path)``.
* ``pipeline``: an export from checks to files (``pipeline.export``).
* ``validation``: onnxruntime against PyTorch, for every file written.
* ``precision``: the fp16 and int8 files of every format, built on ``quantization``
  (onnxruntime's QDQ quantizer and float16 converter, batch-norm folding, sparse int8),
  ``calibration`` (each task's training images) and ``multitask_int8`` (one int8 tensor
  per layer shared by every task).

This package imports nothing heavy itself: ``formats`` is enough to list the choices.
"""

from .formats import (
                      DEFAULT_LAYOUT,
                      DEFAULT_OPSET,
                      FORMAT_CHOICES,
                      FORMATS,
                      LAYOUTS,
                      MAX_OPSET,
                      MIN_OPSET,
                      PROVIDERS,
                      REGISTRY,
)

__all__ = ["DEFAULT_LAYOUT", "DEFAULT_OPSET", "FORMATS", "FORMAT_CHOICES", "LAYOUTS", "MAX_OPSET", "MIN_OPSET",
           "PROVIDERS", "REGISTRY"]
