import sys

from swarmrt.cli import main

sys.exit(main())
