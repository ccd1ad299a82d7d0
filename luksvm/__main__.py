from __future__ import annotations

from luksvm.cli import main

raise SystemExit(main())
