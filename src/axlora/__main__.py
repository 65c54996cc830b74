import sys

from axlora.cli import main

sys.exit(main())
