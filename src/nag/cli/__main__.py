"""``python -m nag.cli`` (what ``accelerate launch -m nag.cli`` runs)."""

import sys

from nag.cli import main

main(sys.argv[1:])
