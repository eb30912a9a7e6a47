"""The schema's revisions, oldest first by ``down_revision``; see :mod:`dicom_node.store.schema`."""
