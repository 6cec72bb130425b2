import sys

from glide_text2im.train.cli import main

sys.exit(main())
