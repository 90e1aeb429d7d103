"""`python -m lstm_deploy_export.cli`: the `lstm-deploy` command."""

import sys

from lstm_deploy_export.cli import main

sys.exit(main())
