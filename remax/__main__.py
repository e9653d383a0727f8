import sys

from remax.cli import main

sys.exit(main())
