"""``python -m quantkit.compare JOB``: the worker process the comparison's runner starts."""

import sys

from .worker import main

sys.exit(main(sys.argv[1]))
