"""``python -m esxisim``: see esxisim.cli."""

from esxisim.cli import main

raise SystemExit(main())
