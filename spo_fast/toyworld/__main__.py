import sys

from spo_fast.toyworld.build import main

sys.exit(main())
