import sys

from proxsparse_core.cli import main

sys.exit(main())
