"""`python -m sdfc.training run CONFIG.json`: one training run in its own process (sdfc/training/child.py)."""
import sys

from .child import main

sys.exit(main())
