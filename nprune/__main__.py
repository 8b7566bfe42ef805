from .experiment import main
import sys

sys.exit(main())
