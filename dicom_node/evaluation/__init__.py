"""Evaluation of the deployed models for quality officers.

A run measures per-label sensitivity, specificity, PPV, NPV, F1 and AUROC (95% CIs) on a
labelled reference set (``kind: reference``) or on live studies whose ground truth was
confirmed later (``kind: confirmed``), stores them, and raises alerts below configured
floors. Entry point for the node, the CLI and the web API:
:class:`dicom_node.evaluation.service.EvaluationService`; the schedule lives in
:mod:`dicom_node.scheduler`.

This package's ``__init__`` stays import-free: :mod:`dicom_node.config` imports
:mod:`dicom_node.evaluation.settings` and must not pull the rest in.
"""
