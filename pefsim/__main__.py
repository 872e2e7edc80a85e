import sys

from pefsim.ops.cli import main

sys.exit(main())
