"""Alembic's environment: runs the revisions on the connection the node hands over.

:func:`dicom_node.store.schema.migrate` opens the transaction (and takes the migration lock)
and passes its connection and the node's ``MetaData`` in ``config.attributes``, so the
revisions run inside that one locked transaction; there is no URL or ini file to read here.
"""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the node's migrations run through dicom_node.store.schema.migrate "
                       "(a connection in config.attributes), not from an alembic.ini")
context.configure(connection=connection, target_metadata=config.attributes.get("metadata"),
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
