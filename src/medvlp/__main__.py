import sys

from medvlp.cli import main

sys.exit(main())
