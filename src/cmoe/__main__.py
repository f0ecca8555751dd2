import sys

from cmoe.tools.cli import main

sys.exit(main())
