"""`python -m dsgraph ...` is the `dsgraph` command (what `torchrun ... -m dsgraph run` launches)."""
import sys

from dsgraph.app.cli import main

sys.exit(main())
