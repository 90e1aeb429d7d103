"""``python -m lstm_deploy_serving serve BUNDLE``: the server without the export package."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
