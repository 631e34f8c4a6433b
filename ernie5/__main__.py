import sys

from ernie5.cli import main

sys.exit(main())
