import sys

from kt_core.cli import main

sys.exit(main())
