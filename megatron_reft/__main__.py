import sys

from megatron_reft.cli import main

sys.exit(main())
