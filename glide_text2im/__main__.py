"""``python -m glide_text2im``: the ``glide-text2im`` command."""

import sys

from .cli import main

sys.exit(main())
