"""Alembic's script directory of the node's schema (``env.py``, ``versions/``).

Run by :mod:`dicom_node.store.schema` with a configuration built in code: no alembic.ini,
found from this package's path so it works from any directory and from an installed wheel.
"""
