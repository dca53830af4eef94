"""Backdrop worker side: image I/O, segmentation, mask refinement, compositing, Celery tasks."""
