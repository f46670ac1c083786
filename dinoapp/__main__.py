"""``python -m dinoapp ...`` (and ``torchrun -m dinoapp pretrain ...``) = the ``dinoapp`` command."""

import sys

from .cli import main

sys.exit(main())
