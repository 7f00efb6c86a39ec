"""``python -m xarray_zcache.cli``: the ``zcache`` command."""

import sys

from xarray_zcache.cli import main

sys.exit(main())
