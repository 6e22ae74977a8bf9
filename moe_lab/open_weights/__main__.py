"""python -m moe_lab.open_weights CHECKPOINT DIR (see moe_lab.open_weights.export.main)."""
import sys

from moe_lab.open_weights.export import main

sys.exit(main())
