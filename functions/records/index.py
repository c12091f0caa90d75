"""FC entrypoint of the records function: built-in runtime python3.10, an event function (no HTTP trigger).

handler: index.handler, initializer: index.initialize, preStop: index.pre_stop. All logic is in
sdfc.records (see README.md beside this file for packaging).
"""
from sdfc.records.fc_handler import handler, initialize, pre_stop  # noqa: F401
