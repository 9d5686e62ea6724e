import sys

from dgdm.agent.cli import main

sys.exit(main())
