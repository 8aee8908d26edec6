import sys

from d2v.cli import main

sys.exit(main())
