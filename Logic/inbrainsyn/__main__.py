import sys

from inbrainsyn.cli import main

sys.exit(main())
