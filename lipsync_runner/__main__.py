import sys

from lipsync_runner.cli import main

sys.exit(main())
