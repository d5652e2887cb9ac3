"""``python -m ip2p_jax ...`` runs the ``ip2p`` command."""

import sys

from ip2p_jax.apps.cli.main import main

sys.exit(main())
