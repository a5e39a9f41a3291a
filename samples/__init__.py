"""The bundled sample checkpoint (see README.md here), installed as package data of
``packnet_export.samples`` and found with ``importlib.resources``."""
