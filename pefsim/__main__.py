import sys

from pefsim.cli import main

sys.exit(main())
