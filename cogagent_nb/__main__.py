import sys

from cogagent_nb.cli import main

sys.exit(main())
