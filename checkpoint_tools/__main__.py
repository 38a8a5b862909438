import sys

from aipo_mp.convert.cli import main

sys.exit(main())
