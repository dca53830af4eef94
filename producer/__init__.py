"""Backdrop producer side: settings, job records, storage, the Python API and the CLI.

Nothing in this package imports torch or OpenCV, so the producer and API stay slim.
"""
