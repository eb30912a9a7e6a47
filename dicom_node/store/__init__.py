"""The node's database: tables and engine (:mod:`.db`), the schema's revisions and the
migration on start-up (:mod:`.schema`, Alembic scripts in ``migrations/``), the state machines
(:mod:`.states`) and the one place that writes study, instance and job states
(:mod:`.transitions`).

Delivery states keep their one writer in :mod:`dicom_node.delivery.ledger`: the ledger is
more than state writes (leases, backoff, storage commitment, resubmission, the audit events
of each), and it is already the only code that sets ``deliveries.state`` (the worker asks it
for a new delivery row), so moving it here would only move the delivery package's core.
"""
