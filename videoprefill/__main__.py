import sys

from videoprefill.run import main

sys.exit(main())
