"""Model bundles in the MONAI Bundle layout: ``configs/metadata.json`` + ``models/model.pt``.

:mod:`ai.bundle.metadata` reads and validates the metadata without torch (the web shows it),
with the architecture names from :mod:`ai.bundle.architectures`; :mod:`ai.bundle.load`
builds, saves and loads the network (torch).
"""
