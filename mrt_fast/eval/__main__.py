import sys

from mrt_fast.eval import main

sys.exit(main())
