"""Reference standards and the figures measured against them.

Shared by the node's scheduled evaluation jobs (``dicom_node.evaluation``) and
``training evaluate`` / ``training fit``, so it lives in ``ai`` (the lower layer) and imports
neither: :mod:`~ai.reference.labels` (label files, the one YOLO parser),
:mod:`~ai.reference.dicom_files` (the one "is this a DICOM file" check and the tree index),
:mod:`~ai.reference.metrics` / :mod:`~ai.reference.metrics_detection` (the statistics) and
:mod:`~ai.reference.evaluate` (the one per-label evaluation both sides report).
"""
