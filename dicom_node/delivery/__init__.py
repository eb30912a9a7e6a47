"""Delivery of result objects, one state machine per (object, destination).

``status`` classifies DIMSE response statuses, ``syntaxes`` holds the transfer syntaxes the
node may send (and transcodes the secondary capture to them), ``negotiation`` turns an
association's accepted presentation contexts into a per-object decision, ``ledger`` owns
every write to the ``deliveries`` table (with its audit event) and ``commitment`` the
Storage Commitment Push Model. :mod:`dicom_node.sender` runs them.
"""
