"""FC entrypoint of the records function: built-in runtime python3.10, an event function (no HTTP trigger).

handler: index.handler, initializer: index.initialize, preStop: index.pre_stop. All logic is in
sdfc.records (see README.md beside this file for packaging).
"""
import os
import sys

# FC puts the layer (/opt/python) on the path, but after the packages the python3.10 image preinstalls: first,
# so that the layer's pinned PyMySQL (and the rest) win, as in functions/web/index.py.
if os.path.isdir("/opt/python") and sys.path[:1] != ["/opt/python"]:
    sys.path.insert(0, "/opt/python")

from sdfc.records.fc_handler import handler, initialize, pre_stop  # noqa: E402,F401
