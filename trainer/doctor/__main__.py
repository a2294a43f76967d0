"""`python -m trainer.doctor CONFIG.yaml`: see trainer/doctor/__init__.py."""

import sys

from trainer.doctor import main

sys.exit(main())
