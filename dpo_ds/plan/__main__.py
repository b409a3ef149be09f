"""`python -m dpo_ds.plan ...`: will it fit? (dpo_ds/plan/planner.py)"""

import sys

from dpo_ds.plan.planner import main

sys.exit(main())
