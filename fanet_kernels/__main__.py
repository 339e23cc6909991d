"""``python -m fanet_kernels`` runs the ``fanet`` command line."""
import sys

from fanet_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main())
