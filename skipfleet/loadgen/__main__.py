"""`python -m skipfleet.loadgen`: one load-generator process (see skipfleet.loadgen.process)."""

import sys

from skipfleet.loadgen.process import main

sys.exit(main())
