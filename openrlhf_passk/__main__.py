import sys

from openrlhf_passk.cli import main

sys.exit(main())
