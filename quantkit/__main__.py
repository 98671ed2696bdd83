"""``python -m quantkit``: the command line, also as torchrun's module (``torchrun ... -m quantkit quantize``)."""

import sys

from .cli.main import main

sys.exit(main())
