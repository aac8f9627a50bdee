import sys

from splitnn.cli.main import main

sys.exit(main())
